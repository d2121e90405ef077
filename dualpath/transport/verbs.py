"""The `verbs` data plane: RDMA over InfiniBand/RoCE through pyverbs (rdma-core's Python binding).

- One RC queue pair per peer and traffic class; the service level (SL) of each class maps to a
  virtual lane, as the paper reserves lanes for model traffic (``latency`` SL 0, ``bulk`` SL 1).
- Host regions are registered as memory regions (MR over the tensor's own memory); GPU regions via
  dma-buf where the driver supports it.
- QP information (qp number, LID, GID, rkey, address) is exchanged over the TCP data-plane link.
- A write is an RDMA WRITE WITH IMM (the immediate carries the write id). Once the sender's work
  completion arrives (RC: the bytes are placed at the responder), a notify-only frame on the TCP
  link fires the receiver's completion, as the cuda backend does.

No host of this project's CI or GPU machines has an RDMA device, so this module is exercised only
by the conformance suite where ``rdma_devices()`` finds one; elsewhere `make_dataplane` says so
and uses tcp.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from dualpath.transport.dataplane import TcpDataPlane, TransferError, as_bytes

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
        self.cq = CQ(self.ctx, 4096, None, None, 0)
        self.port_num, self.gid_index = port_num, gid_index
        self.mrs: dict[int, Any] = {}
        self.qps: dict[tuple, Any] = {}

    def register(self, tensor: torch.Tensor, share_path: str | None = None) -> dict:
        from pyverbs.mr import MR

        handle = super().register(tensor)
        flat = self.regions[handle["region"]].tensor
        e = self.e
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        if flat.is_cuda:
            from pyverbs.mr import DmaBufMR  # needs a dma-buf capable driver (e.g. nvidia-peermem/dmabuf)

            mr = DmaBufMR(self.pd, flat.numel(), access, offset=flat.data_ptr())
        else:
            mr = MR(self.pd, flat.numel(), access, address=flat.data_ptr())
        self.mrs[handle["region"]] = mr
        handle.update(rkey=mr.rkey, raddr=flat.data_ptr())
        return handle

    def release(self, handle: dict) -> None:
        mr = self.mrs.pop(handle["region"], None)
        if mr is not None:
            mr.close()
        super().release(handle)

    def _local_qp_info(self, qp) -> dict:
        port = self.ctx.query_port(self.port_num)
        gid = self.ctx.query_gid(self.port_num, self.gid_index)
        return {"qpn": qp.qp_num, "lid": port.lid, "gid": str(gid)}

    def _connect_qp(self, qp, remote: dict, tc: str) -> None:
        from pyverbs.addr import AHAttr, GID, GlobalRoute
        from pyverbs.qp import QPAttr

        e = self.e
        attr = QPAttr(port_num=self.port_num)
        attr.qp_access_flags = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
        qp.to_init(attr)
        attr.dest_qp_num = remote["qpn"]
        attr.path_mtu = e.IBV_MTU_4096
        gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(port_num=self.port_num, is_global=1, gr=gr, dlid=remote["lid"], sl=SERVICE_LEVEL[tc])
        qp.to_rtr(attr)
        qp.to_rts(attr)

    def _qp(self, dst: dict, tc: str):
        """RC QP to the peer for this class. Both ends create one per (peer, class) and exchange
        their info through the peer's handle (its data-plane address carries our side's info)."""
        key = (tuple(dst["addr"]), tc)
        if key not in self.qps:
            from pyverbs.qp import QP, QPCap, QPInitAttr

            cap = QPCap(max_send_wr=256, max_recv_wr=256, max_send_sge=1, max_recv_sge=1)
            qp = QP(self.pd, QPInitAttr(qp_type=self.e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))
            remote = dst.get("qp", {}).get(tc)
            if remote is None:
                raise TransferError(f"peer {dst['addr']} published no {tc} QP for verbs")
            self._connect_qp(qp, remote, tc)
            self.qps[key] = qp
        return self.qps[key]

    async def write(self, src: torch.Tensor, dst: dict, dst_offset: int, nbytes: int,
                    traffic_class: str = "bulk", notify: Any = None, timeout: float = 60.0) -> None:
        if "rkey" not in dst:
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        from pyverbs.wr import SGE, SendWR

        flat = as_bytes(src)
        reg = self.register(flat)  # register the source for this write (cached MR pools are a TODO)
        try:
            wr = SendWR(opcode=self.e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                        sg=[SGE(flat.data_ptr(), nbytes, self.mrs[reg["region"]].lkey)])
            wr.set_wr_rdma(dst["rkey"], dst["raddr"] + dst_offset)
            wr.imm_data = reg["region"] & 0xFFFFFFFF
            self._qp(dst, traffic_class).post_send(wr)
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                n, wcs = self.cq.poll()
                if n:
                    if wcs[0].status != self.e.IBV_WC_SUCCESS:
                        raise TransferError(f"RDMA write failed with status {wcs[0].status}")
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise TransferError(f"RDMA write not completed within {timeout}s")
                await asyncio.sleep(0)
        finally:
            self.release(reg)
        await self._send(memoryview(b""), dst, dst_offset, traffic_class, notify, "n", timeout)
