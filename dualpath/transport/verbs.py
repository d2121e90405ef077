"""The `verbs` data plane: RDMA over InfiniBand/RoCE through pyverbs (rdma-core's Python binding).

NEVER RUN ON HARDWARE: no host of this project (CI, dev, GPU machines) has an RDMA device or the
kernel RDMA subsystem. What CI checks (tests/test_verbs.py): the module imports on Debian 12's
rdma-core (v44), the QP attribute builders produce the pyverbs objects field by field, and device
setup, writes, completions, errors and teardown run against a fake pyverbs layer written to behave
as rdma-core documents it (GID types from sysfs, sq_sig_all, WRs flushed by a QP in error, posts
refused below RTS, registrations past the locked-memory limit failing). Where the fake is wrong,
so are the tests: examples/rdma_check.sh is the first run on a real fabric.

- Setup (DeviceLayer) refuses, saying why, a device this plane cannot drive: iWARP (its RC queue
  pairs connect only through rdma_cm, which this plane does not use), anything else that is not
  InfiniBand or RoCE (EFA, usNIC), a device on which an RC queue pair cannot be created, and
  memory that cannot be registered (a container's locked-memory limit: 64 KiB to 8 MiB by
  default). make_dataplane then warns once and picks another backend.
- Host regions are registered as MRs over the tensor's own memory; the handle carries rkey and
  address. GPU memory is not registered (no dma-buf export from torch): such writes go over tcp,
  and so do writes into a region whose registration failed after setup.
- One RC queue pair per (peer, traffic class), created under a lock on the first write and
  connected by a ConnectQp request (wire.py) on the data plane's TCP link. Per class: a service level (IB virtual
  lane) and an IP traffic class (RoCE DSCP), so switches keep latency traffic ahead of bulk.
- Device, port and GID: the configured ones, else the first ACTIVE port and, on Ethernet, a RoCE v2
  GID that is not link-local (routable); hop limit 64; MTU the smaller of the two active MTUs.
  The GID type comes from ``Context.query_gid_type``, i.e. libibverbs' sysfs enum (RoCE v2 is
  IBV_GID_TYPE_SYSFS_ROCE_V2 == 1), not ibv_query_gid_ex's (IBV_GID_TYPE_ROCE_V2 == 2).
- A write is RDMA WRITEs of at most 1 GiB each (an SGE length is 32 bits), the last one WITH
  IMMEDIATE carrying a sequence number. QPs are made with sq_sig_all=0 and only that last WR is
  signalled: a send queue executes and completes in order, so its completion (success, or a flush
  after an earlier piece failed) means that no WR of the write still reads the source. The
  receiver fires its completion only after the matching receive completion (the verbs-level
  guarantee). The notify object rides a TCP frame sent at the same time (more than 32 bits), so
  the round trip overlaps the RDMA transfer.
- A write returns or raises only once none of its WRs is in flight, also when it times out or is
  cancelled: its QP is then retired, and the write waits for that.
- Retiring a QP (a failed, timed-out or cancelled write, a restarted peer, close): it is moved to
  ERR, which flushes every outstanding WR into the CQs, then a signalled marker WR is posted; a
  queue flushes in order, so the marker's completion is the last of that QP, and only then is it
  destroyed (or after DRAIN_TIMEOUT: destroying also stops the device's work on it). Only the QP
  that failed: a fresh one made since under the same key stays.

- Queue pairs belong to one incarnation of their peer (framing.py): ours, writing, are keyed by the
  peer's incarnation and retired once a restarted peer is met at the same address; those we accepted
  from a writer are retired once a new incarnation of it logs in. A handle of an earlier incarnation
  (its rkey names memory of a process that is gone) is refused before anything is posted.

- Completions: each CQ has its own completion channel and is armed (ibv_req_notify_cq); the event
  loop watches the channel's descriptor (non-blocking) and, on an event, acks it, re-arms, then
  polls the CQ empty. Nothing spins while writes wait. pyverbs exposes neither the channel's nor the
  async queue's descriptor and its get_cq_event holds the GIL while it blocks, so the descriptors
  are found in /proc/self/fd as the event files setup opened (``_with_event_fd``).
- Back-pressure: a write takes as many entries as it has WRs in its QP's send queue (SEND_DEPTH)
  and in the shared send CQ (all of a QP's WRs complete into it at once when it fails, signalled or
  not), waiting for room rather than failing the post or overrunning the CQ; it gives them back
  when its last WR completes. A receiver accepts only as many QPs as its receive CQ holds the
  receives of; beyond that it refuses, and the writer writes to it over tcp (and asks again after
  QP_RETRY_AFTER).
- Async events (the device's event queue, watched the same way): a QP in error (pyverbs' event
  names no QP, so those in ERR are found by query) is retired, failing only the writes and
  landings on it; port down retires every QP and sends later writes over tcp until the port is
  active again; a CQ overrun or a fatal device does the same for good. The engine goes on.

Not done: grants (docs/SECURITY.md) are checked on the notify frame only; the DRAM buffer's one MR
lets any holder of its rkey write anywhere in it. Enforcing grants at the NIC needs an MR or memory
window per grant, invalidated on revoke. Everything above the enum shim and attribute builders ran
against tests/test_verbs.py's fake device only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from dualpath.transport.dataplane import DataPlane, TransferError, as_bytes, check_write
from dualpath.transport.framing import Login
from dualpath.transport.link import Refused
from dualpath.transport.rdma import (RECV_DEPTH, SEND_DEPTH, DeviceLayer, RdmaOptions, VerbsUnavailable, enums,
                                     err_attr, init_attr, locked_memory_limit, rtr_attr, rts_attr, split_write)
from dualpath.transport.wire import ConnectQp, Landing, Notify, Request

log = logging.getLogger(__name__)
DRAIN_WR_ID = (1 << 64) - 1  # a retiring QP's marker WR; a write's WRs are (write id << 1) | is-last-piece
DRAIN_TIMEOUT = 5.0  # seconds for a QP in ERR to flush before it is destroyed anyway
QP_RETRY_AFTER = 30.0  # seconds a writer whose QP a peer refused writes to it over tcp before asking again
POLL_BATCH = 32


def _seconds(value: Any, default: float = 60.0, most: float = 3600.0) -> float:
    """A writer's timeout from its notify frame, as a number of seconds this side will wait."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return min(float(value), most) if ok else default




