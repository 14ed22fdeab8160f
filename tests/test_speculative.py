"""Speculative decoding: identical greedy output, 100 % acceptance of forced drafts, and the
acceptance rule's output distribution equals the target's."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from ds4mlx import load
from ds4mlx.speculative import ForcedDrafter, MTPDrafter, SpeculativeStats, accept_drafts, speculative_generate_step


def test_acceptance_rule_keeps_the_target_distribution():
    # One draft over 6 tokens: the first output token must follow p whatever q is. With 200k
    # samples the standard error of a frequency is <= 0.0011, so 0.006 (> 5 sigma) never fails by
    # chance and a 2 % shift (> 18 sigma) is always caught.
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6)).astype(np.float32)
    q = rng.dirichlet(np.ones(6)).astype(np.float32)
    b = 200_000
    mx.random.seed(0)
    drafts = mx.random.categorical(mx.broadcast_to(mx.log(mx.array(q)), (b, 6)))[:, None].astype(mx.int32)
    target = mx.broadcast_to(mx.array(np.stack([p, p]))[None], (b, 2, 6))
    count, nxt = accept_drafts(target, drafts, mx.broadcast_to(mx.array(q)[None, None], (b, 1, 6)), greedy=False)
    first = np.where(np.array(count) > 0, np.array(drafts[:, 0]), np.array(nxt))
    freq = np.bincount(first, minlength=6) / b
    assert np.max(np.abs(freq - p)) < 0.006


@pytest.mark.parametrize("drafter,n", [("forced", 3), ("mtp", 2)])
def test_greedy_with_drafts_equals_greedy(tiny_ckpt, drafter, n):
    model, _ = load(tiny_ckpt, dtype=mx.float32, mtp=True)
    prompt = mx.array(list(range(5, 25)), dtype=mx.int32)
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=40, sampler=lambda x: mx.argmax(x, -1),
                                       prompt_cache=model.make_cache())]
    stats = SpeculativeStats()
    d = ForcedDrafter(ref) if drafter == "forced" else MTPDrafter()
    out = [t for t, _, _ in speculative_generate_step(prompt, model, d, num_draft_tokens=n, max_tokens=40, stats=stats)]
    assert out == ref
    if drafter == "forced":
        assert stats.acceptance_rate == 1.0
