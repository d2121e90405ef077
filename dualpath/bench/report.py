"""Turn run records into numbers (summary dicts, a terminal table) and PNG plots."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from dualpath.bench.driver import RunResult


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(values, [50, 90, 99])
    return {"p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2])}


def engine_nodes(run: RunResult) -> dict[str, int]:
    return {name: e["node"] for s in run.samples for name, e in s["engines"].items()}


def node_io(run: RunResult) -> dict[int, dict[str, int]]:
    """Bytes each node's storage NIC moved during the run (engine counters, first to last sample)."""
    first, last = run.samples[0]["engines"], run.samples[-1]["engines"]
    out: dict[int, dict[str, int]] = defaultdict(lambda: {"read_bytes": 0, "write_bytes": 0})
    for name, e in last.items():
        f = first.get(name, {"read_bytes": 0, "write_bytes": 0})
        out[e["node"]]["read_bytes"] += e["read_bytes"] - f["read_bytes"]
        out[e["node"]]["write_bytes"] += e["write_bytes"] - f["write_bytes"]
    return dict(sorted(out.items()))


def summarize(run: RunResult, snic_read_gbps: float = 0.0, ttft_slo_s: float | None = None) -> dict:
    ok = [r for r in run.records if r.error is None and r.t_done is not None]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    prompt, cached, output = (sum(getattr(r, k) for r in ok) for k in ("prompt_tokens", "cached_tokens",
                                                                        "output_tokens"))
    later = [r for r in ok if r.turn > 0]
    s = {
        "policy": run.policy, "mode": run.mode, "duration_s": run.duration,
        "requests": len(run.records), "failed": len(run.records) - len(ok),
        "errors": sorted({r.error for r in run.records if r.error})[:5],
        "prompt_tokens": prompt, "cached_tokens": cached, "output_tokens": output,
        "hit_ratio": cached / prompt if prompt else 0.0,
        "hit_ratio_after_first_turn": (sum(r.cached_tokens for r in later) / sum(r.prompt_tokens for r in later)
                                       if later else None),
        "tokens_per_s": (prompt + output) / run.duration if run.duration else 0.0,
        "requests_per_s": len(ok) / run.duration if run.duration else 0.0,
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
        "paths": dict(Counter(r.path for r in ok)),
        # what each path's loading adds before the first token (path B's extra hop shows here)
        "ttft_s_by_path": {p: percentiles([r.ttft for r in ok if r.path == p and r.ttft is not None])
                           for p in sorted({r.path for r in ok})},
        "read_bytes": {"pe": sum(r.read_bytes_pe for r in ok), "de": sum(r.read_bytes_de for r in ok)},
    }
    if ttft_slo_s is not None:
        s["ttft_slo_s"] = ttft_slo_s
        s["slo_attainment"] = (sum(r.ttft is not None and r.ttft <= ttft_slo_s for r in ok) / len(run.records)
                               if run.records else 0.0)
    if run.samples:
        io = node_io(run)
        s["nodes"] = {str(n): dict(v) for n, v in io.items()}
        if snic_read_gbps > 0 and run.duration:
            cap = snic_read_gbps * 1e9 * run.duration
            for n, v in io.items():
                s["nodes"][str(n)]["read_util"] = v["read_bytes"] / cap
            s["read_util_all_nodes"] = sum(v["read_bytes"] for v in io.values()) / (cap * len(io))
    return s


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain aligned text table: columns are (header, key) with dotted keys into each row."""

    def get(row, key):
        for part in key.split("."):
            row = row.get(part) if isinstance(row, dict) else None
        if isinstance(row, float):
            return f"{row:.3g}" if abs(row) < 1000 else f"{row:,.0f}"
        return "-" if row is None else str(row)

    cells = [[h for h, _ in columns]] + [[get(r, k) for _, k in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(summaries: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [s["policy"] for s in summaries]
    vals = [s["tokens_per_s"] for s in summaries]
    bars = ax.bar(names, vals, color=["#888", "#5a9", "#27c", "#c62"][: len(names)])
    base = vals[0] or 1.0
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v / base:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (prompt + output)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft_cdf(runs: list[RunResult], path: Path, title: str, slo: float | None = None) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in runs:
        t = np.sort([r.ttft for r in run.records if r.ttft is not None])
        if len(t):
            ax.plot(t, np.arange(1, len(t) + 1) / len(t), label=run.policy)
    if slo:
        ax.axvline(slo, color="k", ls=":", label=f"SLO {slo:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def node_bandwidth(run: RunResult, window: float = 1.0) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per node: (times, read GB/s, write GB/s), smoothed over `window` seconds."""
    nodes = sorted(set(engine_nodes(run).values()))
    t = np.array([s["t"] for s in run.samples])
    out = {}
    for n in nodes:
        rd = np.array([sum(e["read_bytes"] for e in s["engines"].values() if e["node"] == n) for s in run.samples],
                      dtype=float)
        wr = np.array([sum(e["write_bytes"] for e in s["engines"].values() if e["node"] == n) for s in run.samples],
                      dtype=float)
        grid = np.arange(0.0, t[-1] + 1e-9, window) if len(t) else np.array([])
        r_i, w_i = np.interp(grid, t, rd), np.interp(grid, t, wr)
        out[n] = (grid[1:], np.diff(r_i) / window / 1e9, np.diff(w_i) / window / 1e9)
    return out


def plot_node_bandwidth(runs: list[RunResult], path: Path, roles: dict[int, str], snic_gbps: float = 0.0) -> None:
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 1, figsize=(7, 2.2 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        for n, (t, rd, wr) in node_bandwidth(run).items():
            line, = ax.plot(t, rd, label=f"node {n} ({roles.get(n, '?')}) read")
            ax.plot(t, wr, ls="--", color=line.get_color(), alpha=0.6, label=f"node {n} write")
        if snic_gbps:
            ax.axhline(snic_gbps, color="k", ls=":", lw=1)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{run.policy}: storage NIC bandwidth per node", fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper right")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_path_share(summaries: list[dict], path: Path) -> None:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [s["policy"] for s in summaries]
    bottom = np.zeros(len(names))
    for p, color in (("A", "#27c"), ("B", "#c62"), ("A+B", "#5a9")):
        n = np.array([s["paths"].get(p, 0) / max(1, sum(s["paths"].values())) for s in summaries])
        a1.bar(names, n, bottom=bottom, label=f"path {p}", color=color)
        bottom += n
    a1.set_title("share of requests per path", fontsize=9)
    a1.legend(fontsize=7)
    pe = np.array([s["read_bytes"]["pe"] for s in summaries], dtype=float)
    de = np.array([s["read_bytes"]["de"] for s in summaries], dtype=float)
    tot = np.maximum(pe + de, 1)
    a2.bar(names, pe / tot, label="read by PE (path A)", color="#27c")
    a2.bar(names, de / tot, bottom=pe / tot, label="read by DE (path B)", color="#c62")
    a2.set_title("share of hit bytes per path", fontsize=9)
    a2.legend(fontsize=7)
    for a in (a1, a2):
        a.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
