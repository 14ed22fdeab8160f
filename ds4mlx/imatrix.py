"""``ds4mlx imatrix``: an importance matrix from running the model over calibration text.

For every projection of the transformer blocks this records, as llama.cpp's ``llama-imatrix``
does, the sum over tokens of each squared input activation and the number of tokens, per expert
for the routed experts (a token routed to an expert counts for that expert only), and writes
them in llama.cpp's GGUF imatrix format under the model's GGUF tensor names
(``io/imatrix.py``), so ``ds4mlx convert --imatrix`` and ``llama-quantize --imatrix`` read it.

The text is cut into chunks of ``chunk_size`` tokens, each run from an empty context (the
trailing partial chunk is dropped), as llama-imatrix does. The head and the router are not
recorded (llama-imatrix skips ``output.weight`` by default; the router is a plain product here).
Recording wraps each projection module, so the fused expert kernels are bypassed while it runs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .io.imatrix import write_imatrix
from .names import internal_to_gguf

DEFAULT_CHUNK_SIZE = 512


class Statistics:
    """Running ``Σ x²`` per input (``[n_mat, n_in]``, float32) and token counts per matrix."""

    def __init__(self, n_mat: int):
        self.n_mat = n_mat
        self.sums: mx.array | None = None
        self.counts = mx.zeros((n_mat,), dtype=mx.float32)

    def _start(self, n_in: int) -> None:
        if self.sums is None:
            self.sums = mx.zeros((self.n_mat, n_in), dtype=mx.float32)

    def add_dense(self, x: mx.array) -> None:
        x2 = mx.square(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        self._start(x.shape[-1])
        self.sums = self.sums + mx.sum(x2, axis=0)[None]
        self.counts = self.counts + x2.shape[0]

    def add_routed(self, x: mx.array, indices: mx.array) -> None:
        """Switch-linear inputs: ``x`` one row per token (``[N, 1, 1, D]``, indices ``[N, k]``)
        or one per (token, expert) pair (``[P, 1, D]``, indices ``[P]``)."""
        rows = mx.square(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        idx = indices.reshape(-1).astype(mx.int32)
        if idx.size != rows.shape[0]:  # one input row per token, k experts each
            k = idx.size // rows.shape[0]
            rows = mx.repeat(rows, k, axis=0)
        self._start(x.shape[-1])
        self.sums = self.sums.at[idx].add(rows)
        self.counts = self.counts.at[idx].add(mx.ones(idx.shape, dtype=mx.float32))

    def arrays(self) -> list[mx.array]:
        return [a for a in (self.sums, self.counts) if a is not None]


class Recorder(nn.Module):
    """A projection that records its inputs into ``stats`` and then runs unchanged."""

    def __init__(self, inner: nn.Module, stats: Statistics):
        super().__init__()
        self.inner = inner
        object.__setattr__(self, "stats", stats)  # not a parameter container

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        indices = args[0] if args else kwargs.get("indices")
        if indices is None:
            self.stats.add_dense(x)
        else:
            self.stats.add_routed(x, indices)
        return self.inner(x, *args, **kwargs)

    def grouped(self, x: mx.array, groups: int) -> mx.array:
        """The block-diagonal use of attention's ``wo_a``: every group row is an input row."""
        from .model.attention import grouped_linear

        self.stats.add_dense(x)
        return grouped_linear(self.inner, x, groups)


