"""The live dashboard: its data feed agrees with the work a cluster did, its page works behind a
reverse proxy's path prefix, and headless Chromium draws every chart from it (skipped where
Chromium is absent). /metrics: the vLLM-named families, with model_name, move with the work done,
and the Grafana dashboard asks only for what a scrape has."""

import http.server
import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dualpath.launcher import LocalCluster, complete
from tests.conftest import wait_until
from tests.test_serving import BT, cluster_config

pytestmark = pytest.mark.cluster  # every test reads a LocalCluster's dashboard

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHARTS = ("read", "write", "queue", "paths", "ttft", "tpot", "failures", "memory")
MODEL = "tiny-gqa"


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """A /metrics scrape as (sample name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """A 1P2D cluster after two conversations: one on path A, one on path B (their second turns hit;
    a first turn has nothing to load, and counts as path A). Also /metrics as it was before them,
    and the clock time they began."""
    cfg = cluster_config(2, MODEL, str(tmp_path_factory.mktemp("store")))
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        before, began = get(c.url + "/metrics").decode(), time.time()
        paths = []
        for policy, first in (("pe-read", 11), ("de-read", 57)):
            prompt = [(first + 7 * i) % 256 for i in range(6 * BT)]
            for _ in range(2):
                r = complete(c.url, {"prompt": prompt, "max_tokens": 4, "dualpath_policy": policy})
                paths.append(r["dualpath"]["path"])
                prompt = prompt + r["choices"][0]["token_ids"] + [3, 1, 4]
        assert paths == ["A", "A", "A", "B"]
        answered = time.time()
        wait_until(lambda: caught_up(json.loads(get(c.url + "/dashboard/data")), answered),
                   "the feed has two samples after the last answer, with both nodes' reads")
        yield SimpleNamespace(url=c.url, metrics_before=before, began=began)


def caught_up(data: dict, answered: float) -> bool:
    """The feed has two samples taken after `answered` (clock time), and has seen the PE's node and
    a DE's node read (their byte counts come with the engines' heartbeats)."""
    read = {node: sum(v for v in values if v) for node, values in data["read_bps"].items()}
    return (sum(t > answered for t in data["time"]) >= 2 and read.get("0", 0) > 0
            and read.get("1", 0) + read.get("2", 0) > 0)


def test_the_feed_shows_both_nodes_reading_and_the_paths_taken(worked):
    data = json.loads(get(worked.url + "/dashboard/data"))
    n = len(data["t"])
    assert n >= 3 and data["t"] == sorted(data["t"])
    assert data["roles"] == {"0": "prefill", "1": "decode", "2": "decode"}
    read_by_node = {node: sum(v for v in values if v) for node, values in data["read_bps"].items()}
    assert read_by_node["0"] > 0  # path A: the PE's node read
    assert read_by_node["1"] + read_by_node["2"] > 0  # path B: a DE's node read
    answered = {p: sum(v for v in values if v) * data["period_s"] for p, values in data["path_rps"].items()}
    assert round(answered["A"]) == 3 and round(answered["B"]) == 1 and round(answered["A+B"]) == 0
    assert all(len(values) == n for series in ("read_bps", "buffer_used", "ttft_s", "tpot_s", "failures_ps")
               for values in data[series].values())
    assert {"pe0", "de1", "de2"} <= set(data["hbm_used"])


def test_the_feed_gives_clock_time_tpot_failures_model_and_policy(worked):
    data = json.loads(get(worked.url + "/dashboard/data"))
    assert len(data["time"]) == len(data["t"]) and data["time"] == sorted(data["time"])
    assert data["time"][0] <= worked.began <= data["time"][-1] <= time.time()  # the clock's time, not uptime
    assert any(v is not None for v in data["tpot_s"]["p50"])  # 4-token answers: 3 gaps each
    assert set(data["failures_ps"]) == {"engine", "rejected", "timeout", "unauthorized", "unavailable"}
    assert (data["model"], data["policy"]) == (MODEL, "dualpath")


class PrefixProxy(http.server.ThreadingHTTPServer):
    """A reverse proxy serving `target` under /prefix/, as nginx's `location /prefix/ { proxy_pass
    http://target/; }` does; Location headers pass unchanged (a relative one keeps the prefix)."""

    def __init__(self, target: str):
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if not self.path.startswith("/prefix/"):
                    self.send_error(404, "outside the prefix")
                    return
                proxy.requested.append(self.path)
                req = urllib.request.Request(target + self.path.removeprefix("/prefix"))
                opener = urllib.request.build_opener(NoRedirect)
                try:
                    r = opener.open(req, timeout=10)
                except urllib.error.HTTPError as e:  # a redirect or an error: pass it on as it is
                    r = e
                with r:
                    body = r.read()
                    self.send_response(r.status)
                    for k in ("Content-Type", "Location"):
                        if r.headers.get(k):
                            self.send_header(k, r.headers[k])
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *_):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.requested: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/prefix"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_):
        return None  # the proxy passes a redirect to its client, as proxies do


