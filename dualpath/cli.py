"""The `dualpath` command: run one process, start a local cluster, or benchmark a part."""

from __future__ import annotations

import sys

import click

from dualpath.config import POLICIES, ConfigError


def _fail(msg: str) -> None:
    click.echo(f"dualpath: error: {msg}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """DualPath: dual-path KV-cache loading for agentic LLM inference."""


# ---------------------------------------------------------------------------------------------- run / up


@main.command()
@click.option("--role", type=click.Choice(["coordinator", "prefill", "decode"]), required=True)
@click.option("--node", type=int, default=0, show_default=True, help="node (host) id of this engine")
@click.option("--config", "config_path", type=click.Path(), required=True, help="cluster TOML file")
def run(role: str, node: int, config_path: str) -> None:
    """Start one process of a cluster: the coordinator, or one prefill/decode engine."""
    from dualpath.config import load_config
    from dualpath.process import run_process

    try:
        cfg = load_config(config_path)
        if role != "coordinator":
            cfg.find_engine(role, node)
    except ConfigError as e:
        _fail(str(e))
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
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP API port")
@click.option("--demo/--no-demo", default=False, help="send a multi-turn conversation, print it, stop")
@click.option("--config-out", type=click.Path(), default=None, help="also write the cluster TOML here")
def up(**kw) -> None:
    """Start a whole cluster on this host (coordinator + engines as subprocesses)."""
    from dualpath.launcher import launch_local

    try:
        sys.exit(launch_local(**kw))
    except ConfigError as e:
        _fail(str(e))


# ---------------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Benchmarks: each prints its numbers and writes JSON."""


@bench.command("model")
@click.option("--preset", default="tiny-gqa", show_default=True)
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

    r = run_bench(**kw)
    click.echo(f"{r['preset']} on {r['device']} ({r['dtype']}): "
               f"prefill {r['prefill']['tokens_per_s']:,.0f} tok/s ({r['prefill']['tokens']} tokens), "
               f"decode {r['decode']['tokens_per_s']:,.0f} tok/s (batch {r['decode']['batch']}, "
               f"context {r['decode']['context']})")
    click.echo(f"wrote {kw['out']}")


@bench.command("store")
@click.option("--dir", "directory", default="/tmp", show_default=True, help="directory to test")
@click.option("--block-mib", type=float, default=4.0, show_default=True, help="block size, all layers")
@click.option("--blocks", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=32, show_default=True)
@click.option("--threads", type=int, default=4, show_default=True)
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
@click.option("--backend", type=click.Choice(["tcp", "cuda", "verbs"]), default="tcp", show_default=True)
@click.option("--seconds", type=float, default=1.0, show_default=True, help="per message size")
@click.option("--out", default="runs/bench_transport.json", show_default=True)
def bench_transport(**kw) -> None:
    """Data-plane write GB/s (1-64 MiB) next to iperf3 (tcp) or a P2P tensor copy (cuda)."""
    from dualpath.bench.transport_bench import run as run_bench

    r = run_bench(**kw)
    for mib, gbps in r["write_GBps_by_MiB"].items():
        click.echo(f"{r['backend']} write {mib:>3} MiB: {gbps:.2f} GB/s")
    ref = [k for k in r if k.endswith("_GBps") and k != "write_GBps_by_MiB"][0]
    ratio = f"{r['best_ratio']:.2f}" if r["best_ratio"] else "n/a"
    click.echo(f"{ref}: {r[ref]}  best ratio: {ratio}")
    click.echo(f"wrote {kw['out']}")


@bench.command("h2d")
@click.option("--preset", default="small-mla", show_default=True)
@click.option("--dtype", default="bfloat16", show_default=True)
@click.option("--blocks", type=int, default=512, show_default=True, help="blocks of 64 tokens (512 = 32K)")
@click.option("--out", default="runs/bench_h2d.json", show_default=True)
def bench_h2d(**kw) -> None:
    """Pinned DRAM buffer -> paged HBM pool GB/s vs. the pinned copy peak (needs CUDA)."""
    from dualpath.bench.h2d_bench import run as run_bench

    r = run_bench(**kw)
    click.echo(f"{r['bytes'] / 1e9:.2f} GB of KV: paged H2D {r['paged_h2d_GBps']:.1f} GB/s, pinned peak "
               f"{r['pinned_copy_peak_GBps']:.1f} GB/s, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
