"""The `dualpath` command: run one process, start a local cluster, or benchmark a part."""

from __future__ import annotations

import sys

import click

from dualpath import __version__
from dualpath.config import POLICIES, ConfigError


def _fail(msg: str) -> None:
    click.echo(f"dualpath: error: {msg}", err=True)
    sys.exit(2)


def _model_option(default: str, help: str = "model preset"):
    """`--model PRESET`, the one spelling every command uses for a preset. `--preset`, the old one of
    `bench model` and `bench h2d`, still works there, hidden from --help."""
    def decorate(fn):
        fn = click.option("--preset", "preset_alias", default=None, hidden=True,
                          help="the old spelling of --model")(fn)
        return click.option("--model", "preset", default=default, show_default=True, help=help)(fn)
    return decorate


def _take_alias(kw: dict) -> None:
    """Fold a hidden --preset into --model's `preset` (refusing two different models)."""
    alias = kw.pop("preset_alias")
    if alias is not None:
        from click.core import ParameterSource

        given = click.get_current_context().get_parameter_source("preset") == ParameterSource.COMMANDLINE
        if given and alias != kw["preset"]:
            _fail(f"--preset {alias} and --model {kw['preset']}: give one (--preset is the old name of --model)")
        kw["preset"] = alias


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="dualpath", message="%(prog)s %(version)s")
def main() -> None:
    """DualPath: dual-path KV-cache loading for agentic LLM inference."""


# ---------------------------------------------------------------------------------------------- run / up


@main.command()
@click.option("--role", type=click.Choice(["coordinator", "prefill", "decode"]), default=None,
              help="which process; without it, the launcher's rank picks one (launch.ranks in the config)")
@click.option("--node", type=int, default=0, show_default=True, help="node (host) id of this engine")
@click.option("--config", "config_path", type=click.Path(), required=True, help="cluster TOML file")
def run(role: str | None, node: int, config_path: str) -> None:
    """Start one process of a cluster: the coordinator, or one prefill/decode engine.

    With --role, that process. Without it, the process that this rank runs, the rank coming from
    the launcher that started us ($RANK from torchrun, $SLURM_PROCID, $OMPI_COMM_WORLD_RANK), e.g.
    `torchrun --nnodes N --node-rank K --nproc-per-node G -m dualpath.cli run --config cluster.toml`."""
    import os

    from dualpath.config import RANK_ENV, load_config
    from dualpath.process import run_process

    try:
        cfg = load_config(config_path)
        if role is None:
            rank = next((os.environ[v] for v in RANK_ENV if v in os.environ), None)
            if rank is None:
                _fail(f"give --role, or start under a launcher that sets one of ${', $'.join(RANK_ENV)}")
            role, node = cfg.process_for_rank(int(rank))
        elif role != "coordinator":
            cfg.find_engine(role, node)
    except ConfigError as e:
        _fail(str(e))
    from dualpath.launcher import store_problem

    # An engine writes the store: a clear refusal now, not its OSError traceback later. (The coordinator
    # only reads it, and may run where it is mounted read-only.)
    if role != "coordinator" and (why := store_problem(cfg.store.root)) is not None:
        _fail(f"{why} (store.root in {config_path})")
    run_process(cfg, role, node)


@main.command()
@click.option("--prefill", "n_prefill", type=int, default=1, show_default=True, help="prefill engines")
@click.option("--decode", "n_decode", type=int, default=2, show_default=True, help="decode engines")
@click.option("--model", "preset", default="tiny-gqa", show_default=True, help="model preset")
@click.option("--weights", default=None, help="Hugging Face checkpoint directory (overrides --model)")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help="'cpu', or 'cuda' to put engine i on GPU i")
@click.option("--policy", type=click.Choice(POLICIES), default="dualpath", show_default=True)
@click.option("--store", "store_root", default=None, help="block store directory (default: user cache)")
@click.option("--snic-gbps", type=float, default=0.0, show_default=True,
              help="emulated storage NIC read bandwidth per node, GB/s (0 = unlimited)")
@click.option("--transport", "backend", default="auto", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True,
              help="HTTP API port; the cluster also listens on --port + 1 (coordinator control), --port + 2 and up "
                   "(one per engine) and those + 1000 (engines' data planes)")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address the HTTP API binds, e.g. 0.0.0.0 for every interface (the coordinator's control port, "
                   "which only the cluster secret opens, binds there too; engines stay on loopback)")
