"""`dualpath up`: a whole cluster on this host, one subprocess per role, stopped together.

``LocalCluster`` is also what the tests and benchmarks use: real processes on loopback, always
stopped (SIGTERM, then SIGKILL after a grace period). If any process dies, the launcher says which
one and why (its exit code and the end of its log) and stops the rest.

The cluster's config file holds its secret, so it is on disk only while the cluster runs: stopping
removes it, and a work directory the cluster made itself (``/tmp/dualpath-*``) goes with it, logs
included, unless the cluster failed (its logs, without the secret, are then what to read next).
``dualpath up`` stops so on Ctrl-C, SIGTERM and SIGHUP too; ``--config-out`` keeps a copy where asked.

Before it starts anything, ``dualpath up`` checks what would otherwise fail late and obscurely
(``preflight``): every port the cluster will listen on must be free (the API, the coordinator's
control port, each engine's control and data ports; another server on the API port would even
answer the health check), and the block store must be writable (an engine would die of an OSError).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from dualpath.config import (ClusterConfig, ConfigError, default_store_root, local_cluster, read_secret_file,
                             write_config)

READERS = {"A": "the PE", "B": "the DE", "A+B": "both"}  # who read the hit KV, for the demo's lines
DATA_PORT_OFFSET = 1000  # an engine's data plane listens on its control port + 1000 (engine/runtime.py)
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # bind-all address -> one to connect to


class ClusterDied(RuntimeError):
    """A cluster process exited; the message names it and quotes its log."""


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, workdir: str | None = None, env: dict | None = None):
        self.cfg = cfg.validate()
        self.own_workdir = workdir is None  # made here (mode 0700), so removed here when the cluster stops
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="dualpath-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "cluster.toml"
        write_config(cfg, self.config_path)
        self.env = {**os.environ, **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: Counter[str] = Counter()
        self.failed = False  # a process died or the start timed out: stop() then keeps the logs

    @property
    def url(self) -> str:
        """The API's base URL as this host reaches it (an address that binds all, as 0.0.0.0, is not one
        to connect to: its loopback instead)."""
        host = WILDCARDS.get(self.cfg.scheduler.host, self.cfg.scheduler.host)
        return f"http://{f'[{host}]' if ':' in host else host}:{self.cfg.scheduler.http_port}"

    def _spawn(self, name: str, role: str, node: int) -> None:
        log = open(self.workdir / f"{name}.log", "ab")
        cmd = [sys.executable, "-m", "dualpath.cli", "run", "--role", role, "--node", str(node),
               "--config", str(self.config_path)]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def start(self, timeout: float = 120.0) -> "LocalCluster":
        self._spawn("coordinator", "coordinator", 0)
        for e in self.cfg.engines:
            self._spawn(e.name, e.role, e.node)
        deadline = time.monotonic() + timeout
        want = sorted(e.name for e in self.cfg.engines)
        while True:
            self.check()
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    if sorted(json.load(r)["engines"]) == want:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.failed = True
                self.stop()
                raise ClusterDied(f"cluster not ready within {timeout}s; logs in {self.workdir}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def supervise(self, max_restarts: int = 3) -> list[str]:
        """Restart engines that exited (at most max_restarts each): the others keep serving, and a
        restarted engine registers again. The coordinator exiting, or an engine that keeps dying,
        ends the cluster (ClusterDied). Returns the engines restarted now."""
        restarted = []
        for e in self.cfg.engines:
            p = self.procs[e.name]
            if p.poll() is None:
                continue
            if self.restarts[e.name] >= max_restarts:
                self.check()
            self.restarts[e.name] += 1
            print(f"dualpath up: {e.name} exited with code {p.returncode}; restarting it "
                  f"({self.restarts[e.name]}/{max_restarts}). Last lines of its log:\n{self.log_tail(e.name, 5)}",
                  file=sys.stderr, flush=True)
            self._spawn(e.name, e.role, e.node)
            restarted.append(e.name)
        self.check()  # the coordinator
        return restarted

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = self.log_tail(name)
                self.failed = True
                self.stop()
                raise ClusterDied(f"{name} exited with code {p.returncode}; last lines of its log:\n{tail}")

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process and take the secret off the disk: the config file goes first (a second
        Ctrl-C during the stop cannot leave it behind; the processes read it at start), then a work
        directory made by this cluster, logs and all, unless the cluster failed (its logs, without
        the secret, are what the user reads next)."""
        self.config_path.unlink(missing_ok=True)
        stop_processes(self.procs.values(), grace)
        if self.own_workdir and not self.failed:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, exc_type, *exc) -> None:
        self.failed = self.failed or exc_type is not None
        self.stop()


