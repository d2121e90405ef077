"""Transport: control plane (msgpack frames) and data plane backends (tcp, shm, cuda, verbs).

    framing.py   frames and the login every connection shares
    control.py   the control plane: typed requests and events between coordinator and engines
    dataplane.py DataPlane: the interface engines use, and what every backend shares
    link.py      the data plane's TCP link; wire.py its messages (WriteChunk, Notify, ConnectQp, Ack)
    tcp.py, shm.py, cuda.py, verbs.py   the backends, each a DataPlane (cuda: shm's plus GPU memory)
    rdma.py      the verbs backend's device layer (pyverbs)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the data plane needs torch; the control plane (and the store's readers) must not
    import torch

    from dualpath.transport.dataplane import DataPlane

log = logging.getLogger(__name__)
AUTO_ORDER = ("verbs", "cuda", "shm", "tcp")


def available_backends() -> list[str]:
    """Backends whose hardware or OS support is present (verbs: any RDMA device; whether this
    plane can drive it is known only once make_dataplane has tried)."""
    from dualpath.transport.shm import shm_available

    out = ["tcp", "shm"] if shm_available() else ["tcp"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    from dualpath.transport.rdma import rdma_devices

    if rdma_devices():
        out.append("verbs")
    return out


def make_dataplane(backend: str, name: str, token: str, rdma: Any = None,
                   register_first: "torch.Tensor | None" = None, **kwargs) -> "DataPlane":
    """'auto' picks verbs where an RDMA device can carry it, else cuda where GPUs are visible, else
    shm (engines of one host copy into each other's buffers; other hosts over tcp), else tcp.
    Verbs is tried, not assumed: its setup creates an RC queue pair and registers memory
    (register_first, the host buffer the caller is about to register, e.g. an engine's DRAM buffer:
    a locked-memory limit too small for it fails here, not in the engine later).
    A backend that cannot run here says why in one warning and the next one is used: for 'auto' the
    next in that order, for an explicit backend tcp. rdma: the verbs plane's RdmaOptions (device,
    port, GID, hop limit)."""
    have = available_backends()
    if backend == "auto":
        order = [b for b in AUTO_ORDER if b in have]
    elif backend in have:
        order = [backend, "tcp"] if backend != "tcp" else ["tcp"]
    else:
        log.warning("transport backend %r is not available on this host (have %s); using tcp", backend, have)
        order = ["tcp"]
    for i, chosen in enumerate(order):
        if chosen != "verbs":
            return _plane(chosen, name, token, **kwargs)
        from dualpath.transport.verbs import VerbsDataPlane

        try:  # pyverbs too old or new, no ACTIVE port or routable GID, iWARP/EFA, memlock: one warning
            return VerbsDataPlane(name, token, rdma=rdma, register_first=register_first, **kwargs)
        except Exception as e:
            log.warning("verbs data plane cannot start (%s: %s); using %s", type(e).__name__, e, order[i + 1])
    raise AssertionError("unreachable: tcp ends every order")


def _plane(backend: str, name: str, token: str, **kwargs) -> "DataPlane":
    if backend == "cuda":
        from dualpath.transport.cuda import CudaDataPlane

        return CudaDataPlane(name, token, **kwargs)
    if backend == "shm":
        from dualpath.transport.shm import ShmDataPlane

        return ShmDataPlane(name, token, **kwargs)
    from dualpath.transport.tcp import TcpDataPlane

    return TcpDataPlane(name, token, **kwargs)


__all__ = ["make_dataplane", "available_backends"]
