"""The verbs backend without RDMA hardware: what pyverbs itself can check (imports, QP attribute
objects) runs on the installed rdma-core; device setup and the write, completion, error and
teardown paths run against a fake pyverbs layer (tests named *_fake_device), since no kernel here
serves a device. The fake follows rdma-core where it matters to this plane (each point says
where); nothing here proves that bytes move on a fabric: examples/rdma_check.sh does that."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import ipaddress
import logging
import os
import re
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

from dualpath.transport import make_dataplane
from dualpath.transport.dataplane import TransferError
from dualpath.transport.rdma import (CQ_DEPTH, MAX_WR_BYTES, RECV_DEPTH, SERVICE_LEVEL, TRAFFIC_CLASS, DeviceLayer,
                                     RdmaOptions, VerbsUnavailable, _Enums, _with_event_fd, choose_gid, err_attr,
                                     init_attr, qp_init_attr, rtr_attr, rts_attr, split_write)
from dualpath.transport.verbs import DRAIN_WR_ID, VerbsDataPlane
from tests.conftest import loop_turns, until

pyverbs = pytest.importorskip("pyverbs", reason="python3-pyverbs (rdma-core) is not installed")
from pyverbs.addr import GID  # noqa: E402
from pyverbs.cq import WC  # noqa: E402
from pyverbs.pyverbs_error import PyverbsRDMAError  # noqa: E402
from pyverbs.wr import SendWR  # noqa: E402

from dualpath.transport.rdma import enums  # noqa: E402

TOKEN = "t"
e = enums()


def test_enums_resolve_on_the_installed_rdma_core_and_class_qualified_names():
    assert e.IBV_QPS_RTR != e.IBV_QPS_INIT and e.IBV_GID_TYPE_ROCE_V2 != e.IBV_GID_TYPE_ROCE_V1
    # Two GID type enums: Context.query_gid_type gives the sysfs one (libibverbs' ibv_query_gid_type),
    # ibv_query_gid_ex the other; RoCE v2 is 1 in the first and 2 in the second.
    assert (e.IBV_GID_TYPE_SYSFS_IB_ROCE_V1, e.IBV_GID_TYPE_SYSFS_ROCE_V2) == (0, 1)
    assert (e.IBV_GID_TYPE_IB, e.IBV_GID_TYPE_ROCE_V1, e.IBV_GID_TYPE_ROCE_V2) == (0, 1, 2)

    class ibv_wr_opcode:  # rdma-core >= v59 with Cython >= 3.1: names only through their enum class
        IBV_WR_RDMA_WRITE_WITH_IMM = 1

    newer = _Enums(types.SimpleNamespace(ibv_wr_opcode=ibv_wr_opcode))
    assert newer.IBV_WR_RDMA_WRITE_WITH_IMM == 1
    with pytest.raises(AttributeError, match="no IBV_NOPE"):
        newer.IBV_NOPE


def test_qp_attribute_builders_give_pyverbs_objects_field_by_field():
    init = qp_init_attr(e)
    assert (init.qp_type, init.sq_sig_all) == (e.IBV_QPT_RC, 0)  # pyverbs' default is 1: every WR signalled
    assert (init.cap.max_send_sge, init.cap.max_recv_wr) == (1, RECV_DEPTH)

    attr, mask = init_attr(2, e)
    assert (attr.qp_state, attr.port_num, attr.pkey_index) == (e.IBV_QPS_INIT, 2, 0)
    assert attr.qp_access_flags == e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    assert mask == e.IBV_QP_STATE | e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS

    remote = {"qpn": 77, "lid": 5, "gid": "::ffff:10.0.0.2", "psn": 0}
    for tc in ("latency", "bulk"):
        attr, mask = rtr_attr(2, remote, 3, e.IBV_MTU_4096, tc, 64, e)
        ah = attr.ah_attr
        assert (attr.qp_state, attr.dest_qp_num, attr.path_mtu) == (e.IBV_QPS_RTR, 77, e.IBV_MTU_4096)
        assert (ah.port_num, ah.is_global, ah.dlid, ah.sl) == (2, 1, 5, SERVICE_LEVEL[tc])
        assert (ah.sgid_index, ah.hop_limit, ah.traffic_class) == (3, 64, TRAFFIC_CLASS[tc])
        assert str(ah.dgid) == "0000:0000:0000:0000:0000:ffff:0a00:0002"
        assert mask & e.IBV_QP_AV and mask & e.IBV_QP_PATH_MTU and mask & e.IBV_QP_DEST_QPN
        assert not mask & e.IBV_QP_SQ_PSN
    assert TRAFFIC_CLASS["latency"] != TRAFFIC_CLASS["bulk"] and SERVICE_LEVEL["latency"] != SERVICE_LEVEL["bulk"]

    attr, mask = rts_attr(0, e)
    assert (attr.qp_state, attr.sq_psn, attr.retry_cnt, attr.rnr_retry, attr.timeout) == (e.IBV_QPS_RTS, 0, 7, 7, 14)
    assert mask & e.IBV_QP_SQ_PSN and mask & e.IBV_QP_MAX_QP_RD_ATOMIC and not mask & e.IBV_QP_AV

    attr, mask = err_attr(e)
    assert (attr.qp_state, mask) == (e.IBV_QPS_ERR, e.IBV_QP_STATE)


def test_gid_choice_prefers_a_routable_roce_v2_gid():
    v1, v2 = e.IBV_GID_TYPE_SYSFS_IB_ROCE_V1, e.IBV_GID_TYPE_SYSFS_ROCE_V2  # as query_gid_type gives them
    table = [(0, "fe80::1", v1), (1, "fe80::1", v2), (2, "::ffff:10.0.0.1", v1), (3, "::ffff:10.0.0.1", v2)]
    assert choose_gid(table, ethernet=True, e=e) == 3
    assert choose_gid(table[:2], ethernet=True, e=e) == 1  # only link-local: same-subnet RoCE v2
    assert choose_gid(table, ethernet=False, e=e) == 0
    with pytest.raises(VerbsUnavailable, match="no RoCE v2 GID"):
        choose_gid([(0, "fe80::1", v1)], ethernet=True, e=e)


def test_an_event_descriptor_that_cannot_be_found_fails_setup_and_closes_what_was_made():
    """pyverbs hides the completion channel's descriptor; where the uverbs event file it opened is not
    found (no RDMA subsystem here: an eventfd or nothing is opened instead), setup says so, and the
    plane is never left to busy-poll."""
    made = []

    class Opened:
        def __init__(self):
            self.fd, self.closed = os.eventfd(0) if hasattr(os, "eventfd") else os.open(os.devnull, os.O_RDONLY), False
            made.append(self)

        def close(self):
            self.closed = True
            os.close(self.fd)

    with pytest.raises(VerbsUnavailable, match="event descriptor"):
        _with_event_fd(Opened)
    assert made[0].closed


def test_writes_of_4_gib_and_more_split_below_the_32_bit_sge_length():
    pieces = split_write(1000, 5000, (5 << 30) + 7)
    assert len(pieces) == 6 and all(n <= MAX_WR_BYTES < 1 << 32 for _, _, n in pieces)
    assert sum(n for _, _, n in pieces) == (5 << 30) + 7
    assert pieces[1] == (1000 + MAX_WR_BYTES, 5000 + MAX_WR_BYTES, MAX_WR_BYTES)
    assert split_write(0, 0, 10) == [(0, 0, 10)]


# -- a fake pyverbs layer: the objects no kernel here can give ---------------------------------
#
# What it follows from rdma-core / the IB spec, since the plane depends on it:
# - Context.query_gid_type returns libibverbs' sysfs enum (ibv_query_gid_type reads
#   .../gid_attrs/types/N: "IB/RoCE v1" -> IBV_GID_TYPE_SYSFS_IB_ROCE_V1, "RoCE v2" ->
#   IBV_GID_TYPE_SYSFS_ROCE_V2) and fails on an empty slot, whose GID reads as zeros.
# - QPs move RESET -> INIT -> RTR -> RTS, and to ERR from any state; post_send below RTS fails
#   with EINVAL (as the providers check), a full send queue with ENOMEM.
# - A successful WR completes into the CQ only if signalled (IBV_SEND_SIGNALED, or the QP's
#   sq_sig_all, which pyverbs' QPInitAttr defaults to 1). A failed WR completes whatever its
#   flags, puts the QP in ERR, and every outstanding WR (either queue) then completes with
#   IBV_WC_WR_FLUSH_ERR, as does any WR posted in ERR; a queue completes in order.
# - RDMA WRITE checks the lkey's MR locally (IBV_WC_LOC_PROT_ERR) and the rkey's MR at the
#   responder: registered with REMOTE_WRITE in the responder QP's PD, covering the range
#   (IBV_WC_REM_ACCESS_ERR otherwise; the responder's own reaction is not modelled). WITH IMM
#   consumes a receive WR of the responder and completes it with the immediate data; with none
#   posted, the requester waits (RNR retries).
# - Destroying a QP generates no completion; what it had outstanding is dropped (recorded here as
#   `unflushed`), and its completions still in a CQ are removed (as mlx5 cleans its CQs).
# - MR registration pins memory against the locked-memory limit: past it, ENOMEM.
# - Completion channels (ibv_comp_channel): a CQ armed with req_notify raises one event on its
#   channel at its next completion, then is disarmed; get_cq_event takes one event and fails on
#   another CQ's; every event must be acked before the CQ is destroyed (ibv_destroy_cq waits for
#   it: here, an AssertionError), and a channel with a CQ on it cannot be destroyed (EBUSY). The
#   event files are non-blocking pipes here: an empty one raises EAGAIN, as rdma-core's does.
# - A CQ holds `cqe` completions: one more overruns it (counted in `overruns`, the completion lost)
#   and raises IBV_EVENT_CQ_ERR on the context's async event queue.
# - Async events queue on the context and are read with get_async_event; like pyverbs' AsyncEvent
#   they carry the event type only (no QP number). QP.query reports the QP's state.
# - Not modelled: timing, retries and their exhaustion, a QP moved to ERR by the device itself
#   (tests do it, then raise the event).

@dataclass
class FakeNic:
    """One device as get_device_list, query_port and the GID table show it."""
    name: str = "mlx5_0"
    transport: int = 0  # IBV_TRANSPORT_IB (InfiniBand and RoCE alike); IWARP 1; EFA reports UNSPECIFIED (4)
    link_layer: int = 1  # IBV_LINK_LAYER_INFINIBAND; ETHERNET 2
    mtu: int = 5  # IBV_MTU_4096
    lid: int = 7
    gids: list = field(default_factory=lambda: [("fe80::2:c903:1:2", "IB/RoCE v1")])  # (gid, sysfs type) | None
    rc: bool = True  # the provider creates RC QPs (EFA's refuses: only UD and its own SRD)


ROCE = FakeNic(name="mlx5_1", link_layer=2, lid=0, gids=[
    ("fe80::a288:c2ff:fe01:2", "IB/RoCE v1"), ("fe80::a288:c2ff:fe01:2", "RoCE v2"),
    ("::ffff:10.0.0.1", "IB/RoCE v1"), ("::ffff:10.0.0.1", "RoCE v2"), None])


class FakeFabric:
    """The wire between fake devices: QPs by number, MRs by key."""

    def __init__(self, move_bytes: bool = True):
        self.qps: dict[int, FakeQP] = {}
        self.mrs: dict[int, FakeMR] = {}
        self.next_qpn, self.next_key = 100, 1000
        self.move_bytes = move_bytes  # off for writes of GiBs from torch.empty tensors (never touched)
        self.closed_in_use = 0  # MRs deregistered while an outstanding WR still named them

    def key(self) -> int:
        self.next_key += 1
        return self.next_key


class EventFile:
    """An event file (a completion channel's, a context's async queue): readable while events wait."""

    def __init__(self):
        self.event_fd, self._w = os.pipe()
        os.set_blocking(self.event_fd, False)

    def fire(self) -> None:
        os.write(self._w, b"x")

    def take(self, what: str) -> None:
        try:
            os.read(self.event_fd, 1)
        except BlockingIOError:
            raise PyverbsRDMAError(f"Failed to get {what}", errno.EAGAIN) from None

    def close_file(self) -> None:
        if self._w >= 0:
            os.close(self.event_fd)
            os.close(self._w)
            self._w = -1


class FakeAsyncEvent:
    def __init__(self, ctx: "FakeContext", event_type: int):
        self.ctx, self.event_type = ctx, event_type

    def ack(self):
        self.ctx.acked += 1


class FakeContext(EventFile):
    def __init__(self, fake: "FakePyverbs", name: str):
        super().__init__()
        self.fake, self.nic, self.closed = fake, next(n for n in fake.nics if n.name == name), False
        self.events: list[int] = []
        self.acked = 0
        fake.contexts.append(self)

    def raise_event(self, event_type: int) -> None:
        """As the device does: queue an async event."""
        self.events.append(event_type)
        self.fire()

    def get_async_event(self):
        self.take("async event")
        return FakeAsyncEvent(self, self.events.pop(0))

    def query_device(self):
        return types.SimpleNamespace(phys_port_cnt=1)

    def query_port(self, port: int):
        n = self.nic
        return types.SimpleNamespace(state=e.IBV_PORT_ACTIVE, lid=n.lid, active_mtu=n.mtu, link_layer=n.link_layer,
                                     gid_tbl_len=len(n.gids))

    def query_gid(self, port: int, index: int) -> GID:
        slot = self.nic.gids[index]
        return GID(ipaddress_exploded(slot[0] if slot else "::"))

    def query_gid_type(self, port: int, index: int) -> int:
        slot = self.nic.gids[index]
        if slot is None:
            raise PyverbsRDMAError(f"Failed to query gid type of port {port} and gid index {index}", errno.EINVAL)
        return {"IB/RoCE v1": e.IBV_GID_TYPE_SYSFS_IB_ROCE_V1, "RoCE v2": e.IBV_GID_TYPE_SYSFS_ROCE_V2}[slot[1]]

    def close(self):
        self.closed = True
        self.close_file()


def ipaddress_exploded(text: str) -> str:
    return ipaddress.IPv6Address(text).exploded


class FakePD:
    def __init__(self, ctx: FakeContext):
        self.ctx, self.closed = ctx, False

    def close(self):
        self.closed = True


class FakeCompChannel(EventFile):
    def __init__(self, ctx: FakeContext):
        super().__init__()
        self.cqs: list[FakeCQ] = []
        self.fired: list[FakeCQ] = []

    def get_cq_event(self, expected_cq: "FakeCQ"):
        self.take("CQ event")
        cq = self.fired.pop(0)
        if cq is not expected_cq:  # (the event is consumed all the same, as in pyverbs)
            raise PyverbsRDMAError("Received event on an unexpected CQ")
        cq.num_events += 1

    def close(self):
        if any(not cq.closed for cq in self.cqs):
            raise PyverbsRDMAError("Failed to destroy a completion channel", errno.EBUSY)
        self.close_file()


class FakeCQ:
    def __init__(self, ctx, cqe, cq_context=None, channel=None, comp_vector=0):
        self.ctx, self.cqe, self.channel = ctx, cqe, channel
        self.wcs: list[WC] = []
        self.delivered = 0  # completions polled, for counting signalled WRs
        self.polls = 0
        self.armed, self.num_events, self.acked, self.overruns, self.closed = False, 0, 0, 0, False
        if channel is not None:
            channel.cqs.append(self)

    def push(self, wc: WC) -> None:
        """The device writes a completion (or overruns the CQ); an armed CQ raises its event."""
        if len(self.wcs) >= self.cqe:
            self.overruns += 1
            if self.overruns == 1:
                self.ctx.raise_event(e.IBV_EVENT_CQ_ERR)
            return
        self.wcs.append(wc)
        if self.armed and self.channel is not None:
            self.armed = False
            self.channel.fired.append(self)
            self.channel.fire()

    def req_notify(self, solicited_only: bool = False):
        self.armed = True

    def ack_events(self, num_events: int):
        self.acked += num_events

    def poll(self, num_entries: int = 1):
        self.polls += 1
        out, self.wcs = self.wcs[:num_entries], self.wcs[num_entries:]
        self.delivered += len(out)
        return len(out), out

    def close(self):
        assert self.acked == self.num_events, "ibv_destroy_cq waits for every CQ event to be acked: it would hang"
        self.closed = True


class FakeMR:
    def __init__(self, fake: "FakePyverbs", pd: FakePD, length: int, access: int, address: int | None = None):
        if fake.memlock is not None and fake.locked + length > fake.memlock:
            raise PyverbsRDMAError(f"Failed to register a MR. length: {length}, access flags: {access}", errno.ENOMEM)
        if address is None:  # pyverbs allocates the buffer itself
            self._buf = ctypes.create_string_buffer(length)
            address = ctypes.addressof(self._buf)
        self.fake, self.pd, self.buf, self.length, self.access = fake, pd, address, length, access
        self.lkey = self.rkey = fake.fabric.key()
        fake.fabric.mrs[self.lkey] = self
        fake.locked += length
        fake.registered.append((address, length))
        self.closed = False

    def covers(self, addr: int, n: int) -> bool:
        return self.buf <= addr and addr + n <= self.buf + self.length

    def close(self):
        if self.closed:
            return
        fabric = self.fake.fabric
        if any(lkey == self.lkey for qp in fabric.qps.values() if not qp.closed for wr in qp.sq
               for _, _, lkey in getattr(wr, "sges", ())):
            fabric.closed_in_use += 1
        del fabric.mrs[self.lkey]
        self.fake.locked -= self.length
        self.closed = True


class FakeQP:
    def __init__(self, fake: "FakePyverbs", pd: FakePD, init, scq: FakeCQ, rcq: FakeCQ):
        if not pd.ctx.nic.rc and init.qp_type == e.IBV_QPT_RC:
            raise PyverbsRDMAError("Failed to create QP", errno.EOPNOTSUPP)
        fabric = fake.fabric
        self.fake, self.pd, self.scq, self.rcq = fake, pd, scq, rcq
        self.sig_all, self.max_send_wr = init.sq_sig_all, init.cap.max_send_wr
        self.qp_num, fabric.next_qpn = fabric.next_qpn, fabric.next_qpn + 1
        fabric.qps[self.qp_num] = self
        self.state, self.states, self.closed = e.IBV_QPS_RESET, ["RESET"], False
        self.sq: list = []  # posted send WRs not yet completed (or held)
        self.rq: list = []  # posted receive WRs not yet consumed
        self.posted: list = []  # every send WR posted, for the tests
        self.hold, self.dest, self.mtu, self.unflushed = fake.hold, None, None, None

    @property
    def recvs(self) -> int:
        return len(self.rq)

    def modify(self, attr, mask):
        if self.closed:
            raise PyverbsRDMAError("Failed to modify QP state", errno.EINVAL)
        to = attr.qp_state
        allowed = {e.IBV_QPS_INIT: e.IBV_QPS_RESET, e.IBV_QPS_RTR: e.IBV_QPS_INIT, e.IBV_QPS_RTS: e.IBV_QPS_RTR}
        if to == e.IBV_QPS_ERR:
            return self._error()
        if allowed.get(to) != self.state:
            raise PyverbsRDMAError(f"Failed to modify QP state to {to}", errno.EINVAL)
        if to == e.IBV_QPS_RTR:
            self.dest, self.mtu = attr.dest_qp_num, attr.path_mtu
        self.state = to
        self.states.append({e.IBV_QPS_INIT: "INIT", e.IBV_QPS_RTR: "RTR", e.IBV_QPS_RTS: "RTS"}[to])

    def post_recv(self, wr):
        if self.closed or self.state == e.IBV_QPS_RESET:
            raise PyverbsRDMAError("Failed to post recv", errno.EINVAL)
        if self.state == e.IBV_QPS_ERR:
            return self._complete(self.rcq, wr.wr_id, e.IBV_WC_WR_FLUSH_ERR)
        self.rq.append(wr)

    def post_send(self, wr):
        fake = self.fake
        if fake.fail_post_at is not None:
            fake.fail_post_at -= 1
            if fake.fail_post_at < 0:
                fake.fail_post_at = None
                raise PyverbsRDMAError("Failed to post send", errno.ENOMEM)
        if self.closed or self.state < e.IBV_QPS_RTS:  # (ERR, 6, is past RTS: posts are flushed)
            raise PyverbsRDMAError("Failed to post send", errno.EINVAL)
        if len(self.sq) >= self.max_send_wr:
            raise PyverbsRDMAError("Failed to post send", errno.ENOMEM)
        self.posted.append(wr)
        if self.state == e.IBV_QPS_ERR:
            return self._complete(self.scq, wr.wr_id, e.IBV_WC_WR_FLUSH_ERR)
        self.sq.append(wr)
        self.run()

    def release(self) -> None:
        """A held QP's peer answers again: its queued WRs execute."""
        self.hold = False
        self.run()

    def run(self) -> None:
        while self.sq and not self.hold and self.state == e.IBV_QPS_RTS:
            wr = self.sq[0]
            status = self._execute(wr)
            if status is None:  # receiver not ready (no receive WR): the requester keeps retrying
                return
            self.sq.pop(0)
            if status != e.IBV_WC_SUCCESS:
                self._complete(self.scq, wr.wr_id, status)
                return self._error()
            if wr.send_flags & e.IBV_SEND_SIGNALED or self.sig_all:
                self._complete(self.scq, wr.wr_id, status)

    def _execute(self, wr) -> int | None:
        fabric = self.fake.fabric
        peer = fabric.qps.get(self.dest)
        if peer is None or peer.closed or peer.state not in (e.IBV_QPS_RTR, e.IBV_QPS_RTS):
            return e.IBV_WC_RETRY_EXC_ERR  # nobody answers: the transport retries run out
        imm = wr.opcode == e.IBV_WR_RDMA_WRITE_WITH_IMM
        if imm and not peer.rq:
            return None
        if getattr(wr, "sges", None) is not None:  # recorded (RecordedSendWR): the memory checks apply
            status = self._access(wr, peer)
            if status != e.IBV_WC_SUCCESS:
                return status
        if imm:
            recv = peer.rq.pop(0)
            peer.rcq.push(WC(wr_id=recv.wr_id, status=e.IBV_WC_SUCCESS, opcode=e.IBV_WC_RECV_RDMA_WITH_IMM,
                                   qp_num=peer.qp_num, imm_data=wr.imm_data, wc_flags=e.IBV_WC_WITH_IMM))
        return e.IBV_WC_SUCCESS

    def _access(self, wr, peer: "FakeQP") -> int:
        """The lkey's MR locally, the rkey's at the responder; then the bytes move."""
        fabric, ((addr, n, lkey),), (rkey, raddr) = self.fake.fabric, wr.sges, wr.rdma
        local = fabric.mrs.get(lkey)
        if local is None or local.pd is not self.pd or not local.covers(addr, n):
            return e.IBV_WC_LOC_PROT_ERR
        remote = fabric.mrs.get(rkey)
        if (remote is None or remote.pd is not peer.pd or not remote.access & e.IBV_ACCESS_REMOTE_WRITE
                or not remote.covers(raddr, n)):
            return e.IBV_WC_REM_ACCESS_ERR
        if fabric.move_bytes:
            ctypes.memmove(raddr, addr, n)
        return e.IBV_WC_SUCCESS

    def _complete(self, cq: FakeCQ, wr_id: int, status: int) -> None:
        cq.push(WC(wr_id=wr_id, status=status, qp_num=self.qp_num))

    def query(self, attr_mask: int):
        return types.SimpleNamespace(qp_state=self.state), None

    def _error(self) -> None:
        """ERR: every outstanding WR of both queues completes with a flush error, signalled or not."""
        self.state = e.IBV_QPS_ERR
        self.states.append("ERR")
        for wr in self.sq:
            self._complete(self.scq, wr.wr_id, e.IBV_WC_WR_FLUSH_ERR)
        for wr in self.rq:
            self._complete(self.rcq, wr.wr_id, e.IBV_WC_WR_FLUSH_ERR)
        self.sq, self.rq = [], []

    def close(self):
        if self.closed:
            return
        self.closed, self.unflushed = True, len(self.sq) + len(self.rq)
        self.states.append("destroyed")
        for cq in {id(self.scq): self.scq, id(self.rcq): self.rcq}.values():
            cq.wcs = [wc for wc in cq.wcs if wc.qp_num != self.qp_num]


