"""A cluster across hosts: the coordinator and each engine in its own network namespace (bench/netns.py),
one shared store directory, every process started with `dualpath run` from one cluster.toml.

A multi-turn conversation on paths A, B and A+B gives exactly forward_reference's greedy tokens,
every full block of the earlier context is a hit, and the KV crossed between hosts over the tcp
data plane (the same-host memory copy of the shm and cuda backends is not taken between namespaces)."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from dualpath.bench import netns
from dualpath.config import local_cluster
from dualpath.engine.weights import load_pretrained
from dualpath.storage.blockfile import HEADER_BYTES
from tests.test_serving import greedy_reference

WHY_NOT = netns.available()
pytestmark = [pytest.mark.cluster,  # every test starts processes in network-namespace hosts
              pytest.mark.skipif(WHY_NOT is not None, reason=f"multi-host tests: {WHY_NOT}")]
BT, HTTP, CONTROL = 16, 8000, 7000


class Cluster(netns.NamespaceCluster):
    """pe0 and the coordinator on host 0, de<i> on host i (or the coordinator alone on host 0)."""

    def __init__(self, hosts: netns.Hosts, workdir, snic_read_gbps: float = 0.0, ports: int = 0,
                 coordinator_alone: bool = False):
        """`ports` shifts every port, so that two clusters can share the hosts."""
        first = 1 if coordinator_alone else 0
        cfg = local_cluster(1, hosts.n - 1 - first, base_port=7100 + ports)
        cfg.model.preset, cfg.store.root, cfg.store.block_tokens = "tiny-gqa", str(workdir / "store"), BT
        cfg.store.snic_read_gbps = snic_read_gbps
        cfg.scheduler.http_port, cfg.scheduler.control_port = HTTP + ports, CONTROL + ports
        cfg.engine.hbm_blocks, cfg.engine.buffer_blocks, cfg.engine.max_context = 512, 256, 2048
        super().__init__(hosts, cfg, workdir, coordinator_alone)


@pytest.fixture(scope="module")
def hosts():
    with netns.Hosts(3) as h:
        yield h


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    c = Cluster(hosts, tmp_path_factory.mktemp("multihost"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.mark.parametrize("policy,path", [("pe-read", "A"), ("de-read", "B"), ("dualpath-split", "A+B")])
def test_a_conversation_across_hosts_gives_the_reference_tokens_on_every_path(cluster, policy, path):
    model = load_pretrained("tiny-gqa")
    gen = torch.Generator().manual_seed(100 + ["A", "B", "A+B"].index(path))
    tokens, prev = torch.randint(0, 256, (90,), generator=gen).tolist(), []
    for turn in range(3):
        r = cluster.complete({"prompt": tokens, "max_tokens": 6, "temperature": 0, "dualpath_policy": policy})
        out = r["choices"][0]["token_ids"]
        assert out == greedy_reference(model, tokens, 6), f"turn {turn + 1} diverged"
        if turn:
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == (len(prev) - 1) // BT * BT
            assert r["dualpath"]["path"] == path
        prev = tokens + out
        tokens = prev + torch.randint(0, 256, (13,), generator=gen).tolist()


def test_kv_crosses_hosts_on_the_tcp_data_plane(cluster):
    engines = cluster.get("/v1/cluster")["engines"]
    links = {peer: backend for e in engines.values() for peer, backend in e["links"].items()}
    assert links and set(links.values()) == {"tcp"}  # shm maps only buffers of its own host
    assert engines["pe0"]["network_sent_bytes"].get("latency", 0) > 0  # handoffs to DEs on other hosts
    assert sum(e["network_sent_bytes"].get("bulk", 0) for n, e in engines.items() if n != "pe0") > 0  # path B


def test_kill_9_of_a_decode_host_mid_load_costs_a_retry_not_the_request(hosts, tmp_path):
    """Storage NICs at 200 KB/s, so path B loads for seconds: the decode engine reading it dies."""
    c = Cluster(hosts, tmp_path, snic_read_gbps=0.0002, ports=500).start()
    try:
        prompt = list(range(200)) * 5
        context = prompt + c.complete({"prompt": prompt, "max_tokens": 1})["choices"][0]["token_ids"]
        turn2, result = context + [1, 2, 3], {}
        t = threading.Thread(target=lambda: result.update(c.complete(
            {"prompt": turn2, "max_tokens": 4, "temperature": 0, "dualpath_policy": "de-read"})))
        t.start()
        deadline = time.monotonic() + 60  # a bound on a hang
        while True:
            loading = [n for n, e in c.get("/v1/cluster")["engines"].items()
                       if e["role"] == "decode" and e["read_queue_bytes"]]
            if loading:
                break
            assert time.monotonic() < deadline, "no decode engine started loading"
            time.sleep(0.1)
        c.procs[loading[0]].kill()
        t.join(120)
        assert result["choices"][0]["token_ids"] == greedy_reference(load_pretrained("tiny-gqa"), turn2, 4)
        assert result["dualpath"]["de"] != loading[0]
        assert c.get("/v1/cluster")["stats"]["retried"] >= 1
    finally:
        c.stop()


STREAMS_ON_HOST_0 = """
import json, sys, threading, time, urllib.request
url, bodies = sys.argv[1], json.loads(sys.argv[2])
results = [{"tokens": [], "finish": None, "error": None} for _ in bodies]