def stop_processes(procs: Iterable[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM to all, then each gets what is left of `grace` seconds to exit before SIGKILL."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def complete(url: str, body: dict, timeout: float = 300.0, api_key: str = "") -> dict:
    """POST /v1/completions (stdlib only, so the launcher and tests need no HTTP client)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def demo_conversation(url: str, turns: int = 4, max_tokens: int = 24, api_key: str = "") -> list[dict]:
    """An agent's conversation: each turn's prompt = the last prompt + its answer + a new tool output.
    Turns continue by token ids (a random-weight model's ids need not round-trip through text), and
    each turn names a policy so that both paths show."""
    tokens = list(("You are a coding agent. Repository files follow.\n" + "def f(x):\n    return x * 2\n" * 40).encode())
    policies = ["dualpath", "de-read", "pe-read", "dualpath"]
    results = []
    for turn in range(1, turns + 1):
        policy = policies[(turn - 1) % len(policies)]
        r = complete(url, {"prompt": tokens, "max_tokens": max_tokens, "temperature": 0, "dualpath_policy": policy},
                     api_key=api_key)
        results.append(r)
        u, dp = r["usage"], r["dualpath"]
        print(f"turn {turn}: prompt {u['prompt_tokens']:>5} tokens, cached {u['prompt_tokens_details']['cached_tokens']:>5}"
              f" | policy {policy:<8} -> path {dp['path']:<3} ({READERS[dp['path']]} read) PE={dp['pe']} "
              f"DE={dp['de']} | ttft {dp['ttft_s'] * 1000:.0f} ms | {len(r['choices'][0]['token_ids'])} tokens out")
        tokens = tokens + r["choices"][0]["token_ids"] + list((f"\n[tool output {turn}]\n" + "ok: all passed\n" * 12).encode())
    return results


class Stopped(Exception):
    """SIGTERM or SIGHUP reached `dualpath up`: stop the cluster as Ctrl-C does."""


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # as Ctrl-C: a service manager's stop, a closed terminal


def ports_needed(cfg: ClusterConfig) -> list[tuple[str, str, int]]:
    """Every (what, host, port) the cluster's processes will listen on."""
    s = cfg.scheduler
    needed = [("the HTTP API, --port", s.host, s.http_port), ("the coordinator's control port", s.host, s.control_port)]
    for e in cfg.engines:
        if e.port:  # (0: the system picks free ports for both, at the engine's start)
            needed.append((f"{e.name}'s control port", e.host, e.port))
            needed.append((f"{e.name}'s data port", e.host, e.port + DATA_PORT_OFFSET))
    return needed


def bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on host:port now, or None. Bound as the cluster's servers bind
    (SO_REUSEADDR: a port left in TIME_WAIT is free to them); on Linux a listening socket on the
    port, of any address that overlaps this one, still refuses it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as e:
        return e
    return None


def port_problems(cfg: ClusterConfig) -> list[str]:
    """One line per port the cluster cannot listen on: out of range, in use, or refused."""
    problems = []
    for what, host, port in ports_needed(cfg):
        if not 0 < port < 65536:
            problems.append(f"{port} ({what}): not a TCP port")
        elif (e := bind_error(host, port)) is not None:
            why = "in use" if e.errno == errno.EADDRINUSE else f"cannot listen on {host}: {e.strerror}"
            problems.append(f"{port} ({what}): {why}")
    return problems


def store_problem(root: str) -> str | None:
    """Why the block store cannot be written at `root`, or None. A real write, as the engines will
    make: permissions alone do not tell (root ignores them; a read-only mount or a file in the way
    does not show in a mode)."""
    from dualpath.storage.private import private_dir  # (the store's own way to make its directory)

    existing = Path(root).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():  # (makedirs would say "File exists", which reads as the opposite)
        return f"the block store {root} cannot be made: {existing} is a file, not a directory"
    try:
        private_dir(root)
        fd, probe = tempfile.mkstemp(prefix=".dualpath-write-check-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"the block store {root} is not writable: {e.strerror}{f' ({e.filename})' if e.filename else ''}"
    return None


def _ranges(ports: Iterable[int]) -> str:
    """8000, 8001, 8002, 9002 -> '8000-8002, 9002'."""
    runs: list[list[int]] = []
    for p in sorted(set(ports)):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def preflight(cfg: ClusterConfig) -> None:
    """ConfigError naming every port `up` cannot listen on and an unwritable store, before anything
    starts (else the first sign is a process dying later, about a port the user never chose)."""
    problems = port_problems(cfg)
    if problems:
        problems = [f"port {p}" for p in problems]
        problems.append(f"choose another --port (this one needs ports {_ranges(p for _, _, p in ports_needed(cfg))}: "
                        f"--port, --port + 1, one per engine from --port + 2, and those + {DATA_PORT_OFFSET})")
    if (why := store_problem(cfg.store.root)) is not None:
        problems += [why, "give --store a directory you can write"]
    if problems:
        raise ConfigError("cannot start the cluster:\n  " + "\n  ".join(problems))


def launch_local(n_prefill: int, n_decode: int, preset: str, weights: str | None, dtype: str, device: str,
                 policy: str, store_root: str | None, snic_gbps: float, backend: str, port: int, demo: bool,
                 config_out: str | None, api_key: str = "", api_key_file: str | None = None,
                 host: str = "127.0.0.1", served_model_name: str | None = None) -> int:
    """`dualpath up`: returns the exit code. Nothing starts unless every port it needs is free and the
    store is writable (preflight)."""
    cfg = local_cluster(n_prefill, n_decode, base_port=port + 2)
    if api_key_file:  # the config names the file, not the key: --config-out then does not carry it
        api_key = read_secret_file(api_key_file, "--api-key-file")
        cfg.scheduler.api_key_file = os.path.abspath(api_key_file)
    else:
        cfg.scheduler.api_key = api_key
    cfg.model.preset, cfg.model.weights, cfg.model.dtype = preset, weights, dtype
    cfg.store.root = store_root or default_store_root()
    cfg.store.snic_read_gbps = snic_gbps
    cfg.transport.backend = backend
    cfg.scheduler.policy, cfg.scheduler.http_port, cfg.scheduler.control_port = policy, port, port + 1
    cfg.scheduler.host = host  # the API's bind address; the coordinator's control port (secret-guarded) shares it
    if served_model_name:
        cfg.model.served_model_name = served_model_name
    if device.startswith("cuda"):
        from dualpath.device import spread_over_gpus  # torch only when asked for GPUs

        spread_over_gpus(cfg.engines)
    cfg.validate()
    preflight(cfg)
    if config_out:
        write_config(cfg, config_out)  # the user's copy: it stays after the cluster stops
    with _stop_signals_raise():
        return _run_cluster(cfg, demo, api_key)


@contextlib.contextmanager
def _stop_signals_raise():
    """A default SIGTERM would end `dualpath up` at once and leave the work directory, secret
    included, behind: inside, a stop signal raises Stopped instead, so that finally blocks run. A
    signal ignored on purpose (nohup ignores SIGHUP) stays ignored. The handlers are put back after."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def served_name(cfg: ClusterConfig) -> str:
    """The model id clients send, as the coordinator names it."""
    return cfg.model.served_model_name or cfg.model.weights or cfg.model.preset


def ready_message(cfg: ClusterConfig, cluster: LocalCluster, demo: bool) -> str:
    """What a user needs once the cluster serves: where to send requests, where to look, how to stop.
    (The first line starts with "API:", as scripts and tests that wait for a ready cluster expect.)"""
    url = cluster.url
    bound = "" if cfg.scheduler.host not in WILDCARDS else f"; listening on every address ({cfg.scheduler.host})"
    stop = ("the demo follows; the cluster stops after it" if demo else
            f"stop it with Ctrl-C, or `kill {os.getpid()}` (SIGTERM): every process stops and its secret is removed")
    return "\n".join([
        f"API: {url}/v1   (the OpenAI base URL: POST /v1/completions, /v1/chat/completions, /v1/responses; "
        f"GET /v1/models{bound})",
        f"  dashboard  {url}/dashboard",
        f"  metrics    {url}/metrics",
        f"  model {served_name(cfg)!r}, policy {cfg.scheduler.policy}; block store {cfg.store.root}",
        stop])


def _run_cluster(cfg: ClusterConfig, demo: bool, api_key: str) -> int:
    """Start the cluster, run the demo or serve until Ctrl-C or a stop signal (restarting engines that
    crash), then stop it, whatever happened; the exit code."""
    cluster: LocalCluster | None = None
    try:
        cluster = LocalCluster(cfg)
        print(f"starting {sum(e.role == 'prefill' for e in cfg.engines)} prefill + "
              f"{sum(e.role == 'decode' for e in cfg.engines)} decode engines ({cfg.model.weights or cfg.model.preset}"
              f", policy {cfg.scheduler.policy}); logs in {cluster.workdir}", flush=True)
        cluster.start()
        print(ready_message(cfg, cluster, demo), flush=True)
        if demo:
            demo_conversation(cluster.url, api_key=api_key)
            return 0
        while True:
            cluster.supervise()
            time.sleep(0.5)
    except (KeyboardInterrupt, Stopped):
        return 0
    except ClusterDied as e:  # the cluster has marked itself failed: its logs stay
        print(f"dualpath up: {e}\n(logs in {cluster.workdir})", file=sys.stderr)
        return 1
    except BaseException:
        if cluster is not None:
            cluster.failed = True
        raise
    finally:
        if cluster is not None:
            old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *STOP_SIGNALS)}
            try:  # a second Ctrl-C or stop signal must not cut the stop short
                print("stopping the cluster", flush=True)
                cluster.stop()
            finally:
                for sig, handler in old.items():
                    signal.signal(sig, handler)


__all__ = ["LocalCluster", "ClusterDied", "complete", "demo_conversation", "launch_local", "ConfigError"]
