"""`dualpath bench gpu`: the GPU acceptance run, one command on any host with a GPU.

Each step is one of the project's own commands (the CUDA-capable tests, `dualpath up --demo`, and the
part benchmarks), run as its own process so that a crash fails that step and not the run. Every
figure is set against a limit measured in the same run and a target; the run prints one table,
writes it as JSON, and exits non-zero on any crash, failed request or missed target.

Engine i runs on GPU i (1P(n-1)D on n GPUs). On one GPU the PE and the DE share it: those figures
are not the two-GPU targets, and the table says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dualpath.bench.common import commit, host_info

TESTS = ["tests/test_device.py", "tests/test_transport.py", "tests/test_dataplane_cuda.py", "tests/test_model.py",
         "tests/test_attention.py", "tests/test_families.py", "tests/test_moe.py", "tests/test_storage.py"]
# Never turn on NVLink multicast: on a shared host a program using it can take the GPUs down.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Row:
    figure: str
    value: float | None  # None: the step produced no figure (it crashed)
    limit: str  # the reference it is measured against, from the same run
    target: str
    passed: bool
    note: str = ""


@dataclass
class Step:
    name: str
    argv: list[str]
    rows: Callable[[dict], list[Row]]  # the step's JSON -> its rows (not called for a command without JSON)
    json_name: str | None = None


@dataclass
class Acceptance:
    gpus: int
    out_dir: Path
    rows: list[Row] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def _agreement_rows(preset: str, dtype: str) -> Callable[[dict], list[Row]]:
    """fp32 must give the reference's greedy tokens exactly; bf16 within bf16 noise (bench agreement)."""
    key = "agreement" if dtype == "float32" else "within_noise"

    def rows(r: dict) -> list[Row]:
        out = []
        for policy, v in r["policies"].items():
            path = "+".join(sorted(set(v["paths"][1:]))) or "?"
            what = "exact" if dtype == "float32" else "within bf16 noise"
            out.append(Row(f"agreement {preset} {dtype}, {policy} (path {path})", v[key],
                           "forward_reference, same weights", f"100% {what}", v[key] >= 1.0,
                           f"{v['agree']}/{v['generated']} strict"))
        return out

    return rows


def _h2d(r: dict) -> list[Row]:
    return [Row(f"paged H2D {r['preset']} (GB/s ratio)", r["ratio"],
                f"pinned copy peak {r['pinned_copy_peak_GBps']:.1f} GB/s", ">= 0.80", r["ratio"] >= 0.8,
                f"{r['paged_h2d_GBps']:.1f} GB/s")]


def _transport(r: dict) -> list[Row]:
    gbps = r["write_GBps_by_MiB"]["64"]
    ref = r.get("p2p_tensor_copy_GBps")
    ratio = gbps / ref if ref else None
    return [Row("cuda transport, 64 MiB writes GPU0 -> GPU1", ratio,
                f"P2P tensor copy {ref:.0f} GB/s" if ref else "no second GPU", ">= 0.50",
                ratio is not None and ratio >= 0.5, f"{gbps:.1f} GB/s")]


def _overlap(r: dict) -> list[Row]:
    limit = max(r["load_only_s"], r["compute_only_s"])
    return [Row(f"prefill {r['cached_tokens'] // 1024}K cached + {r['new_tokens']} new", r["ratio_to_max"],
                f"max(load only {r['load_only_s'] * 1e3:.1f}, compute only {r['compute_only_s'] * 1e3:.1f} ms)",
                "<= 1.15", r["ratio_to_max"] <= 1.15, f"{r['prefill_s'] * 1e3:.1f} ms vs {limit * 1e3:.1f} ms")]


def _interference(r: dict) -> list[Row]:
    loaded = r["background_tokens_loaded_per_s"]
    return [Row("decode TPOT with path-B loads (increase)", r["increase"],
                f"TPOT alone {r['tpot_alone_s'] * 1e3:.2f} ms", "< +5% at >= 900K tokens/s",
                r["increase"] < 0.05 and loaded >= 900e3,
                f"{r['tpot_with_path_b_s'] * 1e3:.2f} ms, {loaded / 1e3:.0f}K tokens/s loaded")]


def _roofline(r: dict) -> list[Row]:
    """Issue 31's targets: each step kind against the HBM bandwidth and the matmul throughput
    measured in the same run (bench roofline)."""
    lim = r["limits"]
    limit = f"{lim['hbm_gbps']:.0f} GB/s copy, {lim['matmul_tflops']:.0f} TFLOP/s GEMM"
    out = []
    for row in r["rows"]:
        what = f"{row['preset']} {row['kind']} {row['batch']} x {row['new_tokens']}, context {row['context']}"
        note = f"{row['ms']:.2f} ms, roofline {row['roofline_ms']:.2f} ms"
        if row["kind"] == "decode" and row["context"] == 20480 and row["batch"] in (1, 48):
            target = 0.5 if row["batch"] == 48 else 0.25
            out.append(Row(f"{what}: share of HBM bandwidth", row["hbm_share"], limit, f">= {target}",
                           row["hbm_share"] >= target, note))
        elif row["kind"] == "append" and row["new_tokens"] == 512:
            out.append(Row(f"{what}: time / roofline", row["of_roofline"], limit, "<= 2.5",
                           row["of_roofline"] <= 2.5, note))
        elif row["kind"] == "prefill" and (row["batch"], row["new_tokens"]) == (8, 1024):
            out.append(Row(f"{what}: share of matmul throughput", row["matmul_share"], limit, ">= 0.3",
                           row["matmul_share"] >= 0.3, note))
    return out