@click.option("--served-model-name", default=None,
              help="the model id clients send and responses and /metrics name (default: --model, or --weights)")
@click.option("--demo/--no-demo", default=False, help="send a multi-turn conversation, print it, stop")
@click.option("--config-out", type=click.Path(), default=None,
              help="also write the cluster TOML here (it holds the cluster's secret; mode 0600), to keep: "
                   "the copy in the cluster's work directory is removed when the cluster stops")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="require 'Authorization: Bearer KEY' on /v1/*, KEY read from this file (mode 0600: one "
                   "other users can read is refused)")
@click.option("--api-key", envvar="DUALPATH_API_KEY", default="",
              help="the same with KEY given here, which every local user sees in `ps`: prefer --api-key-file "
                   "or $DUALPATH_API_KEY (the default; none if unset)")
@click.pass_context
def up(ctx: click.Context, **kw) -> None:
    """Start a whole cluster on this host (coordinator + engines as subprocesses).

    Refuses, before starting anything, a port that is in use and a store it cannot write. Once the
    cluster serves, prints the API's base URL, the dashboard's and the metrics' URLs, and how to stop."""
    from click.core import ParameterSource

    from dualpath.launcher import launch_local

    if ctx.get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        if kw["api_key_file"]:
            _fail("give --api-key-file or --api-key, not both")
        click.echo("dualpath up: warning: --api-key is visible to every user of this host (ps, /proc); "
                   "use --api-key-file or $DUALPATH_API_KEY", err=True)
    try:
        sys.exit(launch_local(**kw))
    except ConfigError as e:
        _fail(str(e))


# ---------------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Benchmarks: each prints its numbers and writes JSON."""


@bench.command("model")
@_model_option("tiny-gqa")
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--prompt-tokens", type=int, default=1024, show_default=True)
@click.option("--batch", type=int, default=16, show_default=True, help="decode batch size")
@click.option("--context", type=int, default=1024, show_default=True, help="decode context per sequence")
@click.option("--block-tokens", type=int, default=64, show_default=True)
@click.option("--out", default="runs/bench_model.json", show_default=True)
def bench_model(**kw) -> None:
    """Prefill and decode tokens/s of the model on one device."""
    from dualpath.bench.model_bench import run as run_bench

    _take_alias(kw)
    r = run_bench(**kw)
    click.echo(f"{r['preset']} on {r['device']} ({r['dtype']}): "
               f"prefill {r['prefill']['tokens_per_s']:,.0f} tok/s ({r['prefill']['tokens']} tokens), "
               f"decode {r['decode']['tokens_per_s']:,.0f} tok/s (batch {r['decode']['batch']}, "
               f"context {r['decode']['context']})")
    click.echo(f"wrote {kw['out']}")


@bench.command("roofline")
@click.option("--model", "presets", multiple=True, default=("small-gqa", "small-mla", "small-moe"), show_default=True,
              help="repeatable")
@click.option("--block-tokens", type=int, default=64, show_default=True)
@click.option("--torch-attention", is_flag=True, help="time the torch attention path instead of the Triton kernels")
@click.option("--out", default="runs/bench_roofline.json", show_default=True)
def bench_roofline(presets: tuple[str, ...], block_tokens: int, torch_attention: bool, out: str) -> None:
    """GPU: each step kind (decode grid, fresh prefill, append) against the HBM bandwidth and matmul
    throughput measured in the same run."""
    from dualpath.bench.roofline_bench import run as run_bench

    import torch

    if not torch.cuda.is_available():
        _fail("bench roofline needs a GPU")
    run_bench(presets, out, block_tokens, paged=not torch_attention)
    click.echo(f"wrote {out}")


