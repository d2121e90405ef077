"""The RDMA device layer under the verbs data plane (verbs.py): pyverbs' entry points, the enum
shim, the choice of device, port and GID, the queue-pair attribute builders, and DeviceLayer, which
opens what the plane uses (context, PD, CQs on their completion channels, a scratch MR) and says
why not where it cannot.

NEVER RUN ON HARDWARE: checked against the installed rdma-core's pyverbs (imports, attribute
objects) and a fake pyverbs layer (tests/test_verbs.py). See verbs.py for what that means.
"""

from __future__ import annotations

import ipaddress
import os
import resource
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

from dualpath.transport.link import TransferError

SERVICE_LEVEL = {"latency": 0, "bulk": 1}
TRAFFIC_CLASS = {"latency": 26 << 2, "bulk": 0}  # DSCP AF31 for latency, best effort for bulk
MAX_WR_BYTES = 1 << 30  # an SGE length is 32 bits: split larger writes
SEND_DEPTH = 1024
RECV_DEPTH = 512
CQ_DEPTH = 4096


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
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.device import Context, get_device_list
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.qp import QP

    def create_qp(pd, scq, rcq, e):
        return QP(pd, qp_init_attr(e, scq, rcq))

    return SimpleNamespace(get_device_list=get_device_list, Context=Context, PD=PD, CQ=CQ, MR=MR,
                           CompChannel=CompChannel, create_qp=create_qp, with_event_fd=_with_event_fd)


def _event_fds() -> set[int]:
    """This process's descriptors of uverbs event files (completion channels, async event queues)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[infinibandevent]":
                out.add(int(fd))
        except OSError:  # closed since the listing
            continue
    return out


def _with_event_fd(make: Callable[[], Any]) -> tuple[Any, int]:
    """make() (a CompChannel, or a Context with its async event queue) and the descriptor of the
    event file it opened, made non-blocking. pyverbs exposes neither ibv_comp_channel.fd nor
    ibv_context.async_fd, and its get_cq_event / get_async_event block without releasing the GIL,
    so the plane waits for the descriptor on its event loop and calls them only once it is readable
    (the non-blocking pattern ibv_get_cq_event(3) documents). The descriptor is found as the one new
    anon_inode:[infinibandevent] that make() opened. UNVERIFIED on hardware (none here has a device)."""
    before = _event_fds()
    obj = make()
    new = _event_fds() - before
    if len(new) != 1:
        obj.close()
        raise VerbsUnavailable(f"cannot find the event descriptor pyverbs opened (found {sorted(new)})")
    fd = new.pop()
    os.set_blocking(fd, False)
    return obj, fd


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

    def __init__(self, opts: RdmaOptions, e, api: SimpleNamespace | None = None, cq_depth: int = CQ_DEPTH):
        self.api = api or _pyverbs()
        self._opened: list[Any] = []  # closed in reverse order, also when setup fails half-way
        name = self._pick_device(opts.device, e)
        try:
            self.ctx, self.async_fd = self.api.with_event_fd(lambda: self.api.Context(name=name))
            self._own(self.ctx)
            self._pick_port_and_gid(name, opts, e)
            self.pd = self._own(self.api.PD(self.ctx))
            self.cq_depth = cq_depth
            # One completion channel per CQ: get_cq_event names the CQ it expects, and an event of
            # another CQ on a shared channel would be taken and lost.
            self.cq, self.cq_channel, self.cq_fd = self._armed_cq()  # send completions of every QP
            self.rcq, self.rcq_channel, self.rcq_fd = self._armed_cq()  # receive (WRITE WITH IMM) ones
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

    def _armed_cq(self) -> tuple[Any, Any, int]:
        """A CQ on its own completion channel, armed before any QP can complete into it (so no
        completion precedes the first event), and the channel's descriptor."""
        channel, fd = self.api.with_event_fd(lambda: self.api.CompChannel(self.ctx))
        self._own(channel)  # closed after its CQ (reverse order): a channel with a CQ cannot be destroyed
        cq = self._own(self.api.CQ(self.ctx, self.cq_depth, None, channel, 0))
        cq.req_notify()
        return cq, channel, fd

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