def _repro(p: int, d: int) -> Callable[[dict], list[Row]]:
    def rows(r: dict) -> list[Row]:
        s = {x["policy"]: x for x in r["offline"]["summaries"]}
        ratio = r["offline"]["ratio_vs_pe_read"]["dualpath"]
        failed = sum(x["failed"] for x in s.values())
        return [Row(f"repro {p}P{d}D dualpath tokens/s (x pe-read)", ratio,
                    f"pe-read {s['pe-read']['tokens_per_s']:,.0f} tokens/s; bound {(p + d) / p:.1f}x",
                    ">= 0.9 of the bound", ratio >= 0.9 * (p + d) / p and failed == 0,
                    f"{s['dualpath']['tokens_per_s']:,.0f} tokens/s, {failed} failed requests")]

    return rows


def _ingest(r: dict) -> list[Row]:
    """Issue 21: how fast stored KV reaches a PE's HBM on each path, storage unthrottled."""
    raw = r["raw_page_cache_read_GBps"]
    return [Row(f"ingest path {p}, {r['requests']} x {r['context_tokens'] // 1024}K queued (GB/s)", v["GBps"],
                f"raw page-cache read {raw:.1f} GB/s", ">= 8 GB/s", v["GBps"] >= 8.0,
                f"{v['GBps'] / raw:.2f} of the raw read") for p, v in sorted(r["paths"].items())]


def _rates(gbps: float) -> Callable[[dict], list[Row]]:
    """Issue 21 at one storage-NIC rate: wherever pe-read is storage-bound (its PE node reads >= 0.8
    of the NIC), dualpath >= 1.8x pe-read; everywhere, each mixing policy >= 0.97x the better fixed side."""
    def rows(r: dict) -> list[Row]:
        s = {x["policy"]: x for x in r["offline"]["summaries"]}
        best = max(("pe-read", "de-read"), key=lambda p: s[p]["tokens_per_s"])
        util = s["pe-read"]["nodes"]["0"]["read_util"]
        out = []
        if util >= 0.8:
            ratio = s["dualpath"]["tokens_per_s"] / s["pe-read"]["tokens_per_s"]
            out.append(Row(f"repro at {gbps:g} GB/s, storage-bound: dualpath (x pe-read)", ratio,
                           f"pe-read {s['pe-read']['tokens_per_s']:,.0f} tokens/s, PE node read use {util:.2f}",
                           ">= 1.8", ratio >= 1.8))
        for p in ("dualpath", "dualpath-split"):
            ratio = s[p]["tokens_per_s"] / s[best]["tokens_per_s"]
            out.append(Row(f"repro at {gbps:g} GB/s: {p} (x the better fixed side)", ratio,
                           f"{best} {s[best]['tokens_per_s']:,.0f} tokens/s; PE node read use {util:.2f}",
                           ">= 0.97", ratio >= 0.97 and s[p]["failed"] == 0))
        return out

    return rows


