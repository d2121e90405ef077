"""The verbs backend without RDMA hardware: what pyverbs itself can check (imports, QP attribute
objects) runs on the installed rdma-core; the write, completion and error paths run against a fake
device layer (tests named *_fake_device), since no kernel here serves a QP. Nothing here proves
that bytes move on a fabric: examples/rdma_check.sh does that on a real host."""

from __future__ import annotations

import asyncio
import logging
import types

import pytest
import torch

from dualpath.transport import make_dataplane
from dualpath.transport.dataplane import TransferError
from dualpath.transport.verbs import (MAX_WR_BYTES, SERVICE_LEVEL, TRAFFIC_CLASS, RdmaOptions, VerbsDataPlane,
                                      _Enums, choose_gid, init_attr, rtr_attr, rts_attr, split_write)

pyverbs = pytest.importorskip("pyverbs", reason="python3-pyverbs (rdma-core) is not installed")
from dualpath.transport.verbs import enums  # noqa: E402

TOKEN = "t"
e = enums()


def test_enums_resolve_on_the_installed_rdma_core_and_class_qualified_names():
    assert e.IBV_QPS_RTR != e.IBV_QPS_INIT and e.IBV_GID_TYPE_ROCE_V2 != e.IBV_GID_TYPE_ROCE_V1

    class ibv_wr_opcode:  # rdma-core >= v59 with Cython >= 3.1: names only through their enum class
        IBV_WR_RDMA_WRITE_WITH_IMM = 1

    newer = _Enums(types.SimpleNamespace(ibv_wr_opcode=ibv_wr_opcode))
    assert newer.IBV_WR_RDMA_WRITE_WITH_IMM == 1
    with pytest.raises(AttributeError, match="no IBV_NOPE"):
        newer.IBV_NOPE


def test_qp_attribute_builders_give_pyverbs_objects_field_by_field():
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


def test_gid_choice_prefers_a_routable_roce_v2_gid():
    v1, v2 = e.IBV_GID_TYPE_ROCE_V1, e.IBV_GID_TYPE_ROCE_V2
    table = [(0, "fe80::1", v1), (1, "fe80::1", v2), (2, "::ffff:10.0.0.1", v1), (3, "::ffff:10.0.0.1", v2)]
    assert choose_gid(table, ethernet=True, e=e) == 3
    assert choose_gid(table[:2], ethernet=True, e=e) == 1  # only link-local: same-subnet RoCE v2
    assert choose_gid(table, ethernet=False, e=e) == 0
    with pytest.raises(TransferError, match="no RoCE v2 GID"):
        choose_gid([(0, "fe80::1", v1)], ethernet=True, e=e)


def test_writes_of_4_gib_and_more_split_below_the_32_bit_sge_length():
    pieces = split_write(1000, 5000, (5 << 30) + 7)
    assert len(pieces) == 6 and all(n <= MAX_WR_BYTES < 1 << 32 for _, _, n in pieces)
    assert sum(n for _, _, n in pieces) == (5 << 30) + 7
    assert pieces[1] == (1000 + MAX_WR_BYTES, 5000 + MAX_WR_BYTES, MAX_WR_BYTES)
    assert split_write(0, 0, 10) == [(0, 0, 10)]


# -- a fake device layer: QPs and CQs no kernel here can give ---------------------------------

class FakeFabric:
    def __init__(self):
        self.qps: dict[int, "FakeQP"] = {}
        self.next_qpn = 100


class FakeCQ:
    def __init__(self):
        self.wcs: list = []

    def poll(self, num_entries: int):
        out, self.wcs = self.wcs[:num_entries], self.wcs[num_entries:]
        return len(out), out

    def close(self):
        pass


class FakeQP:
    def __init__(self, dev: "FakeDevice"):
        self.dev, self.closed, self.posted, self.recvs, self.dest = dev, False, [], 0, None
        self.qp_num = dev.fabric.next_qpn
        dev.fabric.next_qpn += 1
        dev.fabric.qps[self.qp_num] = self

    def modify(self, attr, mask):
        if attr.qp_state == e.IBV_QPS_RTR:
            self.dest, self.mtu = attr.dest_qp_num, attr.path_mtu

    def post_recv(self, wr):
        self.recvs += 1

    def post_send(self, wr):
        if self.dev.fail_post:
            from pyverbs.pyverbs_error import PyverbsRDMAError

            raise PyverbsRDMAError("Failed to post send", 12)
        self.posted.append(wr)
        if wr.opcode == e.IBV_WR_RDMA_WRITE_WITH_IMM and not self.dev.silent:
            ok = types.SimpleNamespace(wr_id=wr.wr_id, status=e.IBV_WC_SUCCESS, qp_num=self.qp_num, imm_data=0)
            self.dev.cq.wcs.append(ok)
            peer = self.dev.fabric.qps[self.dest]
            peer.recvs -= 1
            peer.dev.rcq.wcs.append(types.SimpleNamespace(wr_id=peer.qp_num, status=e.IBV_WC_SUCCESS,
                                                          qp_num=peer.qp_num, imm_data=wr.imm_data))

    def close(self):
        self.closed = True


