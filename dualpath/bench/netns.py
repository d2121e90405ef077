"""Hosts on one machine, for tests and benchmarks: Linux network namespaces joined by a bridge,
made and torn down by whoever uses them; and ``NamespaceCluster``, a cluster spread over them.

Each host is a namespace with one veth link (10.77.<id>.<i+1>/24) to a bridge that lives in a
namespace of its own, so no address or link is added to the machine's own namespace: traffic stays
inside what the caller made. The file system is shared, as a distributed one is across real hosts.
A host's link can be shaped with tc (its compute NIC). Needs root and `ip` (iproute2);
``available()`` says why not otherwise.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dualpath.config import ClusterConfig, write_config
from dualpath.launcher import stop_processes


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
    """The directory holding the dualpath package: PYTHONPATH for processes started on a host."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class NamespaceCluster:
    """A cluster across hosts: the coordinator on host 0 and engine i on host i (host i + 1 with
    ``coordinator_alone``), each a `dualpath run` process; HTTP goes from host 0, as the caller's
    own namespace has no route to the hosts."""

    def __init__(self, hosts: Hosts, cfg: ClusterConfig, workdir: str | Path, coordinator_alone: bool = False):
        self.hosts, self.workdir = hosts, Path(workdir)
        self.first = 1 if coordinator_alone else 0
        if len(cfg.engines) + self.first > hosts.n:
            raise ValueError(f"{len(cfg.engines)} engines need {len(cfg.engines) + self.first} hosts, not {hosts.n}")
        cfg.scheduler.host = hosts.addr(0)
        cfg.transport.backend = "auto"  # tcp between hosts, whatever this machine has
        for i, e in enumerate(cfg.engines):
            e.host = hosts.addr(i + self.first)
        self.cfg, self.config_path, self.procs = cfg, self.workdir / "cluster.toml", {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_config(cfg, self.config_path)
        self.url = f"http://{hosts.addr(0)}:{cfg.scheduler.http_port}"
        self.env = {**os.environ, "PYTHONPATH": _root()}

    def start(self, timeout: float = 90) -> "NamespaceCluster":
        for name, role, node, host in [("coordinator", "coordinator", 0, 0)] + [
                (e.name, e.role, e.node, i + self.first) for i, e in enumerate(self.cfg.engines)]:
            log = open(self.workdir / f"{name}.log", "wb")
            self.procs[name] = self.hosts.popen(host, [sys.executable, "-m", "dualpath.cli", "run", "--role", role,
                                                       "--node", str(node), "--config", str(self.config_path)],
                                                stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline, want = time.monotonic() + timeout, sorted(e.name for e in self.cfg.engines)
        try:
            while sorted(self.get("/healthz", ok_only=False).get("engines", [])) != want:
                dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster did not start (exited: {dead})\n{self.log_tails()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_processes(self.procs.values(), grace=15.0)

    def __enter__(self) -> "NamespaceCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tails(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.workdir / f"{n}.log").read_text(errors="replace")[-1500:]
                         for n in self.procs)

    def http(self, path: str, body: dict | None = None, ok_only: bool = True, timeout: float = 120) -> dict:
        """GET (or POST `body`) to the coordinator from host 0; the JSON answer ({} if none came)."""
        code = (f"import json, urllib.request, urllib.error\n"
                f"req = urllib.request.Request({self.url + path!r}, "
                f"data={json.dumps(body).encode() if body is not None else None!r})\n"
                f"try:\n    r = urllib.request.urlopen(req, timeout={timeout}); print(r.read().decode())\n"
                f"except urllib.error.HTTPError as e:\n    print(e.read().decode())\n"
                f"except OSError as e:\n    print('{{}}')\n")
        out = json.loads(self.hosts.python(0, code, timeout=timeout + 30) or "{}")
        if ok_only and "error" in out:
            raise RuntimeError(f"{path}: {out['error']}")
        return out

    def get(self, path: str, ok_only: bool = True) -> dict:
        return self.http(path, None, ok_only)

    def complete(self, body: dict) -> dict:
        return self.http("/v1/completions", body)