@bench.command("store")
@click.option("--dir", "directory", default="/tmp", show_default=True, help="directory to test")
@click.option("--block-mib", type=float, default=4.0, show_default=True, help="block size, all layers")
@click.option("--blocks", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=32, show_default=True)
@click.option("--readers", type=int, default=4, show_default=True, help="reader processes (and write threads)")
@click.option("--out", default="runs/bench_store.json", show_default=True)
def bench_store(**kw) -> None:
    """Block store read/write GB/s vs. a raw sequential read of the same bytes (page cache)."""
    from dualpath.bench.store_bench import run as run_bench

    r = run_bench(**kw)
    click.echo(f"blocks of {r['block_bytes'] / 2**20:.1f} MiB x {r['blocks']}: store read "
               f"{r['store_read_GBps']:.2f} GB/s, write {r['store_write_GBps']:.2f} GB/s; raw sequential read "
               f"{r['raw_sequential_read_GBps']:.2f} GB/s; read ratio {r['read_ratio']:.2f}")
    click.echo(f"wrote {kw['out']}")


@bench.command("transport")
@click.option("--backend", type=click.Choice(["tcp", "shm", "cuda", "verbs"]), default="tcp", show_default=True)
@click.option("--seconds", type=float, default=1.0, show_default=True, help="per message size")
@click.option("--small-n", type=int, default=1000, show_default=True,
              help="writes per small size (4-256 KB; latency one at a time, then throughput); 0: none")
@click.option("--inflight", type=int, default=16, show_default=True, help="small writes in flight for throughput")
@click.option("--small-class", type=click.Choice(["bulk", "latency"]), default="bulk", show_default=True)
@click.option("--pieces", "pieces_n", type=int, default=1536, show_default=True,
              help="writes of the pieces shape, all in flight (a request's per-block pieces)")
@click.option("--piece-kib", type=int, default=32, show_default=True, help="KiB per piece")
@click.option("--rounds", type=int, default=3, show_default=True,
              help="side-by-side rounds per system (dualpath, and Mooncake where installed); 0: no shapes")
@click.option("--mooncake/--no-mooncake", default=True, show_default=True,
              help="run the Mooncake Transfer Engine's TCP transport beside dualpath where it is installed")
@click.option("--verify", is_flag=True, help="instead: check every byte of odd-sized writes landed where asked")
@click.option("--out", default="runs/bench_transport.json", show_default=True)
def bench_transport(verify: bool, **kw) -> None:
    """Data-plane write GB/s (1-64 MiB) next to iperf3 (tcp), a host memory copy (shm) or a P2P copy
    (cuda), small writes' latency and throughput, and the shapes side by side with Mooncake's."""
    from dualpath.bench.transport_bench import run as run_bench, run_verify

    if verify:
        run_verify(kw["backend"], kw["out"])
        return
    r = run_bench(**kw)
    for mib, gbps in r["write_GBps_by_MiB"].items():
        click.echo(f"{r['backend']} write {mib:>3} MiB: {gbps:.2f} GB/s")
    ref = [k for k in r if k.endswith("_GBps") and k != "write_GBps_by_MiB"][0]
    ratio = f"{r['best_ratio']:.2f}" if r["best_ratio"] else "n/a"
    click.echo(f"{ref}: {r[ref]}  best ratio: {ratio}")
    if lat := r.get("latency_write_under_bulk"):  # tcp: the link-sharing figure (no test asserts a time)
        click.echo(f"512-byte latency-class write p99: idle {lat['idle']['p99_s'] * 1e3:.2f} ms, while bulk fills "
                   f"the link {lat['under_bulk']['p99_s'] * 1e3:.2f} ms ({lat['p99_ratio']:.1f}x)")
    click.echo(f"wrote {kw['out']}")


@bench.command("h2d")
@_model_option("small-mla")
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--blocks", type=int, default=512, show_default=True, help="blocks of 64 tokens (512 = 32K)")
@click.option("--out", default="runs/bench_h2d.json", show_default=True)
def bench_h2d(**kw) -> None:
    """Pinned DRAM buffer -> paged HBM pool GB/s vs. the pinned copy peak (needs CUDA)."""
    from dualpath.bench.h2d_bench import run as run_bench

    _take_alias(kw)
    r = run_bench(**kw)
    click.echo(f"{r['bytes'] / 1e9:.2f} GB of KV: paged H2D {r['paged_h2d_GBps']:.1f} GB/s, pinned peak "
               f"{r['pinned_copy_peak_GBps']:.1f} GB/s, ratio {r['ratio']:.2f}")