class FakePyverbs:
    """rdma._pyverbs() for one process: its devices, its locked-memory limit (None: unlimited)."""

    def __init__(self, fabric: FakeFabric, nics: list[FakeNic] | None = None, memlock: int | None = None):
        self.fabric, self.nics, self.memlock = fabric, nics or [FakeNic()], memlock
        self.contexts: list[FakeContext] = []
        self.locked, self.registered = 0, []
        self.hold = False  # QPs made from now on queue their WRs without executing them
        self.fail_post_at: int | None = None  # post_send calls from now on that succeed before one fails

    def get_device_list(self):
        return [types.SimpleNamespace(name=n.name.encode(), transport_type=n.transport, node_type=1) for n in self.nics]

    def Context(self, name: str):  # noqa: N802 (pyverbs' names)
        return FakeContext(self, name)

    def PD(self, ctx):  # noqa: N802
        return FakePD(ctx)

    def CQ(self, ctx, cqe, cq_context=None, channel=None, comp_vector=0):  # noqa: N802
        return FakeCQ(ctx, cqe, cq_context, channel, comp_vector)

    def CompChannel(self, ctx):  # noqa: N802
        return FakeCompChannel(ctx)

    @staticmethod
    def with_event_fd(make):
        """rdma._with_event_fd finds the descriptor in /proc; the fakes carry theirs."""
        obj = make()
        return obj, obj.event_fd

    def MR(self, pd, length, access, address=None):  # noqa: N802
        return FakeMR(self, pd, length, access, address)

    def create_qp(self, pd, scq, rcq, e):
        # The attributes are what the plane's own qp_init_attr builds, a real pyverbs QPInitAttr
        # (sq_sig_all included), without the CQs: pyverbs takes only its own CQ objects in it.
        return FakeQP(self, pd, qp_init_attr(e), scq, rcq)


