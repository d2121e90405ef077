"""Sampling (engine/runtime.py): a draw depends on the request's seed and the token's position only,
so the PE (first token) and the DE (the rest) draw what one engine would, whatever the batch."""

import torch

from dualpath.engine.runtime import sample, sample_batch
from dualpath.protocol import SamplingParams


def sp(temperature: float, seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed or 0, **kw)


def test_a_batch_draws_what_each_row_alone_draws():
    """Greedy and sampled rows mixed, an extreme temperature among them (greedy where the
    distribution is not finite), and rows with logits processing: the batched draw is the one-row
    draw of every row."""
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    rows = [(sp(0.0, None), [1, 2, 3], 3), (sp(0.7, 5), list(range(10)), 8), (sp(1.3, None), [4, 4], 2),
            (sp(0.0, 1), [7], 1), (sp(1e-30, 3), [1, 2, 3, 4], 2), (sp(2.0, 9), list(range(100)), 90),
            (sp(0.0, 0, repetition_penalty=1.5, logit_bias=((3, 5.0),)), [3, 9, 9], 1),
            (sp(0.9, 11, top_k=5, top_p=0.8, min_p=0.05, frequency_penalty=0.5), [2, 2, 6, 6, 6], 2)]
    assert sample_batch(logits, rows) == [sample(logits[i], *r) for i, r in enumerate(rows)]


def test_a_draw_depends_on_seed_and_position_not_on_the_batch():
    torch.manual_seed(1)
    row = torch.randn(200)
    prompt = list(range(17))
    alone = sample(row, sp(1.0, 42), prompt, 17)
    others = torch.randn(5, 200)
    for where in range(6):
        batch = torch.cat([others[:where], row[None], others[where:]])
        other = (sp(1.0, 7), [0, 1, 2], 3)
        rows = [other] * where + [(sp(1.0, 42), prompt, 17)] + [other] * (5 - where)
        assert sample_batch(batch, rows)[where] == alone
    draws = ({sample(row, sp(1.0, 42), list(range(p)), p) for p in range(1, 20)}
             | {sample(row, sp(1.0, s), prompt, 17) for s in range(20)})
    assert len(draws) > 1  # the seed and the position do change the draw
