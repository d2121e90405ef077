import asyncio
import os
import sys
import time
from typing import Callable, TypeVar

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


# -- the `cluster` marker (pyproject.toml): a test that starts real processes carries it --
# By hand: `pytestmark = pytest.mark.cluster` in a module whose every test starts processes, else
# `@pytest.mark.cluster` on the test. `pytest -m "not cluster"` is the fast subset.

CLUSTER_FIXTURES = {"cluster", "worked"}  # the modules' fixtures that start a LocalCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a cluster fixture but lacks the mark would slip into the fast subset: refuse it."""
    unmarked = [item.nodeid for item in items
                if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())) and not item.get_closest_marker("cluster")]
    if unmarked:
        raise pytest.UsageError("these tests start a cluster (through a fixture) but are not marked "
                                "@pytest.mark.cluster: " + ", ".join(unmarked))


@pytest.fixture(params=["tiny-gqa", "tiny-mla"])
def preset(request) -> str:
    return request.param


# -- waiting for a condition (import as `from tests.conftest import ...`) --
# A test waits for what it needs to have happened, never for a fixed time: a busy host makes a
# condition come later, not fail. `timeout` bounds a hang; it is no measurement and no test asserts on it.

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what`
    if it has not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"never: {what} (waited {timeout:g} s)"
        time.sleep(every)
    return value


async def until(predicate: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.005) -> T:
    """wait_until for a coroutine: polls without blocking the event loop (the code under test runs
    on the same loop meanwhile)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"never: {what} (waited {timeout:g} s)"
        await asyncio.sleep(every)
    return value


async def loop_turns(n: int = 10) -> None:
    """Let the event loop run `n` times: whatever is ready to run (a task just woken, a callback
    just scheduled) has run after it. For showing that something does NOT happen without I/O,
    where there is no condition to wait for."""
    for _ in range(n):
        await asyncio.sleep(0)


# -- shared helpers (import as `from tests.conftest import ...`) --

def triton_interpreter_ok() -> bool:
    """Triton's CPU interpreter can run the GPU kernels: Triton 3.8 or newer (the first whose
    interpreter takes loop bounds read from memory)."""
    try:
        import triton
    except ImportError:
        return False
    return tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 8)


needs_triton_interpreter = pytest.mark.skipif(not triton_interpreter_ok(),
                                              reason="needs Triton >= 3.8 for its CPU interpreter")


def run_in_triton_interpreter(script: str):
    """Run `script` in a fresh interpreter with TRITON_INTERPRET=1 (it selects the model's Triton
    path on CPU tensors: engine/attention.py); -> the finished process, output captured."""
    import subprocess

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def hf_logits(hf, tokens: torch.Tensor) -> torch.Tensor:
    """A transformers model's logits [T, vocab] for one sequence."""
    with torch.no_grad():
        return hf(tokens.unsqueeze(0)).logits[0]


def assert_logits_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Within 1e-5 of the logits' scale (fp32 on both sides)."""
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max error {err:.2e} against logits of scale {scale:.2f}"


def assert_paged_steps_match(model, hf, lengths: list[int], prompts: list[int], n_blocks: int, vocab: int,
                             which: str, bt: int = 16) -> None:
    """Sequences of `lengths` random tokens: chunked prefills of their first `prompts` tokens (the
    second chunk over cached blocks), then 10 batched decode steps of all, teacher-forced; every
    position's logits must be the transformers model's over the whole sequence."""
    from dualpath.engine.kvcache import KVPool
    from dualpath.engine.model import Batch

    def step(seqs, ids):
        return model.forward_paged(ids, Batch.build(seqs, bt, "cpu"), pool.kv)

    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]
    want = [hf_logits(hf, s) for s in seqs]
    pool = KVPool(model.cfg, n_blocks, bt, "cpu", torch.float32)
    tables = [pool.allocator.alloc(pool.blocks_for(len(s))) for s in seqs]
    for s, t, n, w in zip(seqs, tables, prompts, want):
        first = step([(t, 0, 13)], s[:13])
        rest = step([(t, 13, n - 13)], s[13:n])
        assert_logits_close(torch.cat([first, rest]), w[:n], f"{which} prefill")
    for i in range(10):  # decode steps of every sequence in one batch
        batch = [(t, n + i, 1) for t, n in zip(tables, prompts)]
        logits = step(batch, torch.stack([s[n + i] for s, n in zip(seqs, prompts)]))
        for row, w, n in zip(logits, want, prompts):
            assert_logits_close(row, w[n + i], f"{which} decode step {i}")
