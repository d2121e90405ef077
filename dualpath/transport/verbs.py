"""The `verbs` data plane: RDMA over InfiniBand/RoCE through pyverbs (rdma-core's Python binding).

NEVER RUN ON HARDWARE: no host of this project (CI, dev, GPU machines) has an RDMA device or the
kernel RDMA subsystem. What CI checks (tests/test_verbs.py): the module imports on Debian 12's
rdma-core (v44), the QP attribute builders produce the pyverbs objects field by field, and the
write/poll/error paths run against a fake device layer. examples/rdma_check.sh is the first run on
a real fabric.

- Host regions are registered as MRs over the tensor's own memory; the handle carries rkey and
  address. GPU memory is not registered (no dma-buf export from torch): such writes go over tcp.
- One RC queue pair per (peer, traffic class), created under a lock on the first write and
  connected by a ``qp`` request on the TCP data-plane link. Per class: a service level (IB virtual
  lane) and an IP traffic class (RoCE DSCP), so switches keep latency traffic ahead of bulk.
- Device, port and GID: the configured ones, else the first ACTIVE port and, on Ethernet, a RoCE v2
  GID that is not link-local (routable); hop limit 64; MTU the smaller of the two active MTUs.
- A write is RDMA WRITEs of at most 1 GiB each (an SGE length is 32 bits), the last one WITH
  IMMEDIATE carrying a sequence number: the receiver fires its completion only after the matching
  receive completion (the verbs-level guarantee). The notify object rides a TCP frame sent at the
  same time (more than 32 bits), so the round trip overlaps the RDMA transfer.

- Queue pairs belong to one incarnation of their peer (framing.py): ours, writing, are keyed by the
  peer's incarnation and closed once a restarted peer is met at the same address; those we accepted
  from a writer are closed once a new incarnation of it logs in. A handle of an earlier incarnation
  (its rkey names memory of a process that is gone) is refused before anything is posted.

Not done: grants (docs/SECURITY.md) are checked on the notify frame only; the DRAM buffer's one MR
lets any holder of its rkey write anywhere in it. Enforcing grants at the NIC needs an MR or memory
window per grant, invalidated on revoke.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

import torch

from dualpath.transport.dataplane import TcpDataPlane, TransferError, as_bytes, check_write
from dualpath.transport.framing import Login

log = logging.getLogger(__name__)
SERVICE_LEVEL = {"latency": 0, "bulk": 1}
TRAFFIC_CLASS = {"latency": 26 << 2, "bulk": 0}  # DSCP AF31 for latency, best effort for bulk
MAX_WR_BYTES = 1 << 30  # an SGE length is 32 bits: split larger writes
RECV_DEPTH = 512


def enums():
    """rdma-core >= v59 dropped pyverbs.enums for pyverbs.libibverbs_enums, whose names are reached
    through their enum class; older ones (Debian 12: v44) have only pyverbs.enums."""
    try:
        import pyverbs.libibverbs_enums as e
    except ImportError:
        import pyverbs.enums as e
    return _Enums(e)


class _Enums:
    """IBV_* names from either module: flat (pyverbs.enums, old libibverbs_enums) or class-qualified
    (ibv_access_flags.IBV_ACCESS_LOCAL_WRITE with Cython >= 3.1)."""

    def __init__(self, mod):
        self.mod = mod

    def __getattr__(self, name: str):
        if hasattr(self.mod, name):
            return getattr(self.mod, name)
        for cls in vars(self.mod).values():
            if isinstance(cls, type) and hasattr(cls, name):
                return int(getattr(cls, name))
        raise AttributeError(f"rdma-core's pyverbs has no {name}")


@dataclass
class RdmaOptions:
    """cluster.toml [transport] rdma_*: empty / -1 choose automatically."""
    device: str = ""
    port: int = 0  # 0: the first ACTIVE port
    gid_index: int = -1  # -1: RoCE v2 routable GID on Ethernet, 0 on InfiniBand
    hop_limit: int = 64


def rdma_devices() -> list[str]:
    """Names of RDMA devices on this host; [] if pyverbs is missing or there are none."""
    try:
        import pyverbs.device as d
    except ImportError:
        return []
    try:
        return [dev.name.decode() for dev in d.get_device_list()]
    except Exception:  # pyverbs raises 'Failed to get devices list' when there is none
        return []


# -- pure choices and QP attribute builders (tested field by field without a device) --

def choose_gid(gids: list[tuple[int, str, int]], ethernet: bool, e) -> int:
    """gids: (index, gid, gid type). InfiniBand: index 0. Ethernet: the first RoCE v2 GID that is not
    link-local (an IPv4-mapped or global IPv6 address is routable), else any RoCE v2 one."""
    if not ethernet:
        return 0
    v2 = [(i, g) for i, g, t in gids if t == e.IBV_GID_TYPE_ROCE_V2 and g.strip(":0")]
    for i, g in v2:
        if not ipaddress.IPv6Address(g).is_link_local:
            return i
    if v2:
        return v2[0][0]
    raise TransferError("no RoCE v2 GID on this port (is an IP address configured on its netdev?)")


def _gid_text(gid: str) -> str:
    return ipaddress.IPv6Address(gid).exploded  # pyverbs' GID parser wants all eight groups


def init_attr(port: int, e):
    from pyverbs.qp import QPAttr

    attr = QPAttr(qp_state=e.IBV_QPS_INIT, port_num=port)
    attr.pkey_index = 0
    attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    mask = e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS
    return attr, mask


def rtr_attr(port: int, remote: dict, sgid_index: int, path_mtu: int, tc: str, hop_limit: int, e):
    """Aimed at the remote QP; always with a GRH (required on RoCE, harmless on IB)."""
    from pyverbs.addr import GID, AHAttr, GlobalRoute
    from pyverbs.qp import QPAttr

    attr = QPAttr(qp_state=e.IBV_QPS_RTR, port_num=port)
    attr.path_mtu = path_mtu
    attr.dest_qp_num, attr.rq_psn = remote["qpn"], remote.get("psn", 0)
    attr.max_dest_rd_atomic, attr.min_rnr_timer = 1, 12
    gr = GlobalRoute(dgid=GID(_gid_text(remote["gid"])), sgid_index=sgid_index, hop_limit=hop_limit,
                     traffic_class=TRAFFIC_CLASS[tc])
    attr.ah_attr = AHAttr(port_num=port, is_global=1, gr=gr, dlid=remote["lid"], sl=SERVICE_LEVEL[tc])
    mask = (e.IBV_QP_STATE | e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN
            | e.IBV_QP_MAX_DEST_RD_ATOMIC | e.IBV_QP_MIN_RNR_TIMER)
    return attr, mask


def rts_attr(psn: int, e):
    from pyverbs.qp import QPAttr

    attr = QPAttr(qp_state=e.IBV_QPS_RTS)
    attr.sq_psn, attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.max_rd_atomic = psn, 14, 7, 7, 1  # ~67 ms a try
    mask = (e.IBV_QP_STATE | e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY | e.IBV_QP_SQ_PSN
            | e.IBV_QP_MAX_QP_RD_ATOMIC)
    return attr, mask


def split_write(addr: int, raddr: int, nbytes: int, limit: int = MAX_WR_BYTES) -> list[tuple[int, int, int]]:
    """(local address, remote address, length) pieces of at most `limit` bytes (>= 1 piece)."""
    return [(addr + o, raddr + o, min(limit, nbytes - o)) for o in range(0, max(nbytes, 1), limit)]


class DeviceLayer:
    """The verbs objects this plane touches, opened on a real device. Tests substitute a fake only
    for what no kernel here can serve (posting, polling)."""

    def __init__(self, opts: RdmaOptions, e):
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.pd import PD

        names = rdma_devices()
        if not names:
            raise TransferError("no RDMA device (pyverbs finds none)")
        name = opts.device or names[0]
        if name not in names:
            raise TransferError(f"RDMA device {name!r} not found (have {names})")
        self.ctx = Context(name=name)
        ports = [opts.port] if opts.port else range(1, self.ctx.query_device().phys_port_cnt + 1)
        active = [p for p in ports if self.ctx.query_port(p).state == e.IBV_PORT_ACTIVE]
        if not active:
            raise TransferError(f"no ACTIVE port on {name} (checked {list(ports)})")
        self.port = active[0]
        pattr = self.ctx.query_port(self.port)
        self.lid, self.active_mtu = pattr.lid, pattr.active_mtu
        ethernet = pattr.link_layer == e.IBV_LINK_LAYER_ETHERNET
        gids = []
        for i in range(pattr.gid_tbl_len):
            try:
                gids.append((i, str(self.ctx.query_gid(self.port, i)), self.ctx.query_gid_type(self.port, i)))
            except Exception:  # an empty GID table slot
                continue
        self.gid_index = opts.gid_index if opts.gid_index >= 0 else choose_gid(gids, ethernet, e)
        self.gid = str(self.ctx.query_gid(self.port, self.gid_index))
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 4096, None, None, 0)  # send completions of every QP
        self.rcq = CQ(self.ctx, 4096, None, None, 0)  # receive (WRITE WITH IMM) completions
        from pyverbs.mr import MR

        self.scratch = MR(self.pd, 64, e.IBV_ACCESS_LOCAL_WRITE)  # receive WRs need an SGE (unused by IMM)

    def new_qp(self, e):
        from pyverbs.qp import QP, QPCap, QPInitAttr

        cap = QPCap(max_send_wr=1024, max_recv_wr=RECV_DEPTH, max_send_sge=1, max_recv_sge=1)
        return QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.rcq, cap=cap))

    def register(self, address: int, nbytes: int, access: int):
        from pyverbs.mr import MR

        return MR(self.pd, nbytes, access, address=address)

    def close(self) -> None:
        for obj in (self.scratch, self.cq, self.rcq, self.pd, self.ctx):
            obj.close()


class VerbsDataPlane(TcpDataPlane):
    backend = "verbs"

    def __init__(self, *args, rdma: RdmaOptions | None = None, device_layer: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.e = enums()
        self.opts = rdma or RdmaOptions()
        self.dev = device_layer or DeviceLayer(self.opts, self.e)
        self.mrs: dict[int, Any] = {}  # region id -> MR
        self.qps: dict[tuple, Any] = {}  # ours, writing: (peer addr, class, peer incarnation) -> (QP, remote qpn)
        self._qp_locks: dict[tuple, asyncio.Lock] = {}
        self.accepted: dict[int, Any] = {}  # qp number -> ours, written into by a peer's QP
        self._accepted_from: dict[int, Login] = {}  # qp number -> the writer that asked for it
        self._sends: dict[int, asyncio.Future] = {}  # wr_id -> the write waiting for its completion
        self._arrived: dict[tuple[int, int], int] = {}  # (qp num, seq) -> receive status, not yet claimed
        self._waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._seq = 0
        self._poller: asyncio.Task | None = None

    def links(self) -> dict[str, str]:
        """The backend of each peer link: verbs where a QP is connected, else tcp."""
        out = {f"{h}:{p}": "tcp" for h, p, _ in self._links}
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
        mr = self.dev.register(flat.data_ptr(), flat.numel(), e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
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

    def accept_qp(self, info: dict, traffic_class: str, writer: Login) -> dict:
        qp = self.dev.new_qp(self.e)
        try:
            self._connect(qp, info, traffic_class)
            self._post_recvs(qp, RECV_DEPTH)
        except Exception:
            qp.close()
            raise
        self.accepted[qp.qp_num] = qp
        self._accepted_from[qp.qp_num] = writer
        return self._address(qp)

    def _writer_restarted(self, name: str, old_incarnation: str | None) -> None:
        """Close the queue pairs an earlier incarnation of this writer connected to ours."""
        super()._writer_restarted(name, old_incarnation)
        for qpn in [q for q, w in self._accepted_from.items() if w == Login(name, old_incarnation)]:
            del self._accepted_from[qpn]
            self.accepted.pop(qpn).close()

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """Close our queue pairs to an earlier incarnation at addr: their remote QP is gone."""
        super()._peer_restarted(addr, incarnation)
        for key in [k for k in self.qps if k[0] == addr and k[2] != incarnation]:
            self._drop_qp(key)

    async def _qp(self, dst: dict, tc: str):
        key = (tuple(dst["addr"]), tc, dst["inc"])
        async with self._qp_locks.setdefault(key, asyncio.Lock()):  # concurrent first writes: one QP
            if key not in self.qps:
                qp = self.dev.new_qp(self.e)
                try:
                    reply = await self.ask(dst["addr"], tc, {"op": "qp", "tc": tc, "info": self._address(qp)})
                    if "err" in reply:
                        raise TransferError(reply["err"])
                    self._connect(qp, reply["qp"], tc)
                except BaseException:
                    qp.close()
                    raise
                self.qps[key] = (qp, reply["qp"]["qpn"])
            return self.qps[key]

    def _drop_qp(self, key: tuple) -> None:
        entry = self.qps.pop(key, None)
        if entry is not None:
            entry[0].close()  # in the error state after a failure: the next write handshakes anew

    # -- completions --

    def _wanted(self) -> bool:
        return bool(self._sends or self._waiters)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        """Send and receive completions while any write or landing waits; each waiter owns its own
        timeout, so this loop ends as soon as nothing is pending."""
        e = self.e
        while self._wanted():
            n, wcs = self.dev.cq.poll(num_entries=32)
            for wc in wcs[:n]:
                fut = self._sends.pop(wc.wr_id, None)
                if fut is not None and not fut.done():
                    ok = wc.status == e.IBV_WC_SUCCESS
                    fut.set_result(None) if ok else fut.set_exception(
                        TransferError(f"RDMA write failed (work completion status {wc.status})"))
            n, wcs = self.dev.rcq.poll(num_entries=32)
            for wc in wcs[:n]:
                qp = self.accepted.get(wc.qp_num)
                if qp is not None and wc.status == e.IBV_WC_SUCCESS:
                    self._post_recvs(qp, 1)
                key = (wc.qp_num, wc.imm_data)
                fut = self._waiters.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_result(wc.status)
                else:
                    self._arrived[key] = wc.status
            await asyncio.sleep(0)

    async def _landed(self, msg: dict, writer: Login) -> None:
        """A verbs write's TCP notify frame: fire only once its WRITE WITH IMM has been received."""
        ev = msg.get("event")
        if not isinstance(ev, dict) or "rdma_seq" not in ev:
            return
        qpn = ev.get("qpn")
        if not isinstance(qpn, int) or self._accepted_from.get(qpn) != writer:  # (an old incarnation's are closed)
            raise ConnectionError(f"{writer.name} names queue pair {qpn!r}, which it did not connect")
        key = (ev["qpn"], ev["rdma_seq"])
        status = self._arrived.pop(key, None)
        if status is None:
            fut = self._waiters[key] = asyncio.get_running_loop().create_future()
            self._ensure_poller()
            try:
                status = await asyncio.wait_for(fut, ev.get("timeout", 60.0))
            finally:
                self._waiters.pop(key, None)  # a timeout raises out of _serve: the link closes
        if status != self.e.IBV_WC_SUCCESS:
            raise ConnectionError(f"RDMA write landed with work completion status {status}")

    # -- writes --

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        if "rkey" not in dst or not isinstance(src, torch.Tensor) or src.is_cuda:
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        flat = as_bytes(src)
        if flat.numel() < nbytes:
            raise ValueError(f"source has {flat.numel()} bytes, {nbytes} requested")
        await self._link_to(dst, traffic_class)  # the rkey is of the incarnation at its address, or refused
        key, wid, notified = (tuple(dst["addr"]), traffic_class, dst["inc"]), None, None
        mr, temporary = self._source_mr(flat, nbytes)
        try:
            qp, remote_qpn = await self._qp(dst, traffic_class)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            wid = next(self._write_ids)
            done = self._sends[wid] = asyncio.get_running_loop().create_future()
            try:
                self._post(qp, mr, flat.data_ptr(), dst["rkey"], dst["raddr"] + dst_offset, nbytes, wid, self._seq)
            except Exception as err:  # PyverbsRDMAError and the like: nothing stays pending
                raise TransferError(f"post_send failed: {err}") from None
            self._ensure_poller()
            # The notify frame goes at once: the peer checks the handle and range (a released one
            # answers "unknown or released", as over tcp) and fires on its receive completion.
            landed = {"qpn": remote_qpn, "rdma_seq": self._seq, "timeout": timeout}
            notified = asyncio.create_task(self._send(memoryview(b""), dst, dst_offset, traffic_class, notify, "n",
                                                      timeout, landed_event=landed, moved=nbytes))
            await asyncio.wait([done, notified], timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
            if done.done() and done.exception() and not notified.done():
                await asyncio.wait([notified], timeout=1.0)  # the peer's refusal says more than an access error
            for fut in (notified, done):
                if fut.done() and fut.exception():
                    raise fut.exception()
            if not (done.done() and notified.done()):
                raise asyncio.TimeoutError
        except asyncio.TimeoutError:
            self._drop_qp(key)
            raise TransferError(f"RDMA write to {dst['addr']} timed out after {timeout}s") from None
        except TransferError as err:
            self._drop_qp(key)
            raise TransferError(f"RDMA write to {dst['addr']} failed: {err}") from None
        finally:
            self._sends.pop(wid, None)
            if notified is not None and not notified.done():
                notified.cancel()
            if temporary:
                mr.close()

    def _post(self, qp, mr, addr: int, rkey: int, raddr: int, nbytes: int, wid: int, seq: int) -> None:
        """One chain of WRs: plain WRITEs, then the last piece WITH IMM (seq), the only signalled one
        (a failed earlier WR puts the QP in error, so the last completes with a flush error)."""
        from pyverbs.wr import SGE, SendWR

        e, wrs = self.e, []
        pieces = split_write(addr, raddr, nbytes)
        for i, (lo, rlo, n) in enumerate(pieces):
            last = i == len(pieces) - 1
            wr = SendWR(wr_id=wid, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM if last else e.IBV_WR_RDMA_WRITE,
                        num_sge=1, sg=[SGE(lo, n, mr.lkey)], send_flags=e.IBV_SEND_SIGNALED if last else 0)
            wr.set_wr_rdma(rkey, rlo)
            if last:
                wr.imm_data = seq
            wrs.append(wr)
        for wr in wrs:  # one post per WR keeps the chain explicit (pyverbs' next_wr needs the objects alive)
            qp.post_send(wr)

    async def close(self) -> None:
        await super().close()
        if self._poller is not None:
            self._poller.cancel()
        for fut in [*self._sends.values(), *self._waiters.values()]:
            if not fut.done():
                fut.set_exception(TransferError(f"{self.name} closed"))
        self._sends.clear()
        self._waiters.clear()
        for key in list(self.qps):
            self._drop_qp(key)
        for qp in self.accepted.values():
            qp.close()
        self.accepted.clear()
        self._accepted_from.clear()
        for mr in self.mrs.values():
            mr.close()
        self.mrs.clear()
        self.dev.close()