def steps(gpus: int, port: int) -> list[Step]:
    dp = [sys.executable, "-m", "dualpath.cli"]
    decode = max(1, gpus - 1)
    cluster = ["--device", "cuda", "--port"]
    out = [
        Step("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], lambda r: []),
        Step("demo", [*dp, "up", "--prefill", "1", "--decode", str(decode), "--model", "small-gqa", "--demo",
                      "--device", "cuda", "--port", str(port), "--store", "{tmp}/demo-store"], lambda r: []),
    ]
    for preset in ("small-gqa", "small-mla", "small-moe"):
        for dtype in ("float32", "bfloat16"):
            name = f"agreement_{preset.replace('-', '_')}_{dtype}"
            out.append(Step(name, [*dp, "bench", "agreement", "--model", preset, "--dtype", dtype, *cluster,
                                   str(port), "--out", "{out}"], _agreement_rows(preset, dtype), name))
    out += [
        Step("roofline", [*dp, "bench", "roofline", "--out", "{out}"], _roofline, "roofline"),
        Step("h2d", [*dp, "bench", "h2d", "--preset", "small-gqa", "--out", "{out}"], _h2d, "h2d"),
        Step("transport", [*dp, "bench", "transport", "--backend", "cuda", "--out", "{out}"], _transport, "transport"),
        Step("overlap", [*dp, "bench", "overlap", "--model", "small-gqa", "--dtype", "bfloat16", *cluster, str(port),
                         "--cached", "32768", "--new", "512", "--out", "{out}"], _overlap, "overlap"),
        Step("interference", [*dp, "bench", "interference", "--model", "small-gqa", "--dtype", "bfloat16",
                              *cluster, str(port), "--context", "16384", "--out", "{out}"], _interference,
             "interference"),
        Step("repro", [*dp, "bench", "repro", "--prefill", "1", "--decode", str(decode), "--device", "cuda",
                       "--model", "small-gqa", "--dtype", "bfloat16", "--snic-gbps", "0.2", "--no-online",
                       "--no-unbounded", "--policies", "pe-read,dualpath", "--port", str(port),
                       "--out-dir", "{dir}/repro"], _repro(1, decode), "repro/repro"),
        Step("ingest", [*dp, "bench", "ingest", "--model", "small-gqa", "--dtype", "bfloat16", *cluster, str(port),
                        "--requests", "16", "--context", "32768", "--out", "{out}"], _ingest, "ingest"),
    ]
    for gbps in (1, 4, 16):  # issue 21's table: storage NICs at real rates
        out.append(Step(f"rates_{gbps}", [*dp, "bench", "repro", "--prefill", "1", "--decode", str(decode), "--device",
                                          "cuda", "--model", "small-gqa", "--dtype", "bfloat16", "--snic-gbps",
                                          str(gbps), "--no-online", "--no-unbounded", "--port", str(port),
                                          "--out-dir", f"{{dir}}/rates_{gbps}"], _rates(gbps), f"rates_{gbps}/repro"))
    return out


def _run_step(step: Step, acc: Acceptance, tmp: str, timeout_s: float) -> list[Row]:
    out_json = acc.out_dir / f"{step.json_name}.json" if step.json_name else None
    argv = [a.format(out=out_json, dir=acc.out_dir, tmp=tmp) for a in step.argv]
    log_path = acc.out_dir / f"{step.name}.log"
    print(f"== {step.name}: {' '.join(argv[1:])}", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                env={**os.environ, **SAFE_ENV, "PYTHONUNBUFFERED": "1"}).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout_s:.0f} s"
    acc.seconds[step.name] = time.monotonic() - t0
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    if rc != 0:
        return [Row(step.name, None, "", "runs without error", False, f"exit {rc}: {tail[0][:120]}")]
    if out_json is None:
        return [Row(step.name, 1.0, "", "runs without error", True, tail[0][:120])]
    try:
        return step.rows(json.loads(out_json.read_text()))
    except (OSError, KeyError, ValueError) as e:
        return [Row(step.name, None, "", "writes its figures", False, f"{type(e).__name__}: {e}")]


def table(rows: list[Row]) -> str:
    lines = ["| figure | value | limit (same run) | target | result | note |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.3f}"
        lines.append(f"| {r.figure} | {value} | {r.limit} | {r.target} | {'PASS' if r.passed else 'FAIL'} | {r.note} |")
    return "\n".join(lines)


def run(out_dir: str, only: tuple[str, ...], port: int, step_timeout_s: float) -> int:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        print("dualpath bench gpu: no GPU is visible on this host (it needs at least one)", file=sys.stderr)
        return 2
    acc = Acceptance(gpus, Path(out_dir))
    acc.out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in steps(gpus, port) if not only or s.name in only or s.name.split("_")[0] in only]
    shared = "PE and DE share cuda:0, so these are NOT the two-GPU figures" if gpus == 1 else \
        f"1P{gpus - 1}D, engine i on cuda:i"
    print(f"{gpus} GPU(s) ({', '.join(host_info().get('gpus', []))}): {shared}", flush=True)
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dualpath-gpu-") as tmp:
        for step in chosen:
            rows = _run_step(step, acc, tmp, step_timeout_s)
            acc.rows += rows
            print("   " + "; ".join(f"{r.figure}: {'PASS' if r.passed else 'FAIL'}" for r in rows), flush=True)
            failed = _write(acc)  # after every step, so a run cut short still leaves what it measured
    print()
    print(table(acc.rows))
    if gpus == 1:
        print(f"\nNote: {shared}.")
    print(f"\n{len(acc.rows) - len(failed)}/{len(acc.rows)} PASS; wrote {acc.out_dir}/acceptance.json")
    return 1 if failed else 0


def _write(acc: Acceptance) -> list[str]:
    failed = [r.figure for r in acc.rows if not r.passed]
    result = {"bench": "gpu", "host": host_info(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "commit": commit(), "gpus": acc.gpus, "shared_gpu": acc.gpus == 1, "steps_s": acc.seconds,
              "rows": [asdict(r) for r in acc.rows], "failed": failed}
    (acc.out_dir / "acceptance.json").write_text(json.dumps(result, indent=2))
    return failed