class FakeDevice(DeviceLayer):
    """The real DeviceLayer over the fake pyverbs layer; `made`: the QPs the plane asked for."""

    def __init__(self, fabric: FakeFabric, mtu: int, nic: FakeNic | None = None, memlock: int | None = None,
                 cq_depth: int = CQ_DEPTH):
        self.fabric, self.made = fabric, []
        self.fake = FakePyverbs(fabric, [nic or FakeNic(mtu=mtu)], memlock)
        super().__init__(RdmaOptions(), e, api=self.fake, cq_depth=cq_depth)

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self.fake.contexts)

    def new_qp(self, e):
        self.made.append(super().new_qp(e))
        return self.made[-1]


def fake_api(fabric: FakeFabric, nics: list[FakeNic] | None = None, memlock: int | None = None) -> Callable[[], Any]:
    """A stand-in for rdma._pyverbs (monkeypatched): every call gives the same fake process."""
    fake = FakePyverbs(fabric, nics, memlock)
    return lambda: fake


class RecordedSendWR(SendWR):
    """pyverbs' SendWR, keeping what the fake device reads back: pyverbs exposes neither its SGEs nor
    its RDMA address. Installed for this module's tests; unrecorded WRs skip the memory checks."""

    def __init__(self, *args, sg=None, **kwargs):
        super().__init__(*args, sg=sg, **kwargs)
        self.sges = [(s.addr, s.length, s.lkey) for s in sg or []]
        self.rdma = (0, 0)

    def set_wr_rdma(self, rkey, addr):
        super().set_wr_rdma(rkey, addr)
        self.rdma = (rkey, addr)


