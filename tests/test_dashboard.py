"""The live dashboard: its data feed agrees with the work a cluster did, and headless Chromium draws
every chart from it (skipped where Chromium is absent)."""

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dualpath.launcher import LocalCluster, complete
from tests.test_serving import BT, cluster_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHARTS = ("read", "write", "queue", "paths", "ttft", "memory")


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    """A 1P2D cluster after two conversations: one on path A, one on path B (their second turns hit;
    a first turn has nothing to load, and counts as path A)."""
    cfg = cluster_config(2, "tiny-gqa", str(tmp_path_factory.mktemp("store")))
    with LocalCluster(cfg, str(tmp_path_factory.mktemp("run"))) as c:
        paths = []
        for policy, first in (("pe-read", 11), ("de-read", 57)):
            prompt = [(first + 7 * i) % 256 for i in range(6 * BT)]
            for _ in range(2):
                r = complete(c.url, {"prompt": prompt, "max_tokens": 4, "dualpath_policy": policy})
                paths.append(r["dualpath"]["path"])
                prompt = prompt + r["choices"][0]["token_ids"] + [3, 1, 4]
        assert paths == ["A", "A", "A", "B"]
        time.sleep(2.5)  # two more samples after the last answer
        yield c


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
    assert all(len(values) == n for series in ("read_bps", "buffer_used", "ttft_s") for values in data[series].values())
    assert {"pe0", "de1", "de2"} <= set(data["hbm_used"])


def test_the_page_and_its_chart_library_are_served_from_the_package(worked):
    page = get(worked.url + "/dashboard").decode()
    assert "/dashboard/static/uPlot.iife.min.js" in page and "http" not in page.split("<script>")[0].lower()
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
    scraped = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("dualpath_")}
    # a labelled family with no sample yet (no failure so far) is still declared by its TYPE line
    suffixes = {"counter": ["", "_total"], "histogram": ["_bucket", "_sum", "_count"]}
    scraped |= {name.removesuffix("_total") + suffix if kind == "counter" else name + suffix
                for name, kind in re.findall(r"^# TYPE (dualpath_\w+) (\w+)$", text, re.M)
                for suffix in suffixes.get(kind, [""])}
    named = {name for e in exprs for name in re.findall(r"\bdualpath_\w+", e)}
    assert named and named <= scraped, sorted(named - scraped)
    labels = {label for e in exprs for label in re.findall(r"by \(([^)]*)\)", e) for label in label.split(", ")}
    assert labels <= {"node", "path", "le", "engine", "memory", "kind", "traffic_class", "cause", "stage", "role",
                      "backend"}
