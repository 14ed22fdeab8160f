"""The model against transformers' DeepseekV4ForCausalLM, and against itself across call splits.

Tiny official-format checkpoints (sliding window 16, ratio-4 and ratio-128 layers, 3 hash
layers, indexer top-k 4 with 16 indexer heads) and sequences that cross every boundary:
the window, many ratio-4 rows beyond the indexer's top-k, and several ratio-128 windows.
"""

import numpy as np
import mlx.core as mx
import pytest

import ds4mlx
from ds4mlx.state import snapshot

SEQ = 300          # crosses 2 ratio-128 boundaries, 75 ratio-4 rows (top-k 4), window 16
LONG = 520         # 4 ratio-128 boundaries


def tokens(n: int, seed: int = 0, vocab: int = 1024) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, size=(1, n))


def run_split(model, toks: np.ndarray, sizes) -> np.ndarray:
    cache = model.make_cache()
    outs, i = [], 0
    for n in sizes:
        outs.append(np.array(model(mx.array(toks[:, i:i + n]), cache=cache)))
        i += n
    assert i == toks.shape[1]
    return np.concatenate(outs, axis=1)


# Single-token decode steps where the state crosses a seam, one call in between: the first
# window (16), the first ratio-4 rows and the indexer's top-k (more than 4 rows from position
# 20), and both ratio-128 boundaries.
DECODE_AT_SEAMS = [1] * 24 + [96] + [1] * 16 + [112] + [1] * 16 + [SEQ - 264]


def chunks_of(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def model6(tiny_ckpt):
    model, _ = ds4mlx.load(tiny_ckpt, qat_rounding=False, dtype=mx.float32, mtp=True)
    return model


@pytest.fixture(scope="module")
def model4(tiny_ckpt_4expert):
    model, _ = ds4mlx.load(tiny_ckpt_4expert, qat_rounding=False, dtype=mx.float32)
    return model


@pytest.fixture(scope="module")
def full6(model6):
    toks = tokens(SEQ)
    return toks, np.array(model6(mx.array(toks)))


# ---------------------------------------------------------------- independent reference
@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_ckpt_4expert"])
def test_matches_transformers(which, request):
    hf_reference = pytest.importorskip("hf_reference")
    path = request.getfixturevalue(which)
    model, _ = ds4mlx.load(path, qat_rounding=False, dtype=mx.float32)
    toks = tokens(LONG, seed=1)
    ours = np.array(model(mx.array(toks)))
    ref = hf_reference.hf_logits(path, toks)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))
    # Not a degenerate comparison: logits vary across the vocabulary and along the sequence.
    assert ref.std(-1).min() > 1e-2 and len(np.unique(ref.argmax(-1))) > 10


# ---------------------------------------------------------------- call splits
@pytest.mark.parametrize("size", [1, 3, 4, 5, 127, 128, 129])
def test_chunked_prefill_equals_prefill(model6, full6, size):
    toks, full = full6
    split = run_split(model6, toks, chunks_of(SEQ, size))
    assert rel_err(split, full) <= 1e-5


def test_random_split_equals_prefill(model6, full6):
    toks, full = full6
    rng = np.random.default_rng(7)
    sizes, left = [], SEQ
    while left:
        n = int(min(left, rng.integers(1, 40)))
        sizes.append(n)
        left -= n
    assert rel_err(run_split(model6, toks, sizes), full) <= 1e-5


def test_decode_with_rounding_on(tiny_ckpt):
    model, _ = ds4mlx.load(tiny_ckpt, qat_rounding=True, dtype=mx.float32)
    toks = tokens(SEQ, seed=3)
    full = np.array(model(mx.array(toks)))
    decode = run_split(model, toks, DECODE_AT_SEAMS)
    chunked = run_split(model, toks, chunks_of(SEQ, 5))
    assert (decode.argmax(-1) == full.argmax(-1)).mean() >= 0.99
    assert (chunked.argmax(-1) == full.argmax(-1)).mean() >= 0.99
    # The rounding is really on: it moves the logits.
    model.set_qat_rounding(False)
    off = np.array(model(mx.array(toks)))
    assert rel_err(off, full) > 1e-4


def test_no_cache_is_causal(model6, full6):
    toks, full = full6
    # Logits at a position never depend on later tokens.
    for n in (17, 130, 257):
        prefix = np.array(model6(mx.array(toks[:, :n])))
        assert rel_err(prefix, full[:, :n]) <= 1e-5
    altered = toks.copy()
    altered[:, 200:] = (altered[:, 200:] + 1) % 1024
    out = np.array(model6(mx.array(altered)))
    assert rel_err(out[:, :200], full[:, :200]) <= 1e-5
    assert rel_err(out[:, 200:], full[:, 200:]) > 1e-3


def test_fresh_cache_per_sequence(model6, full6):
    toks, full = full6
    cache = model6.make_cache()
    model6(mx.array(tokens(37, seed=9)), cache=cache)  # another sequence first
    again = run_split(model6, toks, chunks_of(SEQ, 64))
    assert rel_err(again, full) <= 1e-5


def test_snapshot_restores_state(model6, full6):
    toks, full = full6
    cache = model6.make_cache()
    model6(mx.array(toks[:, :150]), cache=cache)
    saved = snapshot(cache)
    model6(mx.array(tokens(20, seed=5)), cache=cache)  # a branch we throw away
    rest = np.array(model6(mx.array(toks[:, 150:]), cache=saved))
    assert rel_err(rest, full[:, 150:]) <= 1e-5


# ---------------------------------------------------------------- routing
def test_override_equals_4expert_checkpoint(tiny_ckpt, model4):
    model, _ = ds4mlx.load(tiny_ckpt, experts_per_token=4, qat_rounding=False, dtype=mx.float32)
    assert model.experts_per_token == 4 and model.config.num_experts_per_tok == 6
    toks = tokens(160, seed=4)
    np.testing.assert_array_equal(np.array(model(mx.array(toks))), np.array(model4(mx.array(toks))))


def test_top_k_changes_output(model6, model4):
    toks = tokens(40, seed=6)
    assert rel_err(np.array(model4(mx.array(toks))), np.array(model6(mx.array(toks)))) > 1e-3


# ---------------------------------------------------------------- MTP
def test_mtp_block_is_callable_and_split_invariant(model6):
    toks = tokens(60, seed=8)
    cache = model6.make_cache()
    h = model6.hidden_streams(mx.array(toks[:, :-1]), cache)
    nxt = mx.array(toks[:, 1:])
    whole = np.array(model6.mtp_logits(h, nxt, cache))
    assert whole.shape == (1, 59, model6.config.vocab_size) and np.isfinite(whole).all()
    with pytest.raises(ValueError, match="MTP cache"):
        model6.mtp_logits(h, nxt, cache)  # would run past the main layers
    cache2 = model6.make_cache()
    h2 = model6.hidden_streams(mx.array(toks[:, :-1]), cache2)
    parts = [np.array(model6.mtp_logits(h2[:, i:i + 20], nxt[:, i:i + 20], cache2)) for i in range(0, 59, 20)]
    assert rel_err(np.concatenate(parts, 1), whole) <= 1e-5