@pytest.fixture(autouse=True)
def _recorded_wrs(monkeypatch):
    import pyverbs.wr

    monkeypatch.setattr(pyverbs.wr, "SendWR", RecordedSendWR)


@pytest.fixture
async def fake_pair():
    fabric, done = FakeFabric(), []
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, on_complete=done.append, device_layer=FakeDevice(fabric, e.IBV_MTU_1024))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    yield a, b, done
    await a.close()
    await b.close()


async def _idle(a: VerbsDataPlane) -> bool:
    """Nothing pending, once the loop has handled the last completions: no write, landing or drain,
    and no WR holding room in a queue. (Fails, naming it, if that never comes.)"""
    return await until(lambda: not a._sends and not a._waiters and not a._draining and a._cq_used == 0
                       and not any(a._sq_used.values()), "nothing pending", timeout=5)


def _drained(qp: FakeQP) -> bool:
    """Moved to ERR, every outstanding WR flushed, then destroyed."""
    return qp.closed and qp.unflushed == 0 and qp.states[-2:] == ["ERR", "destroyed"]


def test_roce_setup_picks_the_routable_v2_gid_by_its_sysfs_type_fake_device():
    """#34.1: query_gid_type's values are the sysfs enum; compared with ibv_gid_type's ROCE_V2 (2)
    no GID ever matched and every RoCE host fell back to tcp."""
    dev = DeviceLayer(RdmaOptions(), e, api=fake_api(FakeFabric(), [ROCE])())
    assert (dev.gid_index, dev.gid) == (3, "0000:0000:0000:0000:0000:ffff:0a00:0001")
    dev.close()
    ib = DeviceLayer(RdmaOptions(), e, api=fake_api(FakeFabric())())
    assert (ib.gid_index, ib.lid) == (0, 7)
    ib.close()


