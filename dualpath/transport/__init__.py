"""Transport: control plane (msgpack frames) and data plane backends (tcp, shm, cuda, verbs)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the data plane needs torch; the control plane (and the store's readers) must not
    from dualpath.transport.dataplane import TcpDataPlane

log = logging.getLogger(__name__)


def available_backends() -> list[str]:
    from dualpath.transport.shm import shm_available

    out = ["tcp", "shm"] if shm_available() else ["tcp"]
    try:
        import torch

        if torch.cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    from dualpath.transport.verbs import rdma_devices

    if rdma_devices():
        out.append("verbs")
    return out


def make_dataplane(backend: str, name: str, token: str, rdma: Any = None, **kwargs) -> "TcpDataPlane":
    """'auto' picks verbs where an RDMA device exists, else cuda where GPUs are visible, else shm
    (engines of one host copy into each other's buffers; other hosts over tcp), else tcp.
    An explicit backend that cannot run here says why and falls back to tcp. rdma: the verbs
    plane's RdmaOptions (device, port, GID, hop limit)."""
    have = available_backends()
    if backend == "auto":
        backend = next(b for b in ("verbs", "cuda", "shm", "tcp") if b in have)
    if backend not in have:
        log.warning("transport backend %r is not available on this host (have %s); using tcp", backend, have)
        backend = "tcp"
    if backend == "cuda":
        from dualpath.transport.cuda import CudaDataPlane

        return CudaDataPlane(name, token, **kwargs)
    if backend == "shm":
        from dualpath.transport.shm import ShmDataPlane

        return ShmDataPlane(name, token, **kwargs)
    if backend == "verbs":
        from dualpath.transport.verbs import VerbsDataPlane

        try:  # pyverbs too old or new, no ACTIVE port, no routable GID: one warning, then tcp
            return VerbsDataPlane(name, token, rdma=rdma, **kwargs)
        except Exception as e:
            log.warning("verbs data plane cannot start (%s: %s); using tcp", type(e).__name__, e)
    from dualpath.transport.dataplane import TcpDataPlane

    return TcpDataPlane(name, token, **kwargs)


__all__ = ["make_dataplane", "available_backends"]