def test_the_page_works_behind_a_path_prefix(worked):
    """Behind /prefix/, everything the page loads and polls resolves under /prefix/ (its URLs are
    relative), and /prefix/dashboard/ redirects to /prefix/dashboard."""
    proxy = PrefixProxy(worked.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        page_url = proxy.url + "/dashboard"
        page = get(page_url).decode()
        refs = re.findall(r'(?:src|href)="([^"]+)"', page) + re.findall(r'fetch\("([^"]+)"\)', page)
        assert len(refs) == 3 and not any(r.startswith(("/", "http")) for r in refs), refs
        for ref in refs:
            resolved = urllib.parse.urljoin(page_url, ref)
            assert resolved.startswith(proxy.url + "/dashboard/"), resolved
            assert len(get(resolved)) > 0
        data = json.loads(get(urllib.parse.urljoin(page_url, "dashboard/data")))
        assert data["model"] == MODEL
        with urllib.request.urlopen(proxy.url + "/dashboard/", timeout=10) as r:  # follows the redirect
            assert r.geturl() == page_url and b"uPlot" in r.read()
        assert all(p.startswith("/prefix/dashboard") for p in proxy.requested), proxy.requested
    finally:
        proxy.shutdown()
        proxy.server_close()


VLLM_FAMILIES = {  # family -> what a scrape shows of it
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:request_success": "counter", "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter",
    "vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_max_tokens": "histogram", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram", "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
}


def test_vllm_named_families_carry_model_name_and_move_with_the_work(worked):
    text = get(worked.url + "/metrics").decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in VLLM_FAMILIES.items():
        assert name in families and families[name].type == kind, name
        assert families[name].samples and all(s.labels.get("model_name") == MODEL for s in families[name].samples), name
    before, after = samples(worked.metrics_before), samples(text)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted({"model_name": MODEL, **labels}.items())))
        return after[key] - before.get(key, 0.0)

    # four answers of 4 tokens: two first turns of 6 blocks, two second turns that hit their 6 blocks
    assert sum(moved("vllm:request_success_total", finished_reason=r) for r in ("stop", "length", "abort")) == 4
    assert moved("vllm:generation_tokens_total") == 16
    prompts = moved("vllm:prompt_tokens_total")
    assert prompts == moved("vllm:prefix_cache_queries_total") == moved("vllm:request_prompt_tokens_sum") > 24 * BT
    assert moved("vllm:prefix_cache_hits_total") == 2 * 6 * BT
    for histogram in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                      "vllm:time_per_output_token_seconds", "vllm:request_queue_time_seconds",
                      "vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds",
                      "vllm:request_generation_tokens"):
        assert moved(histogram + "_count") == 4 and moved(histogram + "_sum") > 0, histogram
    assert moved("vllm:num_requests_running") == 0 and moved("vllm:num_requests_waiting") == 0  # all answered
    usage = {s.labels["engine"] for s in families["vllm:kv_cache_usage_perc"].samples}
    assert usage == {"pe0", "de1", "de2"}
    assert all(0 <= s.value <= 1 for s in families["vllm:kv_cache_usage_perc"].samples)
    info = [s.labels for s in families["dualpath_cluster_info"].samples]
    assert info == [{"model_name": MODEL, "policy": "dualpath"}], info