async def test_write_completes_on_the_receivers_write_with_imm_fake_device(fake_pair):
    a, b, done = fake_pair
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    handle = b.register(dst)
    await a.write(torch.full((4096,), 1, dtype=torch.uint8), handle, 0, 4096, "latency", notify={"layer": 1})
    await a.write(torch.full((4096,), 2, dtype=torch.uint8), handle, 4096, 4096, "latency", notify={"layer": 2})
    assert done == [{"layer": 1}, {"layer": 2}]
    assert dst[:4096].eq(1).all() and dst[4096:8192].eq(2).all() and not dst[8192:].any()  # at rkey's address + offset
    qp = a.dev.made[0]
    assert [w.opcode for w in qp.posted] == [e.IBV_WR_RDMA_WRITE_WITH_IMM] * 2
    assert [w.imm_data for w in qp.posted] == [1, 2]  # the sequence number the receiver waits for
    assert qp.mtu == b.dev.fabric.qps[qp.dest].mtu == e.IBV_MTU_1024  # the smaller active MTU
    peer = b.accepted[qp.dest]
    assert peer.recvs == RECV_DEPTH  # receive WRs reposted as they are consumed
    assert a.links() == {f"127.0.0.1:{b.port}": "verbs"} and await _idle(a) and await _idle(b)


async def test_a_write_over_1_gib_completes_on_its_last_piece_only_fake_device():
    """#34.3: only the last WR of a write is signalled (sq_sig_all=0): one completion per write, and
    a failure of the last piece fails the write at once, not after its timeout."""
    fabric, done = FakeFabric(move_bytes=False), []  # torch.empty GiBs: never touched
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, on_complete=done.append, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        n = MAX_WR_BYTES + 4096
        src, handle = torch.empty(n, dtype=torch.uint8), b.register(torch.empty(n, dtype=torch.uint8))
        await a.write(src, handle, 0, n, "bulk", notify="big")
        qp = a.dev.made[0]
        assert [(w.opcode, w.send_flags) for w in qp.posted] == [(e.IBV_WR_RDMA_WRITE, 0), (
            e.IBV_WR_RDMA_WRITE_WITH_IMM, e.IBV_SEND_SIGNALED)]
        assert done == ["big"] and a.dev.cq.delivered == 1  # the first piece completed silently

        b.dev.fabric.mrs[handle["rkey"]].length = MAX_WR_BYTES  # now the last piece is out of the rkey's range
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(TransferError, match=f"work completion status {e.IBV_WC_REM_ACCESS_ERR}"):
            await a.write(src, handle, 0, n, "bulk", notify="cut", timeout=4.0)
        assert asyncio.get_running_loop().time() - t0 < 3.0 and done == ["big"] and not a.qps
        await until(lambda: qp.closed, "the failed QP is retired")  # (in the background: no WR of the write is left)
        assert _drained(qp)
    finally:
        await a.close()
        await b.close()


async def test_a_cancelled_write_returns_once_its_wrs_are_flushed_fake_device(fake_pair):
    """#34.3: a cancelled write must not leave its source thought idle while its WRs are in flight:
    its QP is moved to ERR and drained first, and only then is the temporary MR deregistered."""
    a, b, done = fake_pair
    handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
    a.dev.fake.hold = True  # the peer does not answer: WRs stay queued
    task = asyncio.create_task(a.write(torch.ones(4096, dtype=torch.uint8), handle, 0, 4096, "bulk", timeout=30))
    await until(lambda: a.dev.made and a.dev.made[0].sq, "the write is posted")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    qp = a.dev.made[0]
    assert _drained(qp) and a.dev.fabric.closed_in_use == 0 and not a.qps and done == []