@dataclass
class _Send:
    """One write's WRs on one QP. `done` resolves, with a work completion status, on the completion
    of its last WR (signalled on success, flushed after a failure): a send queue completes in order,
    so then none of its WRs reads the source any more."""
    qp_num: int
    done: asyncio.Future
    status: int | None = None  # the first failed WR's (an unsignalled WR completes only by failing)
    slots: int = 0  # send-queue and CQ entries it holds (one per WR) until `done`


class VerbsDataPlane(DataPlane):
    backend = "verbs"
    slow_landings = True  # a WRITE WITH IMM that never arrives must not hold up the link's other frames

    def __init__(self, *args, rdma: RdmaOptions | None = None, device_layer: Any = None,
                 register_first: torch.Tensor | None = None, **kwargs):
        """register_first: the host buffer the caller will register (an engine's DRAM buffer),
        registered now so that a device that cannot take it fails setup (VerbsUnavailable), not the
        engine later; register() of that tensor then uses this MR."""
        super().__init__(*args, **kwargs)
        self.e = enums()
        self.opts = rdma or RdmaOptions()
        self.dev = device_layer or DeviceLayer(self.opts, self.e)
        self.mrs: dict[int, Any] = {}  # region id -> MR
        self._premade: dict[tuple[int, int], Any] = {}  # (address, bytes) -> the MR of register_first
        self.qps: dict[tuple, Any] = {}  # ours, writing: (peer addr, class, peer incarnation) -> (QP, remote qpn)
        self._qp_locks: dict[tuple, asyncio.Lock] = {}
        self.accepted: dict[int, Any] = {}  # qp number -> ours, written into by a peer's QP
        self._accepted_from: dict[int, Login] = {}  # qp number -> the writer that asked for it
        self._failed: dict[int, int] = {}  # accepted qp number -> the status its receive failed with
        self._sends: dict[int, _Send] = {}  # write id -> its WRs in flight
        self._arrived: dict[tuple[int, int], int] = {}  # (qp num, seq) -> receive status, not yet claimed
        self._waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._draining: dict[int, asyncio.Task] = {}  # qp number -> its retirement
        self._markers: dict[int, asyncio.Future] = {}  # qp number -> its drain marker's completion
        self._drain_lock = asyncio.Lock()
        self._retiring_recvs: set[int] = set()  # accepted QPs draining: their flushed receives still land in rcq
        self._seq = 0
        # Back-pressure: WRs outstanding per send queue and on the shared send CQ (a full send queue
        # fails the post; a CQ overrun puts every QP on it in error). One CQ entry stays free for
        # the drain marker (one drain at a time).
        self._sq_used: Counter[int] = Counter()
        self._cq_used = 0
        self._room_waiters: list[asyncio.Future] = []
        self._no_qp: dict[tuple, float] = {}  # (peer addr, class, incarnation) -> loop time to ask again
        self._down: str | None = None  # why the device cannot carry writes now (async events), or None
        self._watching: asyncio.AbstractEventLoop | None = None
        self._source_warned = False
        if register_first is not None:
            self._register_first(register_first)

    def _register_first(self, tensor: torch.Tensor) -> None:
        flat = as_bytes(tensor)
        if flat.is_cuda:
            return
        e = self.e
        try:
            mr = self.dev.register(flat.data_ptr(), flat.numel(), e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
        except Exception as err:
            self.dev.close()
            raise VerbsUnavailable(f"cannot register the {flat.numel()}-byte buffer ({err}; "
                                   f"{locked_memory_limit()})") from None
        self._premade[(flat.data_ptr(), flat.numel())] = mr

    def links(self) -> dict[str, str]:
        """The backend of each peer link: verbs where a QP is connected, else tcp."""
        out = super().links()
        out.update({f"{a[0]}:{a[1]}": "verbs" for a, _, _ in self.qps})
        return out

    # -- memory registration --

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        handle = super().register(tensor, granted_only=granted_only)
        flat = self.regions[handle["region"]].tensor
        if flat.is_cuda:
            log.warning("%s: GPU region %d is not RDMA-registered (no dma-buf export); writes to it go over tcp",
                        self.name, handle["region"])
            return handle
        e = self.e
        mr = self._premade.pop((flat.data_ptr(), flat.numel()), None)
        if mr is None:
            try:
                mr = self.dev.register(flat.data_ptr(), flat.numel(),
                                       e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
            except Exception as err:  # ENOMEM past the locked-memory limit, and the like: the engine goes on
                log.warning("%s: region %d (%d bytes) is not RDMA-registered (%s; %s); writes to it go over tcp",
                            self.name, handle["region"], flat.numel(), err, locked_memory_limit())
                return handle
        self.mrs[handle["region"]] = mr
        handle.update(rkey=mr.rkey, raddr=flat.data_ptr())
        return handle

    def release(self, handle: dict) -> None:
        mr = self.mrs.pop(handle["region"], None)
        if mr is not None:
            mr.close()
        super().release(handle)

    def _source_mr(self, flat: torch.Tensor, nbytes: int) -> tuple[Any, bool]:
        """An MR covering the source bytes: one of our registered regions (the engines send from
        their registered DRAM buffer), else a temporary one (second value True: close it after)."""
        lo, hi = flat.data_ptr(), flat.data_ptr() + nbytes
        for region_id, mr in self.mrs.items():
            t = self.regions[region_id].tensor
            if t.data_ptr() <= lo and hi <= t.data_ptr() + t.numel():
                return mr, False
        return self.dev.register(lo, nbytes, self.e.IBV_ACCESS_LOCAL_WRITE), True

    # -- queue pairs --

    def _address(self, qp) -> dict:
        return {"qpn": qp.qp_num, "lid": self.dev.lid, "gid": self.dev.gid, "mtu": int(self.dev.active_mtu)}

    def _connect(self, qp, remote: dict, tc: str) -> None:
        """RESET → INIT → RTR (aimed at the remote QP, MTU the smaller active one) → RTS."""
        e, port = self.e, self.dev.port
        mtu = min(int(self.dev.active_mtu), int(remote.get("mtu", self.dev.active_mtu)))
        for attr, mask in (init_attr(port, e), rtr_attr(port, remote, self.dev.gid_index, mtu, tc,
                                                         self.opts.hop_limit, e), rts_attr(0, e)):
            qp.modify(attr, mask)

    def _post_recvs(self, qp, n: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        scratch = self.dev.scratch
        for _ in range(n):  # WRITE WITH IMM consumes a receive WR and places nothing through it
            qp.post_recv(RecvWR(wr_id=qp.qp_num, num_sge=1, sg=[SGE(scratch.buf, 64, scratch.lkey)]))

    def _answer(self, request: Request, writer: Login) -> dict:
        """A writer's ConnectQp: the address of a QP of ours connected to its own."""
        if not isinstance(request, ConnectQp):
            return super()._answer(request, writer)
        return self._accept_qp(request.info, request.tc, writer)

    def _accept_qp(self, info: dict, traffic_class: str, writer: Login) -> dict:
        """Refused (the writer then writes over tcp) while the device is down or when the receive CQ
        could not hold one more QP's receives, all flushed at once if its QPs fail."""
        if self._down is not None:
            raise TransferError(self._down)
        qps = len(self.accepted) + len(self._retiring_recvs) + 1
        if qps * (RECV_DEPTH + 1) > self.dev.cq_depth:  # + 1: the drain marker
            raise TransferError(f"its receive CQ ({self.dev.cq_depth} entries) is full with the receives of "
                                f"{qps - 1} queue pairs")
        self._watch()
        qp = self.dev.new_qp(self.e)
        try:
            self._connect(qp, info, traffic_class)
            self._post_recvs(qp, RECV_DEPTH)
        except Exception:
            qp.close()  # no drain: the writer never learned its number, so nothing can have arrived
            raise
        self.accepted[qp.qp_num] = qp
        self._accepted_from[qp.qp_num] = writer
        return self._address(qp)

    def _writer_restarted(self, name: str, old_incarnation: str | None) -> None:
        """Retire the queue pairs an earlier incarnation of this writer connected to ours."""
        super()._writer_restarted(name, old_incarnation)
        for qpn in [q for q, w in self._accepted_from.items() if w == Login(name, old_incarnation)]:
            del self._accepted_from[qpn]
            self._failed.pop(qpn, None)
            qp = self.accepted.pop(qpn, None)
            if qp is not None:  # (a failed one is retiring already)
                self._retire_qp(qp, "recv")

    async def start(self, host: str | None = None, port: int = 0) -> int:
        port = await super().start(host, port)
        self._watch()
        return port

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """Retire our queue pairs to an earlier incarnation at addr: their remote QP is gone."""
        super()._peer_restarted(addr, incarnation)
        for key in [k for k in self._no_qp if k[0] == addr and k[2] != incarnation]:
            del self._no_qp[key]
        for key in [k for k in self.qps if k[0] == addr and k[2] != incarnation]:
            self._drop_qp(key)

    async def _qp(self, dst: dict, tc: str):
        key = (tuple(dst["addr"]), tc, dst["inc"])
        async with self._qp_locks.setdefault(key, asyncio.Lock()):  # concurrent first writes: one QP
            if key not in self.qps:
                self.qps[key] = await self._new_connected_qp(dst, tc)
            return self.qps[key]

    async def _new_connected_qp(self, dst: dict, tc: str) -> tuple[Any, int]:
        """A QP of ours connected to one the peer makes for it (ConnectQp). Failures are
        TransferErrors; a QP that fails here had no WR posted, so it is destroyed without a drain."""
        try:
            qp = self.dev.new_qp(self.e)
        except Exception as err:
            raise TransferError(f"cannot create a queue pair: {err}") from None
        try:
            remote = (await self.ask(dst["addr"], tc, ConnectQp(0, tc, self._address(qp)))).answer
            self._connect(qp, remote, tc)
        except TransferError:
            qp.close()
            raise
        except Exception as err:  # PyverbsRDMAError from modify (the remote's address did not take)
            qp.close()
            raise TransferError(f"cannot connect a queue pair: {err}") from None
        except BaseException:
            qp.close()
            raise
        return qp, remote["qpn"]

    def _drop_qp(self, key: tuple, qp: Any = None) -> asyncio.Task | None:
        """Take the QP under `key` out of use and retire it; given `qp`, only if that is the one there
        (a write that failed on it must not retire the fresh QP another write made since). Returns
        the retirement of `qp` (or of the QP under key), if one is under way."""
        entry = self.qps.get(key)
        if entry is not None and (qp is None or entry[0] is qp):
            del self.qps[key]
            return self._retire_qp(entry[0], "send")
        return self._draining.get(qp.qp_num) if qp is not None else None

    def _retire_qp(self, qp: Any, queue: str) -> asyncio.Task:
        """Start (once per QP) its drain and destruction; `queue` ("send" or "recv"): the one this
        side posts to, where the drain marker goes."""
        task = self._draining.get(qp.qp_num)
        if task is None:
            task = self._draining[qp.qp_num] = asyncio.create_task(self._drain(qp, queue))
            if queue == "recv":
                self._retiring_recvs.add(qp.qp_num)
        return task

    async def _drain(self, qp: Any, queue: str) -> None:
        """ERR flushes every outstanding WR of qp into its CQ; the marker WR posted after them is
        flushed last (a queue completes in order), so its completion means none is left. Then, or
        after DRAIN_TIMEOUT, qp is destroyed. One QP drains at a time: a full receive queue flushes
        RECV_DEPTH completions, and several at once could overrun the shared CQ."""
        qpn = qp.qp_num
        try:
            async with self._drain_lock:
                waits = self._flush(qp, queue)
                if waits:
                    _, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT)
                    if pending:
                        log.warning("%s: queue pair %d did not drain within %ss; destroying it anyway", self.name,
                                    qpn, DRAIN_TIMEOUT)
        finally:
            self._markers.pop(qpn, None)
            qp.close()  # after this the device does no more work for it either
            self._draining.pop(qpn, None)
            self._retiring_recvs.discard(qpn)
            for send in list(self._sends.values()):  # writes whose completion can no longer come
                if send.qp_num == qpn and not send.done.done():
                    send.done.set_result(send.status if send.status is not None else self.e.IBV_WC_WR_FLUSH_ERR)
            self._sq_used.pop(qpn, None)

    def _flush(self, qp: Any, queue: str) -> list[asyncio.Future]:
        """Move qp to ERR and post the drain marker; returns what to wait for (nothing if qp cannot
        even be moved to ERR: then it is destroyed at once)."""
        try:
            qp.modify(*err_attr(self.e))
        except Exception as err:
            log.warning("%s: queue pair %d cannot be moved to ERR (%s); destroying it", self.name, qp.qp_num, err)
            return []
        marker = self._markers[qp.qp_num] = asyncio.get_running_loop().create_future()
        try:
            self._post_marker(qp, queue)
            return [marker]
        except Exception as err:  # a full send queue: wait for the writes' own last WRs, flushed too
            del self._markers[qp.qp_num]
            log.warning("%s: no drain marker on queue pair %d (%s)", self.name, qp.qp_num, err)
            return [s.done for s in self._sends.values() if s.qp_num == qp.qp_num]

    def _post_marker(self, qp: Any, queue: str) -> None:
        """A signalled WR on `queue` of a QP in ERR: flushed, never executed (rkey 0 is never used)."""
        from pyverbs.wr import SGE, RecvWR, SendWR

        e, scratch = self.e, self.dev.scratch
        sge = SGE(scratch.buf, 1, scratch.lkey)
        if queue == "recv":
            qp.post_recv(RecvWR(wr_id=DRAIN_WR_ID, num_sge=1, sg=[sge]))
            return
        wr = SendWR(wr_id=DRAIN_WR_ID, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge], send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(0, 0)
        qp.post_send(wr)

    # -- completions and device events: the event loop watches their descriptors, nothing spins --

    def _watch(self) -> None:
        """Watch both completion channels and the async event queue on the running loop (once)."""
        if self._watching is not None:
            return
        loop = self._watching = asyncio.get_running_loop()
        dev = self.dev
        loop.add_reader(dev.cq_fd, self._on_cq_event, dev.cq, dev.cq_channel, self._send_completion)
        loop.add_reader(dev.rcq_fd, self._on_cq_event, dev.rcq, dev.rcq_channel, self._recv_completion)
        loop.add_reader(dev.async_fd, self._on_async_event)

    def _unwatch(self) -> None:
        if self._watching is not None:
            for fd in (self.dev.cq_fd, self.dev.rcq_fd, self.dev.async_fd):
                self._watching.remove_reader(fd)
            self._watching = None

    def _on_cq_event(self, cq: Any, channel: Any, handle: Callable[[Any], None]) -> None:
        """A completion channel is readable: take and ack its event, re-arm the CQ, then reap it.
        Re-armed before reaping, so a completion that lands after the last poll raises the next event
        (ibv_req_notify_cq(3)); acked at once, since destroying a CQ waits for every event's ack."""
        try:
            channel.get_cq_event(cq)
        except Exception:  # EAGAIN (the descriptor is non-blocking): woken without an event
            return
        cq.ack_events(1)
        cq.req_notify()
        self._reap(cq, handle)

    @staticmethod
    def _reap(cq: Any, handle: Callable[[Any], None]) -> None:
        while True:
            n, wcs = cq.poll(num_entries=POLL_BATCH)
            for wc in wcs[:n]:
                handle(wc)
            if n < POLL_BATCH:
                return

    def _on_async_event(self) -> None:
        try:
            event = self.dev.ctx.get_async_event()
        except Exception:  # EAGAIN: nothing queued
            return
        try:
            self._device_event(event.event_type)
        finally:
            event.ack()  # destroying a QP or CQ waits for the acks of the events about it

    def _device_event(self, kind: int) -> None:
        """Port down, a QP or CQ in error, a fatal device: the writes in flight on what failed fail
        (their QPs are drained and destroyed), later ones go over tcp until the port is back; the
        engine goes on. pyverbs' AsyncEvent names no QP, so a QP event retires the QPs in ERR."""
        e = self.e
        if kind in (e.IBV_EVENT_QP_FATAL, e.IBV_EVENT_QP_REQ_ERR, e.IBV_EVENT_QP_ACCESS_ERR):
            self._retire_failed_qps()
        elif kind == e.IBV_EVENT_PORT_ERR:
            self._go_down(f"port {self.dev.port} went down")
        elif kind == e.IBV_EVENT_PORT_ACTIVE and self._down is not None and self._down.startswith("port"):
            log.warning("%s: RDMA port %d is active again; new writes use verbs", self.name, self.dev.port)
            self._down = None
        elif kind == e.IBV_EVENT_CQ_ERR:
            self._go_down("a completion queue overran (every QP on it is in error)", sticky=True)
        elif kind == e.IBV_EVENT_DEVICE_FATAL:
            self._go_down("the device reported a fatal error", sticky=True)
        else:
            log.info("%s: RDMA async event %d", self.name, kind)

    def _go_down(self, why: str, sticky: bool = False) -> None:
        """Stop using the device: retire every QP (their writes and landings fail), write over tcp."""
        if self._down is None or sticky:
            log.warning("%s: %s; writes in flight over RDMA fail, later ones go over tcp", self.name, why)
            self._down = ("fatal: " if sticky else "") + why
        for key in list(self.qps):
            self._drop_qp(key)
        for qpn in list(self.accepted):
            self._accepted_failed(qpn, self.e.IBV_WC_WR_FLUSH_ERR)

    def _retire_failed_qps(self) -> None:
        for key, (qp, _) in list(self.qps.items()):
            if self._in_error(qp):
                self._drop_qp(key, qp)
        for qpn, qp in list(self.accepted.items()):
            if self._in_error(qp):
                self._accepted_failed(qpn, self.e.IBV_WC_WR_FLUSH_ERR)

    def _in_error(self, qp: Any) -> bool:
        try:
            attr, _ = qp.query(self.e.IBV_QP_STATE)
        except Exception:  # cannot even be queried: treat it as failed
            return True
        return attr.qp_state == self.e.IBV_QPS_ERR

    # -- back-pressure --

    def _fits(self, qpn: int, n: int) -> bool:
        return self._sq_used[qpn] + n <= SEND_DEPTH and self._cq_used + n <= self.dev.cq_depth - 1

    async def _take_room(self, send: _Send, n: int) -> None:
        """Wait until n more WRs fit in the send queue of send's QP and in the shared send CQ, and
        hold them for the write until its last WR completes (``_give_room``)."""
        if n > min(SEND_DEPTH, self.dev.cq_depth - 1):
            raise TransferError(f"a write of {n} work requests cannot fit a send queue of {SEND_DEPTH} or a CQ of "
                                f"{self.dev.cq_depth}")
        while not self._fits(send.qp_num, n):
            waiter = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)
        self._sq_used[send.qp_num] += n
        self._cq_used += n
        send.slots = n
        send.done.add_done_callback(lambda _: self._give_room(send))

    def _give_room(self, send: _Send) -> None:
        if not send.slots:
            return
        if send.qp_num in self._sq_used:
            self._sq_used[send.qp_num] -= send.slots
        self._cq_used -= send.slots
        send.slots = 0
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:  # each checks again; those that still do not fit wait again
            if not waiter.done():
                waiter.set_result(None)

    def _send_completion(self, wc: Any) -> None:
        if wc.wr_id == DRAIN_WR_ID:
            return self._marker_done(wc.qp_num)
        send = self._sends.get(wc.wr_id >> 1)
        if send is None:
            return
        if wc.status != self.e.IBV_WC_SUCCESS and send.status is None:
            send.status = wc.status
        if wc.wr_id & 1 and not send.done.done():  # the last piece: nothing of the write is in flight now
            send.done.set_result(send.status if send.status is not None else wc.status)

    def _recv_completion(self, wc: Any) -> None:
        if wc.wr_id == DRAIN_WR_ID:
            return self._marker_done(wc.qp_num)
        qp = self.accepted.get(wc.qp_num)
        if wc.status != self.e.IBV_WC_SUCCESS:
            # No valid imm_data: a flushed receive of a QP retiring (no longer accepted), or the writer's
            # WRITE WITH IMM failed into a live one, which is in error now.
            if qp is not None:
                self._accepted_failed(wc.qp_num, wc.status)
            return
        if qp is not None:
            self._post_recvs(qp, 1)
        key = (wc.qp_num, wc.imm_data)
        fut = self._waiters.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(wc.status)
        else:
            self._arrived[key] = wc.status

    def _marker_done(self, qpn: int) -> None:
        fut = self._markers.get(qpn)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _accepted_failed(self, qpn: int, status: int) -> None:
        """A QP a writer writes into is in error: landings awaited on it (and notify frames naming it
        later) fail with the status; it is retired, its writer's next write makes a new one."""
        self._failed[qpn] = status
        for key in [k for k in self._waiters if k[0] == qpn]:
            fut = self._waiters.pop(key)
            if not fut.done():
                fut.set_result(status)
        self._retire_qp(self.accepted.pop(qpn), "recv")

    async def _landed(self, msg: Landing, writer: Login) -> None:
        """A verbs write's notify frame: fire only once its WRITE WITH IMM has been received."""
        ev = msg.event if isinstance(msg, Notify) else None
        if not isinstance(ev, dict) or "rdma_seq" not in ev:
            return
        qpn = ev.get("qpn")
        if not isinstance(qpn, int) or self._accepted_from.get(qpn) != writer:  # (an old incarnation's are retired)
            raise TransferError(f"{writer.name} names queue pair {qpn!r}, which it did not connect")
        key = (ev["qpn"], ev["rdma_seq"])
        status = self._arrived.pop(key, None)
        if status is None:
            status = self._failed.get(qpn)
        if status is None:
            fut = self._waiters[key] = asyncio.get_running_loop().create_future()
            self._watch()
            try:
                status = await asyncio.wait_for(fut, _seconds(ev.get("timeout")))
            except asyncio.TimeoutError:
                raise TransferError(f"the RDMA write on queue pair {qpn} did not arrive in time") from None
            finally:
                self._waiters.pop(key, None)
        if status != self.e.IBV_WC_SUCCESS:
            raise TransferError(f"RDMA write landed with work completion status {status}")

    # -- writes --

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        """As DataPlane.write; returns or raises only once none of its WRs is in flight (also on
        a timeout or cancellation), so the caller may reuse the source then."""
        if "rkey" not in dst or not isinstance(src, torch.Tensor) or src.is_cuda or self._down is not None:
            return await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        flat = as_bytes(src)
        if flat.numel() < nbytes:
            raise ValueError(f"source has {flat.numel()} bytes, {nbytes} requested")
        await self._link_to(dst, traffic_class)  # the rkey is of the incarnation at its address, or refused
        self._watch()
        entry = await self._qp_or_none(dst, traffic_class)
        if entry is None:  # the peer takes no QP of ours (now): its link carries the bytes
            return await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        try:
            mr, temporary = self._source_mr(flat, nbytes)
        except Exception as err:  # the source cannot be registered (locked-memory limit): tcp moves it
            if not self._source_warned:
                self._source_warned = True
                log.warning("%s: an unregistered source could not be registered (%s; %s); such writes go over tcp",
                            self.name, err, locked_memory_limit())
            return await self._write_over_link(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        try:
            await self._write_rdma(entry, flat.data_ptr(), mr, dst, dst_offset, nbytes, traffic_class, notify,
                                   timeout)
        finally:
            if temporary:
                mr.close()  # only now: no WR reads through it any more

    async def _qp_or_none(self, dst: dict, tc: str) -> tuple[Any, int] | None:
        """Our QP to dst's peer for class tc, made if need be; None while that peer refuses one (its
        receive CQ is full, its port is down, it cannot make one): then writes go over tcp, and the
        QP is asked for again after QP_RETRY_AFTER."""
        key, now = (tuple(dst["addr"]), tc, dst["inc"]), asyncio.get_running_loop().time()
        if self._no_qp.get(key, now) > now:
            return None
        try:
            return await self._qp(dst, tc)
        except Refused as err:
            log.warning("%s: %s refused a queue pair (%s); writing to it over tcp for %ss", self.name, dst["addr"],
                        err, QP_RETRY_AFTER)
            self._no_qp[key] = now + QP_RETRY_AFTER
            return None
        except TransferError as err:
            raise TransferError(f"RDMA write to {dst['addr']} failed: {err}") from None

    async def _write_rdma(self, entry: tuple[Any, int], addr: int, mr: Any, dst: dict, dst_offset: int, nbytes: int,
                          tc: str, notify: Any, timeout: float) -> None:
        qp, remote_qpn = entry
        wid = next(self._write_ids)
        send = self._sends[wid] = _Send(qp.qp_num, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(self._take_room(send, len(split_write(addr, 0, nbytes))), timeout)
        except BaseException as err:  # nothing posted: the QP is fine
            self._sends.pop(wid, None)
            if isinstance(err, asyncio.TimeoutError):
                raise TransferError(f"RDMA write to {dst['addr']} found no room in its queues within {timeout}s") \
                    from None
            raise
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        notified: asyncio.Task | None = None
        try:
            try:
                self._post(qp, mr, addr, dst["rkey"], dst["raddr"] + dst_offset, nbytes, wid, self._seq)
            except Exception as err:  # PyverbsRDMAError and the like; pieces already posted drain below
                raise TransferError(f"post_send failed: {err}") from None
            # The notify frame goes at once: the peer checks the handle and range (a released one
            # answers "unknown or released", as over tcp) and fires on its receive completion.
            landed = {"qpn": remote_qpn, "rdma_seq": self._seq, "timeout": timeout}
            notified = asyncio.create_task(self._notify(dst, dst_offset, nbytes, tc, notify, timeout, event=landed))
            await self._both_done(send, notified, timeout)
        except (Exception, asyncio.CancelledError) as err:
            if not (send.done.done() and send.done.result() == self.e.IBV_WC_SUCCESS):
                await self._retire_write((tuple(dst["addr"]), tc, dst["inc"]), qp, send)
            if isinstance(err, asyncio.TimeoutError):
                raise TransferError(f"RDMA write to {dst['addr']} timed out after {timeout}s") from None
            if isinstance(err, TransferError):
                raise TransferError(f"RDMA write to {dst['addr']} failed: {err}") from None
            raise
        finally:
            if send.done.done():
                self._sends.pop(wid, None)
            else:  # (cancelled twice while draining) keep it where the drain resolves it and frees its room
                send.done.add_done_callback(lambda _: self._sends.pop(wid, None))
            if notified is not None and not notified.done():
                notified.cancel()

    async def _both_done(self, send: _Send, notified: asyncio.Task, timeout: float) -> None:
        """Wait for the last WR's completion and the peer's ack of the notify frame; raise the first
        failure of either, or TimeoutError if both have not finished within timeout."""
        loop, ok = asyncio.get_running_loop(), self.e.IBV_WC_SUCCESS
        deadline = loop.time() + timeout

        def rdma_failed() -> bool:
            return send.done.done() and send.done.result() != ok

        def notify_failed() -> bool:
            return notified.done() and notified.exception() is not None

        pending = {send.done, notified}
        while pending and not rdma_failed() and not notify_failed():
            if loop.time() >= deadline:
                raise asyncio.TimeoutError
            _, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                            return_when=asyncio.FIRST_COMPLETED)
        if rdma_failed() and not notified.done():
            await asyncio.wait([notified], timeout=1.0)  # the peer's refusal says more than an access error
        if notify_failed():
            raise notified.exception()
        if rdma_failed():
            raise TransferError(f"RDMA write failed (work completion status {send.done.result()})")

    async def _retire_write(self, key: tuple, qp: Any, send: _Send) -> None:
        """After a failed, timed-out or cancelled write: retire the QP it used (that one only) and
        return once none of the write's WRs is in flight."""
        drain = self._drop_qp(key, qp)
        if drain is not None and not send.done.done():
            await asyncio.shield(drain)  # a second cancellation ends this wait, never the drain

    def _post(self, qp, mr, addr: int, rkey: int, raddr: int, nbytes: int, wid: int, seq: int) -> None:
        """Plain WRITEs, then the last piece WITH IMM (seq): the only signalled one (the QP has
        sq_sig_all=0). A failed earlier WR completes in error and puts the QP in ERR, so the last one
        completes too, flushed."""
        from pyverbs.wr import SGE, SendWR

        e = self.e
        pieces = split_write(addr, raddr, nbytes)
        for i, (lo, rlo, n) in enumerate(pieces):
            last = i == len(pieces) - 1
            wr = SendWR(wr_id=(wid << 1) | last, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM if last else e.IBV_WR_RDMA_WRITE,
                        num_sge=1, sg=[SGE(lo, n, mr.lkey)], send_flags=e.IBV_SEND_SIGNALED if last else 0)
            wr.set_wr_rdma(rkey, rlo)
            if last:
                wr.imm_data = seq
            qp.post_send(wr)  # one post per WR: a chain through next_wr needs every object kept alive

    async def close(self) -> None:
        await super().close()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_result(self.e.IBV_WC_WR_FLUSH_ERR)
        self._waiters.clear()
        for key in list(self.qps):
            self._drop_qp(key)
        for qpn in list(self.accepted):
            self._retire_qp(self.accepted.pop(qpn), "recv")
        self._accepted_from.clear()
        self._failed.clear()
        await asyncio.gather(*self._draining.values(), return_exceptions=True)  # each bounded by DRAIN_TIMEOUT
        self._unwatch()  # (only now: the drains' markers complete through the channels)
        for mr in [*self.mrs.values(), *self._premade.values()]:
            mr.close()
        self.mrs.clear()
        self._premade.clear()
        self.dev.close()