@bench.command("agentic")
@click.option("--agents", type=int, default=16, show_default=True)
@click.option("--turns", type=int, default=12, show_default=True)
@click.option("--first-prompt", type=(int, int), default=(16_000, 24_000), show_default=True, help="token range")
@click.option("--tool-output", type=(int, int), default=(200, 1_000), show_default=True, help="token range")
@click.option("--answer", type=(int, int), default=(32, 128), show_default=True, help="token range")
@click.option("--min-hit-ratio", type=float, default=0.95, show_default=True)
@click.option("--block-tokens", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="runs/agentic.jsonl", show_default=True)
def bench_agentic(out: str, **kw) -> None:
    """Generate a seeded agentic workload (JSONL, one turn per line)."""
    from pathlib import Path

    from dualpath.bench.workload import AgenticSpec, agentic, hit_ratios, write_jsonl

    spec = AgenticSpec(**kw)
    sessions = agentic(spec)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(sessions, out)
    hits = hit_ratios(sessions, spec.block_tokens)
    click.echo(f"{len(sessions)} agents x {spec.turns} turns -> {out}; hit ratio after the first turn: "
               f"min {min(hits, default=0):.3f}, mean {sum(hits) / max(1, len(hits)):.3f}")


@bench.command("run")
@click.option("--workload", "path", required=True, help="JSONL: agentic (bench agentic) or a Mooncake trace")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="a running cluster (dualpath up)")
@click.option("--policy", type=click.Choice(POLICIES), default="dualpath", show_default=True)
@click.option("--mode", type=click.Choice(["offline", "online"]), default="offline", show_default=True)
@click.option("--rate", type=float, default=None, help="online: Poisson session arrivals per second "
              "(default: the workload's own arrival times)")
@click.option("--concurrency", type=int, default=0, show_default=True, help="sessions in flight (0 = all)")
@click.option("--limit", type=int, default=None, help="Mooncake: first N requests")
@click.option("--trace-block-tokens", type=int, default=512, show_default=True,
              help="Mooncake: tokens per hash block (< 512 shrinks prompts, keeping the reuse)")
@click.option("--time-scale", type=float, default=1.0, show_default=True, help="Mooncake: stretch arrivals")
@click.option("--warmup-turns", type=int, default=0, show_default=True)
@click.option("--ttft-slo", type=float, default=None, help="seconds; reports SLO attainment")
@click.option("--snic-gbps", type=float, default=0.0, help="the cluster's emulated SNIC rate, for utilisation")
@click.option("--api", type=click.Choice(["completions", "chat"]), default="completions", show_default=True,
              help="chat: each turn is the conversation's messages, as an agent framework sends them")
@click.option("--out", default="runs/bench_run.json", show_default=True)
def bench_run(path, url, policy, mode, rate, concurrency, limit, trace_block_tokens, time_scale, warmup_turns,
              ttft_slo, snic_gbps, api, out) -> None:
    """Replay a workload against a running cluster; prints a summary and writes JSON."""
    import asyncio

    from dualpath.bench import report
    from dualpath.bench.common import write_json
    from dualpath.bench.driver import run
    from dualpath.bench.workload import poisson_arrivals, read_jsonl

    try:
        sessions = read_jsonl(path, limit=limit, block_tokens=trace_block_tokens, time_scale=time_scale)
    except (OSError, ValueError) as e:
        _fail(str(e))
    if rate:
        sessions = poisson_arrivals(sessions, rate)
    r = asyncio.run(run(url, sessions, policy, mode, trace_block_tokens, concurrency, warmup_turns, api=api))
    s = report.summarize(r, snic_gbps, ttft_slo)
    click.echo(report.table([s], [("policy", "policy"), ("mode", "mode"), ("seconds", "duration_s"),
                                  ("requests", "requests"), ("failed", "failed"), ("tokens/s", "tokens_per_s"),
                                  ("hit ratio", "hit_ratio"), ("TTFT p50", "ttft_s.p50"), ("TTFT p99", "ttft_s.p99"),
                                  ("TPOT p50", "tpot_s.p50"), ("SLO", "slo_attainment")]))
    write_json(out, {"summary": s, "run": r.to_json()})
    click.echo(f"wrote {out}")


