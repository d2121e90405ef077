"""Sampling (engine/runtime.py): a draw depends on the request's seed and the token's position only,
so the PE (first token) and the DE (the rest) draw what one engine would, whatever the batch."""

import torch

from dualpath.engine.runtime import sample, sample_batch


def test_a_batch_draws_what_each_row_alone_draws():
    """Greedy and sampled rows mixed, an extreme temperature among them (greedy where the
    distribution is not finite): the batched draw is the one-row draw of every row."""
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [(0.0, None, 3), (0.7, 5, 10), (1.3, None, 2), (0.0, 1, 1), (1e-30, 3, 4), (2.0, 9, 100)]
    assert sample_batch(logits, params) == [sample(logits[i], *p) for i, p in enumerate(params)]


def test_a_draw_depends_on_seed_and_position_not_on_the_batch():
    torch.manual_seed(1)
    row = torch.randn(200)
    alone = sample(row, 1.0, 42, 17)
    others = torch.randn(5, 200)
    for where in range(6):
        batch = torch.cat([others[:where], row[None], others[where:]])
        params = [(1.0, 7, 3)] * where + [(1.0, 42, 17)] + [(1.0, 7, 3)] * (5 - where)
        assert sample_batch(batch, params)[where] == alone
    draws = {sample(row, 1.0, 42, p) for p in range(20)} | {sample(row, 1.0, s, 17) for s in range(20)}
    assert len(draws) > 1  # the seed and the position do change the draw
