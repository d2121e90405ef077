"""The `verbs` data plane: RDMA over InfiniBand/RoCE through pyverbs (rdma-core's Python binding).

- Host regions are registered as memory regions (MR over the tensor's own memory); the handle
  carries their rkey and address. GPU memory is not registered: that needs a dma-buf of the CUDA
  allocation, which torch does not expose, so a device region is written over tcp (and refused
  there with a clear error, as tcp writes host memory only). The engines register only their DRAM
  buffers, so every path-B and handoff write is an RDMA write.
- One RC queue pair per (peer, traffic class). The writer creates its QP on first use and sends its
  address (qp number, LID, GID) to the peer in a ``qp`` request on the TCP data-plane link; the
  peer creates, connects and returns its own, and the writer connects. The service level of each
  class selects a virtual lane (``latency`` SL 0, ``bulk`` SL 1): the switches keep latency
  traffic ahead, as the paper reserves lanes for model traffic, so bulk needs no chunking here.
- A write is one signalled RDMA WRITE. On RC its completion means the responder has placed the
  bytes; then a notify-only frame on the TCP link fires the receiver's completion (the notify is a
  structured object, more than the 32 bits an immediate carries, and the frame's ack tells the
  writer that the receiver has seen it).

No host of this project's CI or GPU machines has an RDMA device, so this module runs only where
``rdma_devices()`` finds one: there the conformance suite (tests/test_transport.py) covers it too.
Elsewhere `make_dataplane` says so and uses tcp.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from dualpath.transport.dataplane import TcpDataPlane, TransferError, as_bytes, check_write

log = logging.getLogger(__name__)
SERVICE_LEVEL = {"latency": 0, "bulk": 1}


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


class VerbsDataPlane(TcpDataPlane):
    backend = "verbs"

    def __init__(self, *args, port_num: int = 1, gid_index: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        import pyverbs.enums as e
        from pyverbs.cq import CQ
        from pyverbs.device import Context
        from pyverbs.pd import PD

        self.e = e
        self.ctx = Context(name=rdma_devices()[0])
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 4096, None, None, 0)  # send completions of every QP
        self.port_num, self.gid_index = port_num, gid_index
        self.mrs: dict[int, Any] = {}  # region id -> MR
        self.qps: dict[tuple, Any] = {}  # ours, writing: (peer addr, class) -> QP
        self.accepted: list = []  # ours, written into by a peer's QP
        self._sends: dict[int, asyncio.Future] = {}  # wr_id -> the write waiting for its completion
        self._poller: asyncio.Task | None = None

    # -- memory registration --

    def register(self, tensor: torch.Tensor, share_path: str | None = None, granted_only: bool = False) -> dict:
        from pyverbs.mr import MR

        handle = super().register(tensor, granted_only=granted_only)
        flat = self.regions[handle["region"]].tensor
        if flat.is_cuda:
            log.warning("%s: GPU region %d is not RDMA-registered (no dma-buf export); writes to it go over tcp",
                        self.name, handle["region"])
            return handle
        e = self.e
        mr = MR(self.pd, flat.numel(), e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE, address=flat.data_ptr())
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
        for rid, mr in self.mrs.items():
            t = self.regions[rid].tensor
            if t.data_ptr() <= lo and hi <= t.data_ptr() + t.numel():
                return mr, False
        from pyverbs.mr import MR

        return MR(self.pd, nbytes, self.e.IBV_ACCESS_LOCAL_WRITE, address=lo), True

    # -- queue pairs --

    def _new_qp(self):
        from pyverbs.qp import QP, QPCap, QPInitAttr

        cap = QPCap(max_send_wr=1024, max_recv_wr=1, max_send_sge=1, max_recv_sge=1)
        return QP(self.pd, QPInitAttr(qp_type=self.e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))

    def _address(self, qp) -> dict:
        port = self.ctx.query_port(self.port_num)
        return {"qpn": qp.qp_num, "lid": port.lid, "gid": str(self.ctx.query_gid(self.port_num, self.gid_index))}

    def _connect(self, qp, remote: dict, tc: str) -> None:
        """RESET → INIT → RTR (aimed at the remote QP) → RTS."""
        from pyverbs.addr import AHAttr, GID, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self.e
        attr = QPAttr(port_num=self.port_num)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        attr.dest_qp_num, attr.rq_psn, attr.sq_psn = remote["qpn"], 0, 0
        attr.path_mtu = e.IBV_MTU_1024  # every RoCE and IB port supports it
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 12, 14, 7, 7  # ~67 ms per try
        gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(port_num=self.port_num, is_global=1, gr=gr, dlid=remote["lid"], sl=SERVICE_LEVEL[tc])
        qp.to_init(attr)
        qp.to_rtr(attr)
        qp.to_rts(attr)

    def accept_qp(self, info: dict, traffic_class: str) -> dict:
        qp = self._new_qp()
        self._connect(qp, info, traffic_class)
        self.accepted.append(qp)
        return self._address(qp)

    async def _qp(self, dst: dict, tc: str):
        key = (tuple(dst["addr"]), tc)
        if key not in self.qps:
            qp = self._new_qp()
            reply = await self.ask(dst["addr"], tc, {"op": "qp", "tc": tc, "info": self._address(qp)})
            self._connect(qp, reply["qp"], tc)
            self.qps[key] = qp
        return self.qps[key]

    # -- writes --

    async def _poll_sends(self) -> None:
        """Completions of our RDMA writes, matched by wr_id. Polls while any write is pending."""
        while self._sends:
            n, wcs = self.cq.poll(num_entries=32)
            for wc in wcs[:n]:
                fut = self._sends.pop(wc.wr_id, None)
                if fut is None or fut.done():
                    continue
                if wc.status == self.e.IBV_WC_SUCCESS:
                    fut.set_result(None)
                else:
                    fut.set_exception(TransferError(f"RDMA write failed (work completion status {wc.status})"))
            await asyncio.sleep(0)

    async def write(self, src: torch.Tensor | memoryview, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        if "rkey" not in dst or not isinstance(src, torch.Tensor) or src.is_cuda:
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        from pyverbs.wr import SGE, SendWR

        flat = as_bytes(src)
        mr, temporary = self._source_mr(flat, nbytes)
        key, wid = (tuple(dst["addr"]), traffic_class), None
        try:
            qp = await self._qp(dst, traffic_class)
            wid = next(self._write_ids)
            wr = SendWR(wr_id=wid, opcode=self.e.IBV_WR_RDMA_WRITE, num_sge=1,
                        sg=[SGE(flat.data_ptr(), nbytes, mr.lkey)], send_flags=self.e.IBV_SEND_SIGNALED)
            wr.set_wr_rdma(dst["rkey"], dst["raddr"] + dst_offset)
            done = self._sends[wid] = asyncio.get_running_loop().create_future()
            qp.post_send(wr)
            if self._poller is None or self._poller.done():
                self._poller = asyncio.create_task(self._poll_sends())
            await asyncio.wait_for(done, timeout)
        except (TransferError, asyncio.TimeoutError) as err:
            self._sends.pop(wid, None)
            self.qps.pop(key, None)  # a QP whose write failed is in the error state: handshake anew next time
            raise TransferError(f"RDMA write to {dst['addr']} failed: {err or 'timed out'}") from None
        finally:
            if temporary:
                mr.close()
        await self._send(memoryview(b""), dst, dst_offset, traffic_class, notify, "n", timeout, moved=nbytes)