@bench.command("repro")
@click.option("--out-dir", default="runs/repro", show_default=True)
@click.option("--prefill", "n_prefill", type=int, default=1, show_default=True)
@click.option("--decode", "n_decode", type=int, default=2, show_default=True)
@click.option("--model", "preset", default="tiny-gqa", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (engine i on cuda:i)")
@click.option("--snic-gbps", type=float, default=0.008, show_default=True,
              help="emulated storage-NIC read rate per node")
@click.option("--online/--no-online", default=True, show_default=True, help="also the arrival-rate sweep")
@click.option("--unbounded/--no-unbounded", default=True, show_default=True,
              help="also a run without storage emulation")
@click.option("--ttft-slo", "ttft_slo_s", type=float, default=1.5, show_default=True)
@click.option("--workload", "workload_name", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: 16 agents x ~3K tokens; gpu: 48 agents x 16-24K tokens, pools sized from the GPU's memory")
@click.option("--agents", type=int, default=None, help="agents of the workload (default: the workload's)")
@click.option("--port", "base_port", type=int, default=18000, show_default=True)
@click.option("--policies", default=",".join(POLICIES), show_default=True, help="comma-separated; pe-read is the base")
@click.option("--repeats", type=int, default=1, show_default=True,
              help="offline runs of each policy, taking turns; the median run is reported")
@click.option("--hosts", type=int, default=0, show_default=True,
              help="root: spread each cluster over 1 + decode hosts made as network namespaces (offline runs only)")
@click.option("--link-mbit", type=float, default=0.0, show_default=True,
              help="with --hosts: each host's link (compute NIC), scheduled by traffic class; 0 = unshaped")
def bench_repro(online: bool, workload_name: str, agents: int | None, policies: str, **kw) -> None:
    """The headline: pe-read vs de-read vs dualpath (vs dualpath-split) on one workload, storage-bound."""
    import dataclasses

    from dualpath.bench.repro import WORKLOADS, ReproConfig, main as repro, size_pools

    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    if "pe-read" not in chosen or not set(chosen) <= set(POLICIES):
        _fail(f"--policies {policies!r}: a comma-separated subset of {', '.join(POLICIES)} that includes pe-read")
    if kw["repeats"] < 1:
        _fail(f"--repeats {kw['repeats']}: must be at least 1")
    if kw["hosts"] and kw["hosts"] != 1 + kw["n_decode"]:
        _fail(f"--hosts {kw['hosts']}: one host per engine, 1 + --decode = {1 + kw['n_decode']}")
    if kw["hosts"]:
        from dualpath.bench import netns

        if (why := netns.available()) is not None:
            _fail(f"--hosts: {why}")
    rc = ReproConfig(policies=chosen, **kw)
    rc.workload = dataclasses.replace(WORKLOADS[workload_name], agents=agents or WORKLOADS[workload_name].agents)
    if workload_name == "gpu":
        if not kw["device"].startswith("cuda"):
            _fail("--workload gpu: needs --device cuda")
        import torch

        engines_per_gpu = -(-(kw["n_prefill"] + kw["n_decode"]) // max(1, torch.cuda.device_count()))
        try:
            rc.pools = size_pools(rc.workload, rc.preset, rc.dtype, rc.block_tokens, engines_per_gpu, "/tmp")
        except ValueError as e:
            _fail(f"--workload gpu: {e}")
    if not online:
        rc.online_policies = ()
    repro(rc)


def _cluster_bench_options(fn):
    for opt in reversed([
        click.option("--model", "preset", default="tiny-gqa", show_default=True),
        click.option("--dtype", default="float32", show_default=True),
        click.option("--device", default="cpu", show_default=True, help="cpu, or cuda (engine i on cuda:i)"),
        click.option("--port", type=int, default=18500, show_default=True)]):
        fn = opt(fn)
    return fn


def _store_read_options(fn):
    """How engines read the store: the trade-off between load/compute overlap and decode TPOT."""
    fn = click.option("--read-spans", type=int, default=8, show_default=True, help="spans of layers per read")(fn)
    return click.option("--readers", type=int, default=8, show_default=True,
                        help="storage reader processes per engine")(fn)


@bench.command("agreement")
@_cluster_bench_options
@click.option("--turns", type=int, default=3, show_default=True)
@click.option("--prompt-tokens", type=int, default=1500, show_default=True)
@click.option("--append-tokens", type=int, default=200, show_default=True)
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--out", default="runs/bench_agreement.json", show_default=True)
def bench_agreement(**kw) -> None:
    """1P1D conversations on every path vs. forward_reference: greedy token agreement."""
    from dualpath.bench.agreement_bench import run as run_bench

    r = run_bench(policies=("pe-read", "de-read", "dualpath-split"), **kw)
    for p, v in r["policies"].items():
        line = (f"{p:<15} paths {'/'.join(v['paths'])}: {v['agree']}/{v['generated']} generated tokens agree "
                f"({v['agreement']:.2%})")
        if "within_noise" in v:
            line += (f"; vs fp32: {v['exact_agreement']:.2%} exact (the bf16 reference itself: "
                     f"{v['reference_exact_agreement']:.2%}), {v['within_noise']:.2%} within bf16 noise")
        click.echo(line)
    click.echo(f"wrote {kw['out']}")


@bench.command("overlap")
@_cluster_bench_options
@click.option("--cached", type=int, default=32768, show_default=True, help="cached context tokens")
@click.option("--new", type=int, default=512, show_default=True, help="new tokens")
@_store_read_options
@click.option("--out", default="runs/bench_overlap.json", show_default=True)
def bench_overlap(**kw) -> None:
    """PE prefill with a long cached context vs. max(load only, compute only)."""
    from dualpath.bench.overlap_bench import run as run_bench

    r = run_bench(**kw)
    click.echo(f"{r['cached_tokens']} cached + {r['new_tokens']} new tokens: prefill {r['prefill_s'] * 1e3:.1f} ms; "
               f"load only {r['load_only_s'] * 1e3:.1f} ms, compute only {r['compute_only_s'] * 1e3:.1f} ms; "
               f"ratio to the larger {r['ratio_to_max']:.2f} (no overlap would be {r['sum_ratio_to_max']:.2f})")
    landed, started = r["prefill_layer_landed_s"], r["prefill_layer_started_s"]
    if landed and started:
        click.echo(f"in the prefill, hit KV layer 0 / last landed at {landed[0] * 1e3:.1f} / "
                   f"{landed[-1] * 1e3:.1f} ms; the compute thread started them at {started[0] * 1e3:.1f} / "
                   f"{started[-1] * 1e3:.1f} ms")
    click.echo(f"wrote {kw['out']}")


@bench.command("interference")
@_cluster_bench_options
@click.option("--context", type=int, default=8192, show_default=True, help="background contexts (path B)")
@click.option("--decode-tokens", type=int, default=200, show_default=True)
@_store_read_options
@click.option("--out", default="runs/bench_interference.json", show_default=True)
def bench_interference(**kw) -> None:
    """Decode TPOT alone vs. while path-B loads run through the same DE."""
    from dualpath.bench.interference_bench import run as run_bench

    r = run_bench(**kw)
    click.echo(f"TPOT alone {r['tpot_alone_s'] * 1e3:.2f} ms, with path-B loading "
               f"{r['tpot_with_path_b_s'] * 1e3:.2f} ms ({r['increase']:+.1%}); "
               f"{r['background_tokens_loaded_per_s']:,.0f} tokens/s loaded on path B meanwhile")
    click.echo(f"wrote {kw['out']}")


@bench.command("ingest")
@_cluster_bench_options
@click.option("--requests", type=int, default=16, show_default=True, help="queued requests per path")
@click.option("--context", type=int, default=4096, show_default=True, help="stored tokens per request")
@_store_read_options
@click.option("--out", default="runs/bench_ingest.json", show_default=True)
def bench_ingest(**kw) -> None:
    """KV bytes/s the load path moves into HBM (paths A and B), storage unthrottled."""
    from dualpath.bench.ingest_bench import run as run_bench

    r = run_bench(**kw)
    for path, v in r["paths"].items():
        click.echo(f"path {path}: {v['hit_bytes'] / 1e9:.2f} GB of hit KV for {r['requests']} queued requests in "
                   f"{v['wall_s']:.2f} s = {v['GBps']:.2f} GB/s ({r['ratio_to_raw_read'][path]:.2f} of a raw read)")
    click.echo(f"compute only (the same requests, nothing to load): {r['compute_only_s']:.2f} s; raw page-cache "
               f"read {r['raw_page_cache_read_GBps']:.2f} GB/s; copy peak {r['copy_peak_GBps']:.2f} GB/s")
    click.echo("where the time went (seconds per engine stage; stages overlap):")
    for run_name, engines in r["profile_s"].items():
        for engine, stages in engines.items():
            click.echo(f"  {run_name:>12} {engine}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(stages.items())))
    click.echo(f"wrote {kw['out']}")


@bench.command("scheduler")
@click.option("--prefill", type=int, default=48, show_default=True)
@click.option("--decode", type=int, default=96, show_default=True)
@click.option("--prompt-tokens", type=int, default=32_768, show_default=True)
@click.option("--hit-ratio", type=float, default=0.95, show_default=True)
@click.option("--requests", type=int, default=2000, show_default=True)
@click.option("--policy", type=click.Choice(POLICIES), default="dualpath", show_default=True)
@click.option("--heartbeat-every", type=int, default=50, show_default=True,
              help="decisions between two rounds of heartbeats")
@click.option("--out", default="runs/bench_scheduler.json", show_default=True)
def bench_scheduler(**kw) -> None:
    """One scheduling decision's cost on one core, step by step, for a cluster of 48P96D by default."""
    from dualpath.bench.scheduler_bench import run as run_bench

    r = run_bench(**kw)
    click.echo(f"{r['engines']} engines, {r['prompt_tokens']}-token prompts ({r['hit_ratio']:.0%} stored), "
               f"{r['requests']} decisions, policy {r['policy']}:")
    for step, us in r["per_decision_us"].items():
        click.echo(f"  {step:<24} {us:10.1f} us")
    for what, n in r["decisions_per_s"].items():
        click.echo(f"  decisions/s, {what.replace('_', ' ')}: {n:,.0f}")
    click.echo(f"wrote {kw['out']}")


@main.group()
def sim() -> None:
    """A cluster in virtual time that decides with the real policies (docs/SIM.md)."""


@sim.command("repro")
@click.option("--prefill", "n_prefill", type=int, default=1, show_default=True)
@click.option("--decode", "n_decode", type=int, default=2, show_default=True)
@click.option("--model", "preset", default="tiny-gqa", show_default=True, help="its KV bytes per block")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--profile", "profile_path", default="runs/sim/profiles/cpu_tiny_gqa.json", show_default=True,
              help="compute times: a `dualpath sim profile` JSON (grids), or a `dualpath bench model` JSON (one point)")
@click.option("--host-cores", type=int, default=0, show_default=True,
              help="the engines share this many cores (a CPU cluster on one host); 0: each has its own")
@click.option("--snic-gbps", type=float, default=0.008, show_default=True, help="storage NIC read rate per node")
@click.option("--compute-link-gbps", type=float, default=10.0, show_default=True, help="per engine, each way")
@click.option("--egress-only", is_flag=True, help="links limit only what an engine sends (as tc does on the "
              "benchmark's namespace hosts, bench repro --hosts)")
@click.option("--agents", type=int, default=16, show_default=True, help="agents of the bench repro workload")
@click.option("--workload", "path", default=None,
              help="instead: a JSONL workload (bench agentic) or a Mooncake trace, e.g. ../shared/data/*.jsonl")
@click.option("--limit", type=int, default=None, help="with --workload: its first N sessions")
@click.option("--trace-block-tokens", type=int, default=512, show_default=True,
              help="with a trace: tokens per hash id (shrink below 512 as bench run does)")
@click.option("--policies", default=",".join(POLICIES), show_default=True)
@click.option("--measured", default=None, help="a `bench repro` repro.json to put beside the simulation")
@click.option("--progress/--no-progress", default=False, help="a progress bar in simulated seconds")
@click.option("--host-costs/--no-host-costs", "charge_host", default=True, show_default=True,
              help="charge the per-request and per-step host costs the profile holds (measure.py --host), if any")
@click.option("--out", default="runs/sim/sim.json", show_default=True, help="the JSON; plots go beside it")
def sim_repro(n_prefill, n_decode, preset, dtype, profile_path, host_cores, snic_gbps, compute_link_gbps, egress_only,
              agents, path, limit, trace_block_tokens, policies, measured, progress, charge_host, out) -> None:
    """The `bench repro` workload (or --workload) on a simulated cluster, every policy, one table."""
    import dataclasses

    from dualpath.bench.repro import ReproConfig
    from dualpath.bench.workload import read_jsonl
    from dualpath.sim.profile import HostCosts, host_costs, load_profile
    from dualpath.sim.run import main as run_sim

    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    if "pe-read" not in chosen or not set(chosen) <= set(POLICIES):
        _fail(f"--policies {policies!r}: a comma-separated subset of {', '.join(POLICIES)} that includes pe-read")
    try:
        # engines that outnumber the cores they share: the grids measured at one thread each
        profile = load_profile(profile_path, shared_cores=bool(host_cores) and n_prefill + n_decode > host_cores)
        host = host_costs(profile_path) if charge_host else HostCosts()
    except (OSError, KeyError, ValueError) as e:
        _fail(f"--profile {profile_path}: not a `dualpath sim profile` or `bench model` result ({e}); the default "
              f"is a path in the repository: run from its root, or give --profile")
    sessions = None
    if path:
        try:
            sessions = read_jsonl(path, limit=limit, block_tokens=trace_block_tokens)
        except (OSError, KeyError, ValueError) as e:
            _fail(f"--workload {path}: {e}")
    rc = ReproConfig(preset=preset, dtype=dtype, n_prefill=n_prefill, n_decode=n_decode, snic_gbps=snic_gbps,
                     policies=chosen)
    rc.workload = dataclasses.replace(rc.workload, agents=agents)
    run_sim(rc, profile, compute_link_gbps, measured, out, sessions, trace_block_tokens, progress, egress_only,
            host_cores, host)


@sim.command("profile")
@click.option("--model", "preset", default="tiny-gqa", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--block-tokens", type=int, default=64, show_default=True)
@click.option("--repeat", type=int, default=5, show_default=True)
@click.option("--out", default="runs/sim/profiles/cpu_tiny_gqa.json", show_default=True)
def sim_profile(preset, device, dtype, block_tokens, repeat, out) -> None:
    """This machine's compute profile: the engines' own decode and prefill steps over grids of batch,
    context, new and cached tokens (one file per machine, read by `sim repro --profile`)."""
    from dualpath.bench.common import write_json
    from dualpath.sim.measure import measure

    write_json(out, measure(preset, device, dtype, block_tokens, repeat))
    click.echo(f"wrote {out}")


@sim.command("validate", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def sim_validate(args) -> None:
    """The simulator against every committed run it was not built on: sim / measured per policy."""
    import sys

    from dualpath.sim.validate import main as validate

    sys.argv = ["dualpath sim validate", *args]
    validate()


@sim.command("paper")
@click.option("--only", multiple=True, type=click.Choice(["ratios", "scaling", "online", "bandwidth", "split", "shared", "speed"]),
              help="run only these studies; repeatable (default: all)")
@click.option("--out-dir", default="runs/sim/paper", show_default=True)
@click.option("--bands/--no-bands", default=True, show_default=True,
              help="also run the ratios and online studies at the low and high value of each uncertain input "
                   "(MFU, storage and compute NIC rates, hit ratio), one at a time: each figure as a range")
def sim_paper(only: tuple[str, ...], out_dir: str, bands: bool) -> None:
    """The paper's questions on its model shapes and scale (up to 48P96D, 1,152 GPUs): JSON, plots, tables."""
    from dualpath.sim.paper import BANDED, main as run_paper

    run_paper(only, out_dir, tuple(BANDED) if bands else ())


@bench.command("gpu")
@click.option("--out-dir", default="runs/gpu/acceptance", show_default=True)
@click.option("--only", multiple=True, help="run only these steps (tests, demo, agreement, h2d, transport, "
              "overlap, interference, repro, ingest, rates); repeatable. All of them take about 20 minutes on "
              "2x H200: split them across calls where a call's time is limited")
@click.option("--port", type=int, default=18700, show_default=True, help="HTTP port of the clusters it starts")
@click.option("--step-timeout", "step_timeout_s", type=float, default=600, show_default=True, help="seconds")
def bench_gpu(out_dir: str, only: tuple[str, ...], port: int, step_timeout_s: float) -> None:
    """GPU acceptance: tests, a 1P(n-1)D demo and every GPU figure against its target; one table."""
    from dualpath.bench.gpu_acceptance import run as run_bench

    sys.exit(run_bench(out_dir, only, port, step_timeout_s))


if __name__ == "__main__":
    main()