class FakeDevice:
    port, lid, gid, gid_index = 1, 0, "::ffff:127.0.0.1", 3

    def __init__(self, fabric: FakeFabric, mtu: int):
        self.fabric, self.active_mtu = fabric, mtu
        self.cq, self.rcq = FakeCQ(), FakeCQ()
        self.scratch = types.SimpleNamespace(buf=4096, lkey=1)
        self.made: list[FakeQP] = []
        self.fail_post = self.silent = self.closed = False

    def new_qp(self, e):
        self.made.append(FakeQP(self))
        return self.made[-1]

    def register(self, address, nbytes, access):
        return types.SimpleNamespace(rkey=7, lkey=8, close=lambda: None)

    def close(self):
        self.closed = True


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
    """Nothing pending, and the poller has ended (it notices on its next turn)."""
    await asyncio.sleep(0.01)
    return not a._sends and not a._waiters and (a._poller is None or a._poller.done())


async def test_write_completes_on_the_receivers_write_with_imm_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
    await a.write(torch.ones(4096, dtype=torch.uint8), handle, 0, 4096, "latency", notify={"layer": 1})
    await a.write(torch.ones(4096, dtype=torch.uint8), handle, 4096, 4096, "latency", notify={"layer": 2})
    assert done == [{"layer": 1}, {"layer": 2}]
    qp = a.dev.made[0]
    assert [w.opcode for w in qp.posted] == [e.IBV_WR_RDMA_WRITE_WITH_IMM] * 2
    assert [w.imm_data for w in qp.posted] == [1, 2]  # the sequence number the receiver waits for
    assert qp.mtu == b.dev.fabric.qps[qp.dest].mtu == e.IBV_MTU_1024  # the smaller active MTU
    peer = b.accepted[qp.dest]
    assert peer.recvs > 0  # receive WRs reposted as they are consumed
    assert a.links() == {f"127.0.0.1:{b.port}": "verbs"} and await _idle(a) and await _idle(b)


async def test_concurrent_first_writes_make_one_qp_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(1 << 16, dtype=torch.uint8))
    src = torch.ones(100, dtype=torch.uint8)
    await asyncio.gather(*(a.write(src, handle, 100 * i, 100, "bulk", notify=i) for i in range(8)))
    assert sorted(done) == list(range(8)) and len(a.dev.made) == 1 and len(b.accepted) == 1


async def test_failed_post_leaves_nothing_pending_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.fail_post = True
    with pytest.raises(TransferError, match="post_send failed"):
        await asyncio.wait_for(a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk"), 5)
    assert await _idle(a) and not a.qps and a.dev.made[0].closed and done == []
    a.dev.fail_post = False
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", notify="again")
    assert done == ["again"] and len(a.dev.made) == 2  # a fresh QP after the failed one


async def test_no_completion_times_out_and_poller_ends_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    a.dev.silent = True
    with pytest.raises(TransferError, match="timed out"):
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk", timeout=0.3)
    assert await _idle(a) and done == []


async def test_released_handle_and_short_source_fake_device(fake_pair):
    a, b, done = fake_pair
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    b.release(handle)
    a.dev.silent = True  # a real responder would answer with a remote access error
    with pytest.raises(TransferError, match="unknown or released"):
        await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "latency", timeout=5)
    live = b.register(torch.zeros(4096, dtype=torch.uint8))
    with pytest.raises(ValueError, match="source has 10 bytes"):
        await a.write(torch.ones(10, dtype=torch.uint8), live, 0, 100, "latency")
    assert await _idle(a) and done == []


async def test_close_closes_every_qp_and_the_device_fake_device():
    fabric, done = FakeFabric(), []
    a = VerbsDataPlane("a", TOKEN, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    b = VerbsDataPlane("b", TOKEN, on_complete=done.append, device_layer=FakeDevice(fabric, e.IBV_MTU_4096))
    await a.start("127.0.0.1")
    await b.start("127.0.0.1")
    handle = b.register(torch.zeros(4096, dtype=torch.uint8))
    await a.write(torch.ones(10, dtype=torch.uint8), handle, 0, 10, "bulk")
    await a.close()
    await b.close()
    assert all(qp.closed for qp in fabric.qps.values()) and len(fabric.qps) == 2
    assert a.dev.closed and b.dev.closed and not b.accepted and not b.mrs


def test_verbs_that_cannot_start_fall_back_to_tcp_with_one_warning(monkeypatch, caplog):
    """The real DeviceLayer on a host whose pyverbs finds no such device: one warning, tcp."""
    import dualpath.transport as tr
    import dualpath.transport.verbs as v

    monkeypatch.setattr(tr, "available_backends", lambda: ["tcp", "verbs"])
    monkeypatch.setattr(v, "rdma_devices", lambda: ["mlx5_0"])
    with caplog.at_level(logging.WARNING):
        dp = make_dataplane("verbs", "x", TOKEN, rdma=RdmaOptions(device="mlx5_9"))
    assert dp.backend == "tcp" and dp.links() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "mlx5_9" in warnings[0] and "using tcp" in warnings[0]


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
