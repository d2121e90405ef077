"""The GPU acceptance run's verdicts, checked on committed runs (no GPU needed: the steps' JSON is read)."""

import json
from pathlib import Path

from dualpath.bench.gpu_acceptance import _ingest, _rates, steps

RUNS = Path(__file__).resolve().parents[1] / "runs"


def _load(path: str) -> dict:
    return json.loads((RUNS / path).read_text())


def test_ingest_rows_hold_each_path_to_8_gbps_beside_the_raw_read():
    rows = _ingest(_load("gpu/s7_one_gpu/ingest_r16_c32768.json"))  # one H200: 4.64 and 4.71 GB/s
    assert [r.figure.split(",")[0] for r in rows] == ["ingest path A", "ingest path B"]
    assert [round(r.value, 2) for r in rows] == [4.64, 4.71] and not any(r.passed for r in rows)
    assert all("raw page-cache read" in r.limit for r in rows)


def test_rates_rows_ask_1_8x_only_where_pe_read_is_storage_bound_and_0_97x_the_better_side_everywhere():
    low = {r.figure: r for r in _rates(1)(_load("gpu/s6_rates/repro_1gbps.json"))}  # PE node 0.43 busy
    assert not any("storage-bound" in f for f in low)
    assert low["repro at 1 GB/s: dualpath (x the better fixed side)"].passed  # 39,730 vs de-read 38,163
    high = {r.figure: r for r in _rates(16)(_load("gpu/s6_rates/repro_16gbps.json"))}
    split = high["repro at 16 GB/s: dualpath-split (x the better fixed side)"]
    assert not split.passed and round(split.value, 2) == 0.91  # 42,895 vs de-read 47,159
    cpu = {r.figure: r for r in _rates(0.008)(_load("repro_s7/repro.json"))}  # 8 MB/s: PE node 0.99 busy
    bound = cpu["repro at 0.008 GB/s, storage-bound: dualpath (x pe-read)"]
    assert bound.passed and round(bound.value, 2) == 2.76


def test_the_run_has_an_ingest_step_and_one_repro_per_storage_rate():
    names = {s.name: s for s in steps(gpus=2, port=18700)}
    assert {"ingest", "rates_1", "rates_4", "rates_16"} <= set(names)
    argv = names["rates_16"].argv
    assert argv[argv.index("--snic-gbps") + 1] == "16" and "--no-online" in argv
    assert names["ingest"].argv[names["ingest"].argv.index("--context") + 1] == "32768"