def test_the_page_and_its_chart_library_are_served_from_the_package(worked):
    page = get(worked.url + "/dashboard").decode()
    assert '"dashboard/static/uPlot.iife.min.js"' in page and "http" not in page.split("<script>")[0].lower()
    assert len(get(worked.url + "/dashboard/static/uPlot.iife.min.js")) > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this host (apt-get install chromium)")
def test_headless_chromium_draws_every_chart(worked, tmp_path):
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30)
    if version.returncode != 0:  # e.g. Ubuntu's chromium-browser, a stub that asks for snap
        pytest.skip(f"{CHROMIUM} does not run here: {(version.stdout + version.stderr).strip()[:200]}")
    shot = tmp_path / "dashboard.png"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1100",
            "--virtual-time-budget=4000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*args, "--dump-dom", worked.url + "/dashboard"], capture_output=True, text=True,
                         timeout=90).stdout
    points = {m[0]: int(m[1]) for m in re.findall(r'id="(\w+)" class="chart" data-points="(\d+)"', dom)}
    assert set(points) == set(CHARTS), dom[:2000]
    assert all(points[c] > 0 for c in CHARTS), points  # every chart received data
    assert 'data-updates="' in dom
    # 3 of the 4 answers took path A; the shares come from rates over sample periods of nearly equal length
    share = re.search(r"path share over them: A (\d+)%, B (\d+)%, A\+B 0%", dom)
    assert share and 65 <= int(share[1]) <= 85 and int(share[1]) + int(share[2]) in (99, 100, 101), dom[:2000]
    subprocess.run([*args, f"--screenshot={shot}", worked.url + "/dashboard"], capture_output=True, timeout=90)
    assert shot.stat().st_size > 20_000  # a drawn page, not a blank one


def test_the_grafana_dashboard_asks_only_for_metrics_the_cluster_serves(worked):
    """examples/grafana-dashboard.json cannot drift from the code: every series its queries name is
    in a real scrape of /metrics (after requests on both paths, so labelled series exist too)."""
    dashboard = json.loads((Path(__file__).parent.parent / "examples" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10
    assert all(p["datasource"]["uid"] == "${DS_PROMETHEUS}" for p in dashboard["panels"])
    # a dashboard model Grafana imports as drawn: unique panel ids and refIds, panels side by side on
    # its 24-column grid without overlapping
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(len({t["refId"] for t in p["targets"]}) == len(p["targets"]) for p in dashboard["panels"])
    cells = [(x, y) for p in dashboard["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(set(cells)) == len(cells) and all(x < 24 for x, _ in cells)
    text = get(worked.url + "/metrics").decode()
    metric = r"(?:dualpath_|vllm:)[\w:]+"
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if re.match(metric, line)}
    # a labelled family with no sample yet (no failure so far) is still declared by its TYPE line
    suffixes = {"counter": ["", "_total"], "histogram": ["_bucket", "_sum", "_count"]}
    scraped |= {name.removesuffix("_total") + suffix if kind == "counter" else name + suffix
                for name, kind in re.findall(rf"^# TYPE ({metric}) (\w+)$", text, re.M)
                for suffix in suffixes.get(kind, [""])}
    named = {name for e in exprs for name in re.findall(rf"\b{metric}", e)}
    assert named and named <= scraped, sorted(named - scraped)
    assert any(name.startswith("vllm:") for name in named)  # the panels a vLLM user looks for
    labels = {label for e in exprs for label in re.findall(r"by \(([^)]*)\)", e) for label in label.split(", ")}
    assert labels <= {"node", "path", "le", "engine", "memory", "kind", "traffic_class", "cause", "stage", "role",
                      "backend", "model_name", "finished_reason"}
    # the model_name variable the vLLM panels filter by is one a scrape has
    variables = dashboard["templating"]["list"]
    assert [v["name"] for v in variables] == ["model_name"] and "vllm:num_requests_running" in variables[0]["definition"]