def stream(body, out):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=240) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        out["error"] = str(chunk["error"])
                    elif chunk.get("choices"):
                        out["tokens"] += chunk["choices"][0]["token_ids"]
                        out["finish"] = chunk["choices"][0]["finish_reason"] or out["finish"]
    except Exception as e:
        out["error"] = repr(e)

threads = [threading.Thread(target=stream, args=(b, o), daemon=True) for b, o in zip(bodies, results)]
for t in threads:
    t.start()
deadline = time.monotonic() + 120
while sum(len(o["tokens"]) >= 2 for o in results) < len(bodies) // 2 and time.monotonic() < deadline:
    time.sleep(0.02)
print("streaming", flush=True)
for t in threads:
    t.join(240)
print(json.dumps(results), flush=True)
"""


def test_streams_continue_across_hosts_when_a_decode_host_is_killed(hosts, tmp_path):
    """Request migration (issue #37) between namespace hosts: kill -9 of de1 while 8 greedy
    streams run; each goes on, on de2, with the reference tokens and no repeated token."""
    c = Cluster(hosts, tmp_path, ports=700).start()
    try:
        gen = torch.Generator().manual_seed(37)
        bodies = [{"prompt": torch.randint(0, 256, (60,), generator=gen).tolist(), "max_tokens": 40,
                   "ignore_eos": True, "temperature": 0, "dualpath_policy": "dualpath"} for _ in range(8)]
        model = load_pretrained("tiny-gqa")
        want = [greedy_reference(model, b["prompt"], 40) for b in bodies]
        driver = hosts.popen(0, [sys.executable, "-c", STREAMS_ON_HOST_0, c.url, json.dumps(bodies)],
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": netns._root()})
        try:
            assert driver.stdout.readline().strip() == "streaming"
            c.procs["de1"].kill()
            results = json.loads(driver.stdout.readline())
        finally:
            driver.kill()
            driver.wait(30)
        for i, (r, ref) in enumerate(zip(results, want)):
            assert r["error"] is None and r["tokens"] == ref and r["finish"] == "length", (i, r["error"])
        assert c.get("/v1/cluster")["stats"]["migrated"] >= 1
    finally:
        c.stop()


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    except ProcessLookupError:
        pass


def test_torchrun_starts_a_cluster_with_one_command_line_per_host(tmp_path):
    """Four hosts, one process each, each started by the same torchrun line but its node rank; the
    default rank map runs the coordinator on rank 0, then the engines in the config's order."""
    with netns.Hosts(4) as hosts:
        c = Cluster(hosts, tmp_path, coordinator_alone=True)
        assert c.cfg.rank_map() == ["coordinator", "pe0", "de1", "de2"]
        env = {**os.environ, "PYTHONPATH": netns._root(), "OMP_NUM_THREADS": "1"}
        launchers = [hosts.popen(i, ["torchrun", "--nnodes", "4", "--node-rank", str(i), "--nproc-per-node", "1",
                                     "--master-addr", hosts.addr(0), "--master-port", "29411", "-m", "dualpath.cli",
                                     "run", "--config", str(c.config_path)],
                                 stdout=open(tmp_path / f"torchrun{i}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True)
                     for i in range(4)]
        try:
            deadline = time.monotonic() + 120
            while sorted(c.get("/healthz", ok_only=False).get("engines", [])) != ["de1", "de2", "pe0"]:
                logs = {i: (tmp_path / f"torchrun{i}.log").read_text(errors="replace")[-800:] for i in range(4)}
                assert time.monotonic() < deadline and all(p.poll() is None for p in launchers), logs
                time.sleep(0.5)
            r = c.complete({"prompt": list(range(40)), "max_tokens": 3, "dualpath_policy": "de-read"})
            assert len(r["choices"][0]["token_ids"]) == 3
            engines = c.get("/v1/cluster")["engines"]
            assert {n: e["node"] for n, e in engines.items()} == {"pe0": 0, "de1": 1, "de2": 2}
        finally:
            for p in launchers:
                _kill_group(p)


def tc_stats(hosts: netns.Hosts, i: int, what: str = "qdisc") -> dict[str, dict[str, int]]:
    """`tc -s <what> show dev eth0` on host i: for each qdisc or class (by handle or class id), the
    bytes and packets it sent and its overlimits (the times it held a packet back at its rate)."""
    out = subprocess.run(["ip", "netns", "exec", hosts.ns(i), "tc", "-s", what, "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True, timeout=10).stdout
    stats, name = {}, None
    for line in out.splitlines():
        if m := re.match(r"(?:qdisc|class) \S+ (\S+)", line):
            name = m.group(1)
        elif (m := re.match(r"\s*Sent (\d+) bytes (\d+) pkt \(dropped \d+, overlimits (\d+)", line)) and name:
            stats[name] = {"bytes": int(m.group(1)), "packets": int(m.group(2)), "overlimits": int(m.group(3))}
    return stats


def test_path_b_loads_are_bounded_by_a_shaped_compute_link(tmp_path):
    """Decode hosts send through a 2 Mbit/s link (tc tbf): a path-B turn's hits go through that link
    (its shaper counts them), so it cannot load them faster than the link carries them, while a
    path-A turn of the same size puts nothing on it (the decode hosts' data planes send nothing).
    By bytes, not by time: the turns' times and rates are printed, a figure, not a threshold."""
    rate_Bps = 2e6 / 8
    with netns.Hosts(3) as hosts:
        for i in (1, 2):
            hosts.shape(i, "2mbit")

        def shaped_bytes() -> int:  # what the decode hosts' shaped links carried so far
            return sum(s["bytes"] for i in (1, 2) for s in tc_stats(hosts, i).values())

        def sent_by_decode_hosts() -> int:  # what the decode engines' data planes sent so far
            return sum(sum(e["network_sent_bytes"].values()) for n, e in c.get("/v1/cluster")["engines"].items()
                       if n != "pe0")

        c = Cluster(hosts, tmp_path).start()
        try:
            times, link, data, model = {}, {}, {}, load_pretrained("tiny-gqa")
            for k, policy in enumerate(("de-read", "pe-read")):
                prompt = [(7 * k + j) % 256 for j in range(1500)]
                context = prompt + c.complete({"prompt": prompt, "max_tokens": 1})["choices"][0]["token_ids"]
                turn2 = context + [1, 2, 3]
                link0, data0, t0 = shaped_bytes(), sent_by_decode_hosts(), time.monotonic()
                r = c.complete({"prompt": turn2, "max_tokens": 2, "temperature": 0, "dualpath_policy": policy})
                times[policy] = time.monotonic() - t0
                link[policy], data[policy] = shaped_bytes() - link0, sent_by_decode_hosts() - data0
                assert r["choices"][0]["token_ids"] == greedy_reference(model, turn2, 2)
                if policy == "de-read":  # the stored hit blocks the DE read, and the KV in them
                    hit_bytes = r["dualpath"]["read_bytes"]["de"]
                    hit_kv_bytes = hit_bytes - r["usage"]["prompt_tokens_details"]["cached_tokens"] // BT * HEADER_BYTES
            print(json.dumps({"turn_s": times, "shaped_link_bytes": link, "decode_hosts_sent_bytes": data,
                              "path_b_load_Bps": hit_bytes / times["de-read"], "link_Bps": rate_Bps}))
            # path B: the DE sent the hits' KV (the stored blocks less their file headers) to the PE,
            # and every byte of it went through the shaped link, with its packets' headers
            assert hit_bytes > 500_000 and data["de-read"] >= hit_kv_bytes > 0, (hit_bytes, hit_kv_bytes, data)
            assert link["de-read"] >= data["de-read"], link
            assert data["pe-read"] == 0, data  # path A: no KV from a decode host, over any link
        finally:
            c.stop()


_RECEIVER = """
import asyncio, json, torch
from dualpath.transport import make_dataplane
async def main():
    dp = make_dataplane("tcp", "rx", {token!r})
    await dp.start({addr!r})
    bulk, lat = dp.register(torch.zeros(8 << 20, dtype=torch.uint8)), dp.register(torch.zeros(4096, dtype=torch.uint8))
    print(json.dumps({{"bulk": bulk, "lat": lat}}), flush=True)
    await asyncio.sleep(120)  # (stays up to receive until the test kills it)
asyncio.run(main())
"""

_SENDER = """
import asyncio, json, statistics, time, torch
from dualpath.transport import make_dataplane
handles = json.loads({handles!r})
async def main():
    dp = make_dataplane("tcp", "tx", {token!r})
    await dp.start({addr!r})
    msg, big = torch.ones(512, dtype=torch.uint8), torch.ones(512 << 10, dtype=torch.uint8)
    async def latencies(n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await dp.write(msg, handles["lat"], 0, 512, "latency")
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.005)  # paces the probes (a client's rate), not a wait for anything
        return out
    await latencies(20)
    idle = await latencies(150)
    stop, moved = asyncio.Event(), [0]
    async def bulk():
        while not stop.is_set():
            await dp.write(big, handles["bulk"], 0, 512 << 10, "bulk")
            moved[0] += 512 << 10
    tasks = [asyncio.create_task(bulk()) for _ in range(2)]
    while moved[0] < 2 * (512 << 10):  # the link's queue fills: both bulk writers have had a write go through it
        await asyncio.sleep(0.01)
    t0, m0 = time.perf_counter(), moved[0]
    busy = await latencies(150)
    rate = (moved[0] - m0) / (time.perf_counter() - t0)
    stop.set()
    await asyncio.gather(*tasks)
    p99 = lambda xs: statistics.quantiles(xs, n=100)[98]
    print(json.dumps({{"idle_p99_s": p99(idle), "busy_p99_s": p99(busy), "bulk_Bps": rate, "bulk_bytes": moved[0],
                      "latency_writes": 20 + len(idle) + len(busy), "latency_write_bytes": 512}}))
asyncio.run(main())
"""


def _latency_under_bulk(by_class: bool, rate_mbit: int = 20) -> dict:
    """Host 1 sends bulk writes that fill its shaped link and, meanwhile, small latency-class writes
    to host 0; their p99 write time, idle and busy, the bulk rate reached, the bytes and writes
    sent, and (under "link") what host 1's qdisc and classes counted."""
    token = "multihost-link-test-token"
    with netns.Hosts(2) as hosts:
        (hosts.shape_by_class if by_class else hosts.shape)(1, f"{rate_mbit}mbit")
        rx = hosts.popen(0, [sys.executable, "-c", _RECEIVER.format(token=token, addr=hosts.addr(0))],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": netns._root()})
        try:
            handles = rx.stdout.readline()
            out = hosts.python(1, _SENDER.format(token=token, addr=hosts.addr(1), handles=handles), timeout=120)
            return {**json.loads(out), "link": tc_stats(hosts, 1, "class" if by_class else "qdisc")}
        finally:
            rx.kill()
            rx.wait()


def test_handoffs_keep_their_latency_while_path_b_fills_a_class_scheduled_link():
    """The data plane marks each traffic class (DSCP): on a link that schedules by class (netns.py's
    HTB: EF first, everything else after), every latency-class write goes through the priority class
    and no bulk write does, while bulk fills the link (it held packets back at its rate). Asserted
    by the link's own counts, not by time: the latency figures (p99 idle and under bulk, here and on
    a plain FIFO link of the same rate, where the same traffic waits behind the queued bulk bytes)
    are printed, a benchmark's figure that a busy host changes."""
    classed, fifo = _latency_under_bulk(by_class=True), _latency_under_bulk(by_class=False)
    print(json.dumps({name: {k: v for k, v in r.items() if k != "link"}
                      for name, r in (("class_scheduled", classed), ("fifo", fifo))}))
    link = classed["link"]
    latency_bytes = classed["latency_writes"] * classed["latency_write_bytes"]
    # the priority class (1:10) carried every latency write, and less than one 512 KiB bulk write:
    # the bulk writes (1:20, the default class) are not marked EF
    assert latency_bytes <= link["1:10"]["bytes"] < 512 << 10, (latency_bytes, link)
    assert link["1:20"]["bytes"] >= classed["bulk_bytes"] > 0, (classed["bulk_bytes"], link)
    assert link["1:1"]["overlimits"] > 0, link  # the link was full: its rate held bulk back
    fifo_qdisc = next(iter(fifo["link"].values()))
    assert fifo_qdisc["bytes"] >= fifo["bulk_bytes"] > 0 and fifo_qdisc["overlimits"] > 0, fifo
