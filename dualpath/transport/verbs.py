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
  connected by a ``qp`` request on the TCP data-plane link. Per class: a service level (IB virtual
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

Not done: grants (docs/SECURITY.md) are checked on the notify frame only; the DRAM buffer's one MR
lets any holder of its rkey write anywhere in it. Enforcing grants at the NIC needs an MR or memory
window per grant, invalidated on revoke. Completions are polled in a loop that yields to the event
loop while any write, landing or drain waits (no completion channel yet), and nothing bounds the
WRs in flight against the queue and CQ depths (a full send queue fails the post).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import resource
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from dualpath.transport.dataplane import TcpDataPlane, TransferError, as_bytes, check_write
from dualpath.transport.framing import Login

log = logging.getLogger(__name__)
SERVICE_LEVEL = {"latency": 0, "bulk": 1}
TRAFFIC_CLASS = {"latency": 26 << 2, "bulk": 0}  # DSCP AF31 for latency, best effort for bulk
MAX_WR_BYTES = 1 << 30  # an SGE length is 32 bits: split larger writes
SEND_DEPTH = 1024
RECV_DEPTH = 512
CQ_DEPTH = 4096
DRAIN_WR_ID = (1 << 64) - 1  # a retiring QP's marker WR; a write's WRs are (write id << 1) | is-last-piece
DRAIN_TIMEOUT = 5.0  # seconds for a QP in ERR to flush before it is destroyed anyway


class VerbsUnavailable(TransferError):
    """This host's RDMA device cannot carry the verbs plane; the message says why."""


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


def _pyverbs() -> SimpleNamespace:
    """The pyverbs entry points DeviceLayer uses, in one place: tests/test_verbs.py substitutes fakes
    that behave as rdma-core does, since no kernel here can serve a device."""
    from pyverbs.cq import CQ
    from pyverbs.device import Context, get_device_list
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP

    def create_qp(pd, scq, rcq, e):
        return QP(pd, qp_init_attr(e, scq, rcq))

    return SimpleNamespace(get_device_list=get_device_list, Context=Context, PD=PD, CQ=CQ, MR=MR,
                           create_qp=create_qp)


def _device_list() -> list:
    """pyverbs' Device entries (name, transport_type, ...); [] if pyverbs is missing or finds none."""
    try:
        api = _pyverbs()
    except ImportError:
        return []
    try:
        return list(api.get_device_list())
    except Exception:  # pyverbs raises 'Failed to get devices list' when there is none
        return []


def rdma_devices() -> list[str]:
    """Names of RDMA devices on this host; [] if pyverbs is missing or there are none."""
    return [dev.name.decode() for dev in _device_list()]


def locked_memory_limit() -> str:
    """RLIMIT_MEMLOCK, as said in an error: every registration pins memory against it (unless the
    process has CAP_IPC_LOCK), and containers default to 64 KiB - 8 MiB."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return "locked-memory limit: unlimited"
    return f"locked-memory limit (ulimit -l): {soft >> 10} KiB"


# -- pure choices and QP attribute builders (tested field by field without a device) --

def choose_gid(gids: list[tuple[int, str, int]], ethernet: bool, e) -> int:
    """gids: (index, gid, gid type as Context.query_gid_type gives it: the sysfs enum, where 'RoCE v2'
    is IBV_GID_TYPE_SYSFS_ROCE_V2 == 1; IBV_GID_TYPE_ROCE_V2 == 2 belongs to ibv_query_gid_ex and
    never matches it). InfiniBand: index 0. Ethernet: the first RoCE v2 GID that is not link-local
    (an IPv4-mapped or global IPv6 address is routable), else any RoCE v2 one."""
    if not ethernet:
        return 0
    v2 = [(i, g) for i, g, t in gids if t == e.IBV_GID_TYPE_SYSFS_ROCE_V2 and g.strip(":0")]
    for i, g in v2:
        if not ipaddress.IPv6Address(g).is_link_local:
            return i
    if v2:
        return v2[0][0]
    raise VerbsUnavailable("no RoCE v2 GID on this port (is an IP address configured on its netdev?)")


def gid_table(ctx, port: int, size: int) -> list[tuple[int, str, int]]:
    """(index, gid, sysfs gid type) of the port's filled GID table slots."""
    out = []
    for i in range(size):
        try:
            out.append((i, str(ctx.query_gid(port, i)), ctx.query_gid_type(port, i)))
        except Exception:  # an empty slot: libibverbs finds no type for it in sysfs
            continue
    return out


def _gid_text(gid: str) -> str:
    return ipaddress.IPv6Address(gid).exploded  # pyverbs' GID parser wants all eight groups


def qp_init_attr(e, scq=None, rcq=None):
    """An RC QP with sq_sig_all=0: only WRs posted with IBV_SEND_SIGNALED complete into the CQ
    (pyverbs' QPInitAttr defaults to 1, which signals every piece of a split write). A failed or
    flushed WR completes whatever its flags."""
    from pyverbs.qp import QPCap, QPInitAttr

    cap = QPCap(max_send_wr=SEND_DEPTH, max_recv_wr=RECV_DEPTH, max_send_sge=1, max_recv_sge=1)
    return QPInitAttr(qp_type=e.IBV_QPT_RC, scq=scq, rcq=rcq, cap=cap, sq_sig_all=0)


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


def err_attr(e):
    """Any state -> ERR: the device flushes every outstanding WR of the QP, signalled or not."""
    from pyverbs.qp import QPAttr

    return QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE


def split_write(addr: int, raddr: int, nbytes: int, limit: int = MAX_WR_BYTES) -> list[tuple[int, int, int]]:
    """(local address, remote address, length) pieces of at most `limit` bytes (>= 1 piece)."""
    return [(addr + o, raddr + o, min(limit, nbytes - o)) for o in range(0, max(nbytes, 1), limit)]


def _unusable(name: str, transport: int, e) -> str | None:
    """Why this plane cannot drive the device, or None: only InfiniBand and RoCE (both report the IB
    transport) connect RC QPs through ibv_modify_qp as it does."""
    if transport == e.IBV_TRANSPORT_IWARP:
        return (f"{name} is an iWARP device: its RC queue pairs connect only through rdma_cm, which this plane "
                "does not use")
    if transport != e.IBV_TRANSPORT_IB:
        return (f"{name} is neither InfiniBand nor RoCE (transport type {transport}, as EFA and usNIC report): no RC "
                "queue pair this plane can connect")
    return None


class DeviceLayer:
    """The verbs objects this plane touches, opened through pyverbs (`api`: the same entry points,
    faked in tests). Setup fails with VerbsUnavailable, saying why, where this plane could not
    connect or use an RC queue pair: the device's transport, an RC QP that cannot be created, memory
    that cannot be registered."""

    def __init__(self, opts: RdmaOptions, e, api: SimpleNamespace | None = None):
        self.api = api or _pyverbs()
        self._opened: list[Any] = []  # closed in reverse order, also when setup fails half-way
        name = self._pick_device(opts.device, e)
        try:
            self.ctx = self._own(self.api.Context(name=name))
            self._pick_port_and_gid(name, opts, e)
            self.pd = self._own(self.api.PD(self.ctx))
            self.cq = self._own(self.api.CQ(self.ctx, CQ_DEPTH, None, None, 0))  # send completions of every QP
            self.rcq = self._own(self.api.CQ(self.ctx, CQ_DEPTH, None, None, 0))  # receive (WRITE WITH IMM) ones
            try:  # receive WRs need an SGE (WRITE WITH IMM places nothing through it)
                self.scratch = self._own(self.api.MR(self.pd, 64, e.IBV_ACCESS_LOCAL_WRITE))
            except Exception as err:
                raise VerbsUnavailable(f"{name} cannot register memory ({err}; {locked_memory_limit()})") from None
            try:  # EFA, for one, refuses RC QPs here
                self._make_qp(e).close()
            except Exception as err:
                raise VerbsUnavailable(f"{name} cannot create an RC queue pair ({err})") from None
        except BaseException:
            self.close()
            raise

    def _own(self, obj: Any) -> Any:
        self._opened.append(obj)
        return obj

    def _pick_device(self, wanted: str, e) -> str:
        """The configured device, else the first one this plane can drive; says why there is none."""
        try:
            devices = {dev.name.decode(): dev for dev in self.api.get_device_list()}
        except Exception:  # pyverbs raises 'Failed to get devices list' when there is none
            devices = {}
        if not devices:
            raise VerbsUnavailable("no RDMA device (pyverbs finds none)")
        if wanted and wanted not in devices:
            raise VerbsUnavailable(f"RDMA device {wanted!r} not found (have {list(devices)})")
        reasons = []
        for name in [wanted] if wanted else list(devices):
            why = _unusable(name, devices[name].transport_type, e)
            if why is None:
                return name
            reasons.append(why)
        raise VerbsUnavailable("; ".join(reasons))

    def _pick_port_and_gid(self, name: str, opts: RdmaOptions, e) -> None:
        ports = [opts.port] if opts.port else range(1, self.ctx.query_device().phys_port_cnt + 1)
        active = [p for p in ports if self.ctx.query_port(p).state == e.IBV_PORT_ACTIVE]
        if not active:
            raise VerbsUnavailable(f"no ACTIVE port on {name} (checked {list(ports)})")
        self.port = active[0]
        pattr = self.ctx.query_port(self.port)
        self.lid, self.active_mtu = pattr.lid, pattr.active_mtu
        ethernet = pattr.link_layer == e.IBV_LINK_LAYER_ETHERNET
        if opts.gid_index >= 0:
            self.gid_index = opts.gid_index
        else:
            self.gid_index = choose_gid(gid_table(self.ctx, self.port, pattr.gid_tbl_len), ethernet, e)
        self.gid = str(self.ctx.query_gid(self.port, self.gid_index))

    def _make_qp(self, e):
        return self.api.create_qp(self.pd, self.cq, self.rcq, e)

    def new_qp(self, e):
        return self._make_qp(e)

    def register(self, address: int, nbytes: int, access: int):
        return self.api.MR(self.pd, nbytes, access, address=address)

    def close(self) -> None:
        while self._opened:
            self._opened.pop().close()


@dataclass
class _Send:
    """One write's WRs on one QP. `done` resolves, with a work completion status, on the completion
    of its last WR (signalled on success, flushed after a failure): a send queue completes in order,
    so then none of its WRs reads the source any more."""
    qp_num: int
    done: asyncio.Future
    status: int | None = None  # the first failed WR's (an unsignalled WR completes only by failing)


class VerbsDataPlane(TcpDataPlane):
    backend = "verbs"

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
        self._seq = 0
        self._poller: asyncio.Task | None = None
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

    def accept_qp(self, info: dict, traffic_class: str, writer: Login) -> dict:
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

    def _peer_restarted(self, addr: tuple[str, int], incarnation: str | None) -> None:
        """Retire our queue pairs to an earlier incarnation at addr: their remote QP is gone."""
        super()._peer_restarted(addr, incarnation)
        for key in [k for k in self.qps if k[0] == addr and k[2] != incarnation]:
            self._drop_qp(key)

    async def _qp(self, dst: dict, tc: str):
        key = (tuple(dst["addr"]), tc, dst["inc"])
        async with self._qp_locks.setdefault(key, asyncio.Lock()):  # concurrent first writes: one QP
            if key not in self.qps:
                self.qps[key] = await self._new_connected_qp(dst, tc)
            return self.qps[key]

    async def _new_connected_qp(self, dst: dict, tc: str) -> tuple[Any, int]:
        """A QP of ours connected to one the peer makes for it (the ``qp`` request). Failures are
        TransferErrors; a QP that fails here had no WR posted, so it is destroyed without a drain."""
        try:
            qp = self.dev.new_qp(self.e)
        except Exception as err:
            raise TransferError(f"cannot create a queue pair: {err}") from None
        try:
            reply = await self.ask(dst["addr"], tc, {"op": "qp", "tc": tc, "info": self._address(qp)})
            if "err" in reply:
                raise TransferError(reply["err"])
            self._connect(qp, reply["qp"], tc)
        except TransferError:
            qp.close()
            raise
        except Exception as err:  # PyverbsRDMAError from modify (the remote's address did not take)
            qp.close()
            raise TransferError(f"cannot connect a queue pair: {err}") from None
        except BaseException:
            qp.close()
            raise
        return qp, reply["qp"]["qpn"]

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
                    self._ensure_poller()
                    _, pending = await asyncio.wait(waits, timeout=DRAIN_TIMEOUT)
                    if pending:
                        log.warning("%s: queue pair %d did not drain within %ss; destroying it anyway", self.name,
                                    qpn, DRAIN_TIMEOUT)
        finally:
            self._markers.pop(qpn, None)
            qp.close()  # after this the device does no more work for it either
            self._draining.pop(qpn, None)
            for send in self._sends.values():  # writes whose completion can no longer come
                if send.qp_num == qpn and not send.done.done():
                    send.done.set_result(send.status if send.status is not None else self.e.IBV_WC_WR_FLUSH_ERR)

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

    # -- completions --

    def _wanted(self) -> bool:
        return bool(self._sends or self._waiters or self._markers)

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        """Send and receive completions while any write, landing or drain waits; each waiter owns its
        own timeout, so this loop ends as soon as nothing is pending."""
        while self._wanted():
            for cq, handle in ((self.dev.cq, self._send_completion), (self.dev.rcq, self._recv_completion)):
                n, wcs = cq.poll(num_entries=32)
                for wc in wcs[:n]:
                    handle(wc)
            await asyncio.sleep(0)

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

    async def _landed(self, msg: dict, writer: Login) -> None:
        """A verbs write's TCP notify frame: fire only once its WRITE WITH IMM has been received."""
        ev = msg.get("event")
        if not isinstance(ev, dict) or "rdma_seq" not in ev:
            return
        qpn = ev.get("qpn")
        if not isinstance(qpn, int) or self._accepted_from.get(qpn) != writer:  # (an old incarnation's are retired)
            raise ConnectionError(f"{writer.name} names queue pair {qpn!r}, which it did not connect")
        key = (ev["qpn"], ev["rdma_seq"])
        status = self._arrived.pop(key, None)
        if status is None:
            status = self._failed.get(qpn)
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
        """As TcpDataPlane.write; returns or raises only once none of its WRs is in flight (also on
        a timeout or cancellation), so the caller may reuse the source then."""
        if "rkey" not in dst or not isinstance(src, torch.Tensor) or src.is_cuda:
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        check_write(dst, dst_offset, nbytes, traffic_class)
        flat = as_bytes(src)
        if flat.numel() < nbytes:
            raise ValueError(f"source has {flat.numel()} bytes, {nbytes} requested")
        await self._link_to(dst, traffic_class)  # the rkey is of the incarnation at its address, or refused
        try:
            mr, temporary = self._source_mr(flat, nbytes)
        except Exception as err:  # the source cannot be registered (locked-memory limit): tcp moves it
            if not self._source_warned:
                self._source_warned = True
                log.warning("%s: an unregistered source could not be registered (%s; %s); such writes go over tcp",
                            self.name, err, locked_memory_limit())
            return await super().write(src, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        try:
            await self._write_rdma(flat.data_ptr(), mr, dst, dst_offset, nbytes, traffic_class, notify, timeout)
        finally:
            if temporary:
                mr.close()  # only now: no WR reads through it any more

    async def _write_rdma(self, addr: int, mr: Any, dst: dict, dst_offset: int, nbytes: int, tc: str, notify: Any,
                          timeout: float) -> None:
        try:
            qp, remote_qpn = await self._qp(dst, tc)
        except TransferError as err:
            raise TransferError(f"RDMA write to {dst['addr']} failed: {err}") from None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        wid = next(self._write_ids)
        send = self._sends[wid] = _Send(qp.qp_num, asyncio.get_running_loop().create_future())
        notified: asyncio.Task | None = None
        try:
            try:
                self._post(qp, mr, addr, dst["rkey"], dst["raddr"] + dst_offset, nbytes, wid, self._seq)
            except Exception as err:  # PyverbsRDMAError and the like; pieces already posted drain below
                raise TransferError(f"post_send failed: {err}") from None
            self._ensure_poller()
            # The notify frame goes at once: the peer checks the handle and range (a released one
            # answers "unknown or released", as over tcp) and fires on its receive completion.
            landed = {"qpn": remote_qpn, "rdma_seq": self._seq, "timeout": timeout}
            notified = asyncio.create_task(self._send(memoryview(b""), dst, dst_offset, tc, notify, "n", timeout,
                                                      landed_event=landed, moved=nbytes))
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
            self._sends.pop(wid, None)
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
        if self._poller is not None:
            self._poller.cancel()
        for mr in [*self.mrs.values(), *self._premade.values()]:
            mr.close()
        self.mrs.clear()
        self._premade.clear()
        self.dev.close()