async def test_no_completion_times_out_drains_the_qp_and_leaves_nothing_pending_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.fake.hold = True
    with pytest.raises(TransferError, match="timed out"):
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", timeout=0.3)
    assert _drained(a.dev.made[0]) and a.dev.fabric.closed_in_use == 0
    assert await _idle(a) and done == []


async def test_concurrent_first_writes_make_one_qp_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
    src = torch.ones(100, dtype=torch.uint8)
    await asyncio.gather(*(a.write(src, handle, 100 * i, 100, "bulk", notify=i) for i in range(8)))
    assert sorted(done) == list(range(8)) and len(a.dev.made) == 1 and len(b.accepted) == 1


async def test_failed_post_leaves_nothing_pending_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.fake.fail_post_at = 0
    with pytest.raises(TransferError, match="post_send failed"):
        await asyncio.wait_for(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk"), 5)
    assert await _idle(a) and not a.qps and _drained(a.dev.made[0]) and done == []
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="again")
    assert done == ["again"] and len(a.dev.made) == 2  # a fresh QP after the failed one


async def test_a_post_failing_mid_write_drains_the_pieces_already_posted_fake_device():
    """The first 1 GiB piece is posted (unsignalled: no completion of its own), the second post
    fails: the write returns only after the QP flushed that piece, then frees the source MR."""
    fabric = FakeFabric(move_bytes=False)
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        n = MAX_WR_BYTES + 10
        handle = b.register(torch.empty(n, dtype=torch.uint8))
        a.dev.fake.hold, a.dev.fake.fail_post_at = True, 1
        with pytest.raises(TransferError, match="post_send failed"):
            await a.write(torch.empty(n, dtype=torch.uint8), handle, 0, n, "bulk", timeout=5)
        qp = a.dev.made[0]
        piece, marker = qp.posted  # the marker: posted in ERR after the flush, completed last
        assert (piece.opcode, marker.wr_id) == (e.IBV_WR_RDMA_WRITE, DRAIN_WR_ID)
        assert _drained(qp) and fabric.closed_in_use == 0
    finally:
        await a.close()
        await b.close()


async def test_a_failed_write_retires_its_own_qp_only_fake_device(fake_pair):
    """#34.4: the failed QP goes to ERR, is drained and destroyed; a handler of a write that failed
    on it and runs late must not retire the fresh QP made under the same key since."""
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="first")
    (key,), first = list(a.qps), a.dev.made[0]
    gone = b.register(torch.zeros(4096, dtype=torch.uint8))
    b.release(gone)  # its rkey is deregistered: the WRITE fails with a remote access error
    with pytest.raises(TransferError, match="unknown or released"):
        await a.write(torch.ones(10, dtype=torch.uint8), gone, 0, 10, "bulk", timeout=5)
    await until(lambda: first.closed, "the failed QP is retired")
    assert _drained(first)
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="fresh")
    fresh = a.dev.made[1]
    a._drop_qp(key, first)  # another write's failure on the first QP, handled only now
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="again")
    assert done == ["first", "fresh", "again"] and not fresh.closed and len(a.dev.made) == 2
    assert a.qps[key][0] is fresh


async def test_a_receiving_qp_in_error_fails_its_landings_at_once_fake_device(fake_pair):
    """Its flushed receives carry no immediate data: the landing waiting on that QP fails with the
    flush status (not after its timeout), nothing is filed under a made-up sequence number, and the
    QP is retired; the writer's write fails and its own QP is drained."""
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.fake.hold = True  # the WRITE WITH IMM never arrives
    t0 = asyncio.get_running_loop().time()
    task = asyncio.create_task(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", timeout=20))
    await until(lambda: b._waiters, "the receiver waits for the landing")
    (theirs,) = b.dev.made
    theirs.modify(*err_attr(e))  # as after a fatal error on the receiver's QP
    with pytest.raises(TransferError):
        await task
    assert asyncio.get_running_loop().time() - t0 < 5 and done == []
    await until(lambda: theirs.closed, "the receiver retires its failed QP")
    assert _drained(theirs) and not b.accepted and not b._arrived and _drained(a.dev.made[0])


async def test_released_handle_and_short_source_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    b.release(handle)
    with pytest.raises(TransferError, match="unknown or released"):
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "latency", timeout=5)
    live = b.register(torch.zeros(4096, dtype=torch.uint8))
    with pytest.raises(ValueError, match="source has 10 bytes"):
        await a.write(torch.ones(10, dtype=torch.uint8), live, 0, 100, "latency")
    assert await _idle(a) and done == []