def _projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(internal path, module) of the projections in the transformer blocks."""
    out = []
    for path, module in model.named_modules():
        if not path.startswith("layers.") or not hasattr(module, "weight"):
            continue
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)) or hasattr(module, "num_experts") \
                or type(module).__name__ in ("GGUFLinear", "GGUFSwitchLinear", "SwitchLinear",
                                             "QuantizedSwitchLinear"):
            out.append((path, module))
    return out


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    obj: Any = model
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    if isinstance(obj, list):
        obj[int(last)] = module
    else:
        setattr(obj, last, module)


def attach(model: nn.Module) -> dict[str, Statistics]:
    """Wrap every block projection of ``model`` in a :class:`Recorder`; returns the statistics
    by GGUF tensor name (``blk.3.ffn_gate_exps.weight``)."""
    n_experts = int(model.config.n_routed_experts)
    stats: dict[str, Statistics] = {}
    for path, module in _projections(model):
        try:
            name = internal_to_gguf(path + ".weight")
        except (KeyError, ValueError):
            continue  # no GGUF tensor of its own
        routed = ".ffn.experts." in path
        stats[name] = Statistics(n_experts if routed else 1)
        _replace(model, path, Recorder(module, stats[name]))
    if not stats:
        raise ValueError("the model has no projection to record (unexpected module layout)")
    return stats


def detach(model: nn.Module) -> None:
    for path, module in list(model.named_modules()):
        if isinstance(module, Recorder):
            _replace(model, path, module.inner)


def compute_imatrix(model: nn.Module, tokens: list[int], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                    max_chunks: int | None = None,
                    progress: Callable[[int, int, float, float], None] | None = None
                    ) -> tuple[dict[str, Statistics], int, float]:
    """Run ``model`` over ``tokens`` in chunks of ``chunk_size``; returns the statistics, the
    number of chunks and the perplexity of the text (next-token, within chunks)."""
    n_chunks = len(tokens) // chunk_size
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise ValueError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {chunk_size} "
                         "(use a longer text or a smaller --chunk-size)")
    stats = attach(model)
    nll, n_pred, t0 = 0.0, 0, time.perf_counter()
    try:
        for c in range(n_chunks):
            chunk = mx.array(np.asarray(tokens[c * chunk_size:(c + 1) * chunk_size], dtype=np.int32))[None]
            logits = model(chunk)[0]
            lse = mx.logsumexp(logits[:-1].astype(mx.float32), axis=-1)
            picked = mx.take_along_axis(logits[:-1], chunk[0, 1:, None], axis=-1)[:, 0]
            loss = mx.sum(lse - picked.astype(mx.float32))
            mx.eval(loss, *[a for s in stats.values() for a in s.arrays()])
            nll += float(loss)
            n_pred += chunk_size - 1
            if progress is not None:
                progress(c + 1, n_chunks, (c + 1) * chunk_size / (time.perf_counter() - t0), math.exp(nll / n_pred))
    finally:
        detach(model)
    return stats, n_chunks, math.exp(nll / max(n_pred, 1))


def run_imatrix(model_source: str, text_file: str | os.PathLike, output: str | os.PathLike, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE, max_chunks: int | None = None,
                experts_per_token: int | None = None, progress: bool = True) -> Path:
    """``ds4mlx imatrix``: load the model, read the text, write the GGUF imatrix."""
    from .loader import load

    output = Path(output)
    if chunk_size < 2:
        raise ValueError(f"--chunk-size must be at least 2, got {chunk_size}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"--chunks must be at least 1, got {max_chunks}")
    if output.exists() and output.is_dir():
        raise ValueError(f"{output}: is a directory; give the imatrix file name (e.g. imatrix.gguf)")
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{text_file}: cannot read the calibration text ({getattr(e, 'strerror', None) or e})") from None
    model, tokenizer = load(model_source, experts_per_token=experts_per_token, dtype=mx.float32)
    if tokenizer is None:
        raise ValueError(f"{model_source}: no tokenizer to encode the calibration text")
    tokens = list(tokenizer.encode(text))

    def show(done: int, total: int, tok_s: float, ppl: float) -> None:
        print(f"\rimatrix: chunk {done}/{total}, {tok_s:.0f} tokens/s, ppl {ppl:.3f}", end="",
              file=sys.stderr, flush=True)

    stats, n_chunks, ppl = compute_imatrix(model, tokens, chunk_size=chunk_size, max_chunks=max_chunks,
                                           progress=show if progress else None)
    if progress:
        print(file=sys.stderr)
    recorded = {k: s for k, s in stats.items() if s.sums is not None}
    sums = {k: np.array(s.sums) for k, s in recorded.items()}
    counts = {k: np.array(s.counts) for k, s in recorded.items()}
    if not all(np.all(np.isfinite(v)) for v in sums.values()):
        bad = next(k for k, v in sums.items() if not np.all(np.isfinite(v)))
        raise ValueError(f"{model_source}: non-finite activations reached {bad}; no imatrix written")
    output.parent.mkdir(parents=True, exist_ok=True)
    return write_imatrix(output, sums, counts, datasets=[str(text_file)], chunk_count=n_chunks,
                         chunk_size=chunk_size)
