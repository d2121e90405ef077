"""Hosts for tests: Linux network namespaces joined by a bridge, made and torn down by the test.

Each host is a namespace with one veth link (10.77.<id>.<i+1>/24) to a bridge that lives in a
namespace of its own, so no address or link is added to the machine's own namespace: traffic stays
inside what the test made. The file system is shared, as a distributed one is across real hosts.
Needs root and `ip` (iproute2); ``available()`` says why not otherwise.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field


_made = itertools.count()


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def available() -> str | None:
    """None if hosts can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dpprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        return f"cannot make a network namespace here: {e}"
    return None


@dataclass
class Hosts:
    """`n` hosts; ``addr(i)`` is host i's address, ``popen(i, argv)`` runs a process on it."""

    n: int
    tag: str = field(default_factory=lambda: f"dp{os.getpid() % 100000}x{next(_made)}")
    subnet: int = field(default_factory=lambda: 1 + os.getpid() % 250)

    def ns(self, i: int) -> str:
        return f"{self.tag}h{i}"

    @property
    def switch(self) -> str:
        return f"{self.tag}sw"

    def addr(self, i: int) -> str:
        return f"10.77.{self.subnet}.{i + 1}"

    def __enter__(self) -> "Hosts":
        try:
            _ip("netns", "add", self.switch)
            _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
            _ip("link", "set", "br0", "up", ns=self.switch)
            for i in range(self.n):
                ns, port = self.ns(i), f"p{i}"
                _ip("netns", "add", ns)
                _ip("link", "set", "lo", "up", ns=ns)
                _ip("link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch, ns=ns)
                _ip("addr", "add", f"{self.addr(i)}/24", "dev", "eth0", ns=ns)
                _ip("link", "set", "eth0", "up", ns=ns)
                _ip("link", "set", port, "master", "br0", ns=self.switch)
                _ip("link", "set", port, "up", ns=self.switch)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in [self.ns(i) for i in range(self.n)] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)  # takes its links along

    def shape(self, i: int, rate: str, burst: str = "32kb") -> None:
        """Cap what host i sends (its compute NIC, say) with a token bucket: `rate` as tc writes it."""
        self._tc(i, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", "400ms")

    def shape_by_class(self, i: int, rate: str) -> None:
        """Cap host i's link at `rate` and send latency-class packets (DSCP EF, as the data plane marks
        them) first: an HTB class with priority for them, another for everything else; either may use
        the whole link when the other is idle. A switch's strict-priority queue does the same."""
        self._tc(i, "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "20")
        self._tc(i, "class", "add", "dev", "eth0", "parent", "1:", "classid", "1:1", "htb", "rate", rate)
        self._tc(i, "class", "add", "dev", "eth0", "parent", "1:1", "classid", "1:10", "htb", "rate", rate,
                 "ceil", rate, "prio", "0")
        self._tc(i, "class", "add", "dev", "eth0", "parent", "1:1", "classid", "1:20", "htb", "rate", "100kbit",
                 "ceil", rate, "prio", "1")
        self._tc(i, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match",
                 "ip", "dsfield", "0xb8", "0xfc", "flowid", "1:10")

    def _tc(self, i: int, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns(i), "tc", *args], check=True, capture_output=True, timeout=10)

    def popen(self, i: int, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kw)

    def python(self, i: int, code: str, timeout: float = 120) -> str:
        """Run Python code on host i; its stdout."""
        out = subprocess.run(["ip", "netns", "exec", self.ns(i), sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": _root()})
        if out.returncode:
            raise RuntimeError(f"on host {i}: {out.stderr[-2000:]}")
        return out.stdout


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