async def test_close_drains_and_destroys_every_qp_and_closes_the_device_fake_device():
    """#34.4: at close, a QP with a write in flight (ours) and one with receive WRs posted (the
    peer's) are moved to ERR and drained before they are destroyed."""
    fabric, done = FakeFabric(), []
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, on_complete=done.append, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk")
    (ours,), (theirs,) = a.dev.made, b.dev.made
    ours.hold = True
    stuck = asyncio.create_task(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", timeout=30))
    await until(lambda: ours.sq, "the second write is posted")
    await a.close()
    with pytest.raises(TransferError):
        await stuck
    await b.close()
    assert _drained(ours) and _drained(theirs) and b.dev.rcq.delivered >= RECV_DEPTH  # its receives flushed
    assert a.dev.closed and b.dev.closed and not b.accepted and not b.mrs and fabric.closed_in_use == 0


# -- choosing the backend: setup tries what the plane needs -------------------------------------

def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _next_after_verbs() -> str:
    from dualpath.transport import AUTO_ORDER, available_backends

    have = available_backends()
    return next(b for b in AUTO_ORDER[1:] if b in have)


def test_verbs_that_cannot_start_fall_back_to_tcp_with_one_warning(monkeypatch, caplog):
    """A configured device that is not there: one warning, tcp."""
    import dualpath.transport.rdma as v

    monkeypatch.setattr(v, "_pyverbs", fake_api(FakeFabric()))
    with caplog.at_level(logging.WARNING):
        dp = make_dataplane("verbs", "x", TOKEN, rdma=RdmaOptions(device="mlx5_9"))
    assert dp.backend == "tcp" and dp.links() == {}
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "mlx5_9" in warnings[0] and "using tcp" in warnings[0]


@pytest.mark.parametrize("nic, why", [
    (FakeNic(name="iwp0", transport=1, link_layer=2, gids=ROCE.gids), "iWARP device.*rdma_cm"),
    (FakeNic(name="efa_0", transport=4, link_layer=0, rc=False), "neither InfiniBand nor RoCE"),
    (FakeNic(name="mlx5_2", rc=False), "cannot create an RC queue pair"),
])
def test_auto_takes_verbs_only_where_an_rc_qp_can_be_made_fake_device(monkeypatch, caplog, nic, why):
    """#34.2: iWARP (connects through rdma_cm only), EFA (no RC QPs) and a device refusing an RC QP
    are tried at setup and passed over with one warning saying why; what was opened is closed."""
    import dualpath.transport.rdma as v

    api = fake_api(FakeFabric(), [nic])
    monkeypatch.setattr(v, "_pyverbs", api)
    with caplog.at_level(logging.WARNING):
        dp = make_dataplane("auto", "x", TOKEN)
    assert dp.backend == _next_after_verbs()
    (warning,) = _warnings(caplog)
    assert re.search(why, warning) and nic.name in warning and f"using {dp.backend}" in warning
    assert all(c.closed for c in api().contexts)


async def test_setup_takes_the_first_device_it_can_drive_fake_device(monkeypatch):
    import dualpath.transport.rdma as v

    monkeypatch.setattr(v, "_pyverbs", fake_api(FakeFabric(), [FakeNic(name="efa_0", transport=4), FakeNic()]))
    dp = make_dataplane("auto", "x", TOKEN)
    assert dp.backend == "verbs" and dp.dev.ctx.nic.name == "mlx5_0"
    await dp.close()


async def test_auto_registers_the_buffer_at_setup_and_passes_over_verbs_past_the_memlock_limit_fake_device(
        monkeypatch, caplog):
    """#34.2: a buffer past the locked-memory limit picks another backend at setup (one warning);
    within it, verbs is picked and the engine's register() of that buffer uses the MR made then."""
    import dualpath.transport.rdma as v

    buffer = torch.zeros(1 << 20, dtype=torch.uint8)
    monkeypatch.setattr(v, "_pyverbs", fake_api(FakeFabric(), memlock=64 << 10))  # a container's default
    with caplog.at_level(logging.WARNING):
        dp = make_dataplane("auto", "x", TOKEN, register_first=buffer)
    (warning,) = _warnings(caplog)
    assert dp.backend == _next_after_verbs() and "register" in warning and "locked-memory limit" in warning

    api = fake_api(FakeFabric())
    monkeypatch.setattr(v, "_pyverbs", api)
    dp = make_dataplane("auto", "x", TOKEN, register_first=buffer)
    assert dp.backend == "verbs"
    handle = dp.register(buffer, granted_only=True)
    assert "rkey" in handle and [n for _, n in api().registered].count(buffer.numel()) == 1
    await dp.close()
    assert api().locked == 0


async def test_a_region_that_cannot_be_registered_is_written_over_tcp_fake_device(caplog):
    """#34.2: a registration failing after setup (memlock) no longer stops the engine: one warning,
    and writes into that region go over tcp."""
    fabric, done = FakeFabric(), []
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, on_complete=done.append,
                       device_layer=FakeDevice(fabric, e.IBV_MTU_4096, memlock=64 << 10))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    try:
        dst = torch.zeros(1 << 20, dtype=torch.uint8)
        with caplog.at_level(logging.WARNING):
            handle = b.register(dst)
        (warning,) = _warnings(caplog)
        assert "rkey" not in handle and "go over tcp" in warning and "locked-memory limit" in warning
        await a.write(torch.ones(4096, dtype=torch.uint8), handle, 100, 4096, "bulk", notify="tcp")
        assert done == ["tcp"] and dst[100:4196].eq(1).all() and b.bytes_received == 4096 and not a.dev.made
    finally:
        await a.close()
        await b.close()


def test_rdma_options_come_from_cluster_toml(tmp_path):
    from dualpath.config import ConfigError, dump_config, load_config, local_cluster

    cfg = local_cluster()
    text = dump_config(cfg).replace("rdma_gid_index = -1", "rdma_gid_index = 3").replace(
        'rdma_device = ""', 'rdma_device = "mlx5_1"')
    (tmp_path / "c.toml").write_text(text)
    t = load_config(tmp_path / "c.toml").transport
    assert (t.rdma_device, t.rdma_gid_index, t.rdma_port, t.rdma_hop_limit) == ("mlx5_1", 3, 0, 64)
    (tmp_path / "bad.toml").write_text(text.replace("rdma_hop_limit = 64", "rdma_hop_limit = 0"))
    with pytest.raises(ConfigError, match="rdma_hop_limit"):
        load_config(tmp_path / "bad.toml")


# -- completions by event, back-pressure, async events (#34) -----------------------------------

async def _plane(fabric: FakeFabric, name: str, done: list | None = None, **device) -> VerbsDataPlane:
    plane = VerbsDataPlane(name, TOKEN, on_complete=(done.append if done is not None else None),
                           device_layer=FakeDevice(fabric, e.IBV_MTU_4096, **device))
    await plane.start("127.0.0.1")
    return plane


async def test_completions_come_through_armed_channels_one_poll_per_event_fake_device(fake_pair):
    """#34.6: no loop polls the CQs while writes wait; each completion event is acked, the CQ
    re-armed, and the CQ polled empty once."""
    a, b, done = fake_pair
    handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
    for i in range(5):
        await a.write(torch.ones(4096, dtype=torch.uint8), handle, 4096 * i, 4096, "bulk", notify=i)
    assert done == list(range(5))
    for cq in (a.dev.cq, b.dev.rcq):
        assert cq.num_events >= 1 and cq.acked == cq.num_events and cq.armed
        assert cq.polls == cq.num_events  # one poll per event: fewer than POLL_BATCH completions each
    assert a.dev.cq.delivered == 5 and await _idle(a)


async def test_writes_wait_for_room_in_the_send_cq_instead_of_overrunning_it_fake_device():
    """#34.4: with a send CQ of 4 entries (one kept for a drain marker), 8 writes at once: 3 are
    posted, the others wait for their completions; none is lost and the CQ never overruns."""
    fabric, done = FakeFabric(), []
    a, b = await _plane(fabric, "a", cq_depth=4), await _plane(fabric, "b", done)
    try:
        handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
        a.dev.fake.hold = True  # the first WRs wait: the others must not be posted behind them
        writes = [asyncio.create_task(a.write(torch.ones(100, dtype=torch.uint8), handle, 100 * i, 100, "bulk",
                                              notify=i, timeout=30)) for i in range(8)]
        await until(lambda: a.dev.made and len(a.dev.made[0].sq) == 3, "three writes are posted")
        await loop_turns()  # the five others stay waiting for room: nothing completes while the WRs are held
        (qp,) = a.dev.made
        assert len(qp.posted) == 3 and a._cq_used == 3
        qp.release()
        await asyncio.gather(*writes)
        assert sorted(done) == list(range(8)) and len(qp.posted) == 8 and a.dev.cq.overruns == 0
        assert await _idle(a)
    finally:
        await a.close()
        await b.close()


async def test_a_receiver_refuses_qps_its_receive_cq_cannot_hold_and_the_writer_uses_tcp_fake_device(caplog):
    """#34.4: b's receive CQ holds one QP's receives (and a drain marker): its second QP (the
    latency class) is refused, and a writes that class over tcp; nothing overruns."""
    fabric, done = FakeFabric(), []
    a, b = await _plane(fabric, "a"), await _plane(fabric, "b", done, cq_depth=RECV_DEPTH + 1)
    try:
        dst = torch.zeros(1 << 16, dtype=torch.uint8)
        handle = b.register(dst)
        await a.write(torch.full((4096,), 1, dtype=torch.uint8), handle, 0, 4096, "bulk", notify="rdma")
        with caplog.at_level(logging.WARNING):
            await a.write(torch.full((4096,), 2, dtype=torch.uint8), handle, 4096, 4096, "latency", notify="tcp")
            await a.write(torch.full((4096,), 3, dtype=torch.uint8), handle, 8192, 4096, "latency", notify="tcp2")
        assert done == ["rdma", "tcp", "tcp2"] and b.bytes_received == 8192 and len(b.accepted) == 1
        assert dst[:4096].eq(1).all() and dst[4096:8192].eq(2).all() and dst[8192:12288].eq(3).all()
        (warning,) = _warnings(caplog)  # asked once, then tcp until QP_RETRY_AFTER
        assert "refused a queue pair" in warning and "receive CQ" in warning
        assert b.dev.rcq.overruns == 0 and len(a.dev.made) == 2  # (the refused QP was closed, never used)
    finally:
        await a.close()
        await b.close()


async def test_a_qp_fatal_event_retires_that_qp_only_and_the_next_write_gets_a_fresh_one_fake_device():
    """#34.4: the device puts a's QP to b in error and says so (the event names no QP): that QP is
    found by its state and retired; the QP to c stays, and the engine writes on."""
    fabric, done = FakeFabric(), []
    a, b, c = await _plane(fabric, "a"), await _plane(fabric, "b", done), await _plane(fabric, "c", done)
    try:
        to_b, to_c = b.register(torch.zeros(4096, dtype=torch.uint8)), c.register(torch.zeros(4096, dtype=torch.uint8))
        await a.write(torch.ones(10, dtype=torch.uint8), to_b, 0, 10, "bulk", notify="b")
        await a.write(torch.ones(10, dtype=torch.uint8), to_c, 0, 10, "bulk", notify="c")
        qp_b, qp_c = a.dev.made
        qp_b.state = e.IBV_QPS_ERR  # (nothing outstanding to flush)
        a.dev.ctx.raise_event(e.IBV_EVENT_QP_FATAL)
        await until(lambda: qp_b.closed, "the failed QP is retired")
        assert _drained(qp_b) and not qp_c.closed and a._down is None
        await a.write(torch.ones(10, dtype=torch.uint8), to_b, 0, 10, "bulk", notify="b again")
        assert done == ["b", "c", "b again"] and len(a.dev.made) == 3 and a.dev.ctx.acked == 1
    finally:
        for p in (a, b, c):
            await p.close()


async def test_port_down_fails_writes_in_flight_and_sends_later_ones_over_tcp_until_it_is_back_fake_device():
    fabric, done = FakeFabric(), []
    a, b = await _plane(fabric, "a"), await _plane(fabric, "b", done)
    try:
        handle = b.register(torch.zeros(4096, dtype=torch.uint8))
        a.dev.fake.hold = True
        stuck = asyncio.create_task(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", timeout=30))
        await until(lambda: a.dev.made and a.dev.made[0].sq, "a write is in flight")
        a.dev.ctx.raise_event(e.IBV_EVENT_PORT_ERR)
        with pytest.raises(TransferError):
            await stuck
        assert _drained(a.dev.made[0]) and done == []
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="tcp")
        assert done == ["tcp"] and b.bytes_received == 10 and len(a.dev.made) == 1
        a.dev.fake.hold = False
        a.dev.ctx.raise_event(e.IBV_EVENT_PORT_ACTIVE)
        await until(lambda: a._down is None, "the port is active again")
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="rdma")
        assert done == ["tcp", "rdma"] and b.bytes_received == 10 and len(a.dev.made) == 2
    finally:
        await a.close()
        await b.close()


async def test_a_cq_overrun_stops_rdma_for_good_and_the_engine_writes_on_over_tcp_fake_device():
    """The device's IBV_EVENT_CQ_ERR (here raised as an overrun would): every QP is retired and
    every later write, this port active or not, goes over tcp."""
    fabric, done = FakeFabric(), []
    a, b = await _plane(fabric, "a"), await _plane(fabric, "b", done)
    try:
        handle = b.register(torch.zeros(4096, dtype=torch.uint8))
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="rdma")
        a.dev.ctx.raise_event(e.IBV_EVENT_CQ_ERR)
        a.dev.ctx.raise_event(e.IBV_EVENT_PORT_ACTIVE)  # does not bring a fatal error back
        await until(lambda: a.dev.made[0].closed, "the QP is retired")
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="tcp")
        assert done == ["rdma", "tcp"] and b.bytes_received == 10 and a._down.startswith("fatal")
        assert a.links() == {f"127.0.0.1:{b.port}": "tcp"}
    finally:
        await a.close()
        await b.close()


async def test_a_landing_not_yet_arrived_does_not_hold_up_the_frames_behind_it_fake_device(fake_pair):
    """#34.3: the receiver awaits an RDMA landing beside its reading of the link, so a write whose
    WRITE WITH IMM has not arrived (or never will) does not stop the writes and notifies behind it."""
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.fake.hold = True
    rdma = asyncio.create_task(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="rdma",
                                       timeout=30))
    await until(lambda: b._waiters, "b waits for the RDMA write to land")
    over_link = a._write_over_link(torch.ones(10, dtype=torch.uint8), handle, 100, 10, "bulk", "tcp", 30)
    await asyncio.wait_for(over_link, 10)  # (a bound on a hang: the same bulk link, behind the landing)
    assert done == ["tcp"] and not rdma.done()
    a.dev.made[0].release()
    await rdma
    assert done == ["tcp", "rdma"] and await _idle(a)
