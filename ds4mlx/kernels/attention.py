"""Fused decode attention and attention-row kernels (``metal/attention.metal``,
``metal/rows.metal``), each beside its MLX-ops twin (the Lightning Indexer's are in
:mod:`.indexer`).

Entry points (kernel | ops twin): :func:`rope_rows` (RMS, RoPE and FP8 rounding of attention
rows; its twin is the model's own ops, :meth:`ds4mlx.model.attention.Attention.rows`),
:func:`decode_attention` (window rows + compressed rows + sink, one pass, one online softmax,
KV read in its storage dtype), :func:`compress_rows` (the compressor's step for one token).
Whether the kernel serves a call is :func:`ds4mlx.kernels.serves` of the variant ``ATTENTION``
/ ``ROPE_ROWS``.
The per-query bounds are computed on the host from Python ints (:func:`query_bounds`), so
they cost no launch.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from ..quant.codecs import FP8_ACT_BLOCK
from . import dispatch
from .dispatch import ATTENTION, ROPE_ROWS, KernelInputError, ceil_div, device_array
from .source import ATTN_SIMDGROUPS

@functools.cache
def _dummy(dtype: mx.Dtype) -> mx.array:
    # an input a kernel variant does not read; made once, so no fill runs per call
    a = mx.zeros((8,), dtype=dtype)
    mx.eval(a)
    return a


def query_bounds(p0: int, s: int, key_start: int, window: int, ratio: int) -> np.ndarray:
    """Host int32 ``[s, 3]`` for the queries at positions p0..p0+s-1: first and end row of their
    window in a key buffer whose row 0 is position ``key_start``, and how many compressed rows
    each can see (``(p + 1) // ratio``; 0 without compression)."""
    p = np.arange(p0, p0 + s, dtype=np.int64)
    lo = np.maximum(p - window + 1 - key_start, 0)
    hi = p + 1 - key_start
    vis = (p + 1) // ratio if ratio else np.zeros_like(p)
    return np.stack([lo, hi, vis], axis=1).astype(np.int32)


# ----------------------------------------------------------------------------- attention
def _rows_twin():
    twin = dispatch.twin(ROPE_ROWS)  # the model's row ops (installed by ds4mlx.model.rope)
    if twin is None:
        raise RuntimeError("decode_attention: no ops twin of rope_rows installed (import ds4mlx.model)")
    return twin


def decode_attention_ops(q: mx.array, kw: mx.array, comp: mx.array | None, idx: mx.array | None,
                         bounds: np.ndarray, sink: mx.array, scale: float, *,
                         rope: tuple | None = None, out_dtype: mx.Dtype = mx.float32,
                         write: tuple | None = None):
    """Ops twin of :func:`decode_attention`: scores of every row, masks, one softmax with the
    sink, then the weighted rows, in float32 (with ``rope``, the model's row ops before and
    after, as the model runs them without the fused kernel; with ``write``, the new rows
    written into the window buffer first, and the new buffer returned too)."""
    if write is not None:
        kw = mx.slice_update(kw, write[0].astype(kw.dtype), mx.array([0, int(write[1]), 0]),
                             (0, 1, 2))
        return (decode_attention_ops(q, kw, comp, idx, bounds, sink, scale, rope=rope,
                                     out_dtype=out_dtype), _kept(kw, np.asarray(bounds)[-1]))
    if rope is not None:
        pos, freqs, eps = rope
        rows, rd = _rows_twin(), 2 * freqs.shape[0]
        pos = np.asarray(pos).reshape(-1, 1)
        q = rows(q, pos, freqs, norm=NORM_PLAIN, weight=None, eps=eps, fp8=False, inverse=False,
                 out_dtype=mx.float32, rope_dims=rd)
        out = decode_attention_ops(q, kw, comp, idx, bounds, sink, scale)
        return rows(out, pos, freqs, norm=NORM_NONE, weight=None, eps=0.0, fp8=False,
                    inverse=True, out_dtype=out_dtype, rope_dims=rd)
    b, s, h, d = q.shape
    bounds = mx.array(bounds)
    lo, hi, vis = bounds[:, 0:1], bounds[:, 1:2], bounds[:, 2:3]
    kwf = kw.astype(mx.float32)
    j = mx.arange(kw.shape[1])[None, :]
    sw = (q.reshape(b, s * h, d) @ kwf.swapaxes(-1, -2)).reshape(b, s, h, -1) * scale
    sw = mx.where(((j >= lo) & (j < hi))[:, None, :], sw, -mx.inf)
    parts, rows = [sw], None
    if comp is not None and comp.shape[1] > 0:
        cf = comp.astype(mx.float32)
        if idx is None:
            rows = cf
            sc = (q.reshape(b, s * h, d) @ cf.swapaxes(-1, -2)).reshape(b, s, h, -1) * scale
            seen = mx.arange(cf.shape[1])[None, :] < vis
            sc = mx.where(seen[:, None, :], sc, -mx.inf)
        else:
            safe = mx.clip(idx, 0, cf.shape[1] - 1)
            rows = mx.take_along_axis(cf[:, None], safe[..., None], axis=2)  # [B, S, K, d]
            sc = (q @ rows.swapaxes(-1, -2)) * scale
            seen = (idx >= 0) & (idx < vis[None])
            sc = mx.where(seen[:, :, None, :], sc, -mx.inf)
        parts.append(sc)
    sinks = mx.broadcast_to(sink.astype(mx.float32)[:, None], (b, s, h, 1))
    probs = mx.softmax(mx.concatenate(parts + [sinks], axis=-1), axis=-1, precise=True)
    lw = kw.shape[1]
    out = (probs[..., :lw].reshape(b, s * h, lw) @ kwf).reshape(b, s, h, d)
    if rows is not None:
        pc = probs[..., lw:-1]
        out = out + ((pc.reshape(b, s * h, -1) @ rows).reshape(b, s, h, d) if idx is None
                     else pc @ rows)
    return out


def _kept(kw: mx.array, last: np.ndarray) -> mx.array:
    """The window buffer a call leaves: the last query's window rows (``last``: its bounds),
    zero elsewhere (what kernel attn_decode's WRITE makes)."""
    j = mx.arange(kw.shape[1])[None, :, None]
    return mx.where((j >= int(last[0])) & (j < int(last[1])), kw, mx.zeros((), kw.dtype))


def attention_rope_serves(dtype: mx.Dtype, d: int, rope_dims: int) -> bool:
    """Whether :func:`decode_attention` with ``rope`` serves a model in ``dtype`` with heads of
    ``d`` (``rope_dims`` rotated): the variant is on and passed its first-use check."""
    fits = d % 32 == 0 and 0 < rope_dims <= d and (d - rope_dims) % 2 == 0 and rope_dims % 2 == 0
    return fits and dispatch.serves(ATTENTION) and dispatch.first_use_ok(
        ATTENTION, dtype, head_dim=d, rope_dims=rope_dims)


def decode_attention(q: mx.array, kw: mx.array, comp: mx.array | None, idx: mx.array | None,
                     bounds: np.ndarray, sink: mx.array, scale: float, *,
                     rope: tuple | None = None, out_dtype: mx.Dtype = mx.float32,
                     write: tuple[mx.array, int] | None = None):
    """Attention of a few queries over their window rows, compressed rows and sink, in one
    softmax: ``[B, S, H, D]`` float32.

    ``rope`` = (host positions ``[S]``, freqs, eps): q is the projection as it comes (any
    float dtype); the kernel normalises (plain RMS) and rotates it, and rotates the output back
    into ``out_dtype``: what :func:`rope_rows` does before and after, in the same launch.

    q: ``[B, S, H, D]`` float32; kw: ``[B, LW, D]`` window rows (any float dtype, read as
    stored); comp: ``[B, NC, D]`` compressed rows or None (rows past what a query sees are
    never read, so a grown buffer can be passed whole); idx: ``[B, S, K]`` int32 picks into
    comp (None: every visible row); bounds: ``[S, 3]`` from :func:`query_bounds`; sink ``[H]``.

    ``write`` = (knew ``[B, S, D]``, row): the call's own window rows, not yet in ``kw`` (its
    buffer): the kernel reads them from knew as rows row.., and returns (out, the new buffer
    ``[B, LW, D]``): the last query's window rows (knew written at row), zero elsewhere; the
    state's window write is then no launch of its own.
    """
    if q.ndim != 4 or kw.ndim != 3 or kw.shape[0] != q.shape[0] or kw.shape[2] != q.shape[3]:
        raise KernelInputError(f"decode_attention: q {tuple(q.shape)} and kw {tuple(kw.shape)} "
                               "must be [B, S, H, D] and [B, LW, D]")
    b, s, h, d = q.shape
    bounds = np.asarray(bounds, dtype=np.int32)
    if tuple(bounds.shape) != (s, 3) or tuple(sink.shape) != (h,):
        raise KernelInputError(f"decode_attention: bounds must be ({s}, 3) and sink ({h},), got "
                               f"{tuple(bounds.shape)} and {tuple(sink.shape)}")
    if comp is not None and (comp.ndim != 3 or comp.shape[0] != b or comp.shape[2] != d):
        raise KernelInputError(f"decode_attention: comp must be [{b}, NC, {d}], got "
                               f"{tuple(comp.shape)}")
    if idx is not None and (comp is None or idx.shape[:2] != (b, s)):
        raise KernelInputError(f"decode_attention: idx must be [{b}, {s}, K] with comp rows")
    if d % 32:
        raise KernelInputError(f"decode_attention: head dim {d} is not a multiple of 32")
    rd = 0 if rope is None else 2 * rope[1].shape[0]
    if rope is None:
        ok = dispatch.serves(ATTENTION) and dispatch.first_use_ok(ATTENTION, kw.dtype, head_dim=d)
    else:
        ok = attention_rope_serves(kw.dtype, d, rd)
    if write is not None:
        knew, row = write[0], int(write[1])
        if tuple(knew.shape) != (b, s, d) or not 0 <= row <= kw.shape[1] - s \
                or int(bounds[-1, 1]) != row + s:
            raise KernelInputError(f"decode_attention: write rows {tuple(knew.shape)} at row "
                                   f"{row} must be [{b}, {s}, {d}], end the last query's window "
                                   f"({int(bounds[-1, 1])}) and fit the {kw.shape[1]} rows of kw")
    if not ok:
        return decode_attention_ops(q, kw, comp, idx, bounds, sink, scale, rope=rope,
                                    out_dtype=out_dtype, write=write)
    has_comp = comp is not None and comp.shape[1] > 0
    if not has_comp:
        comp, idx = kw, None  # never read: no query sees a compressed row
    if comp.dtype != kw.dtype:
        comp = comp.astype(kw.dtype)
    indexed = idx is not None
    k = idx.shape[2] if indexed else 0
    if not has_comp:
        bounds = bounds * np.array([1, 1, 0], np.int32)  # no compressed row to see
    if rope is None:
        q, out_dtype = q.astype(mx.float32), mx.float32
        pos, freqs, eps = _dummy(mx.int32), _dummy(mx.float32), 0.0
    else:
        pos = mx.array(np.pad(np.asarray(rope[0], np.int32).reshape(s), (0, max(0, 8 - s))))
        freqs, eps = device_array(rope[1].astype(mx.float32)), float(rope[2])
    if write is None:
        knew, row, kwo = _dummy(kw.dtype), 0, (1,)
    else:
        knew, kwo = write[0].astype(kw.dtype), tuple(kw.shape)
    out, kw_new = dispatch.run("attention.metal", "attn_decode",
                 {"q": q, "kw": kw, "comp": comp,
                  "idx": idx.astype(mx.int32) if indexed else _dummy(mx.int32),
                  "bounds": mx.array(bounds), "sink": sink.astype(mx.float32),
                  "scale": float(scale), "pos": pos, "freqs": freqs, "eps": eps,
                  "S": s, "H": h, "LW": kw.shape[1], "NC": comp.shape[1], "K": k,
                  "knew": knew, "NEWROW": row},
                 {"out": ((b, s, h, d), out_dtype), "kwo": (kwo, kw.dtype)},
                 grid=(32 * ATTN_SIMDGROUPS, h, b * s), threadgroup=(32 * ATTN_SIMDGROUPS, 1, 1),
                 template=[("T", kw.dtype), ("QT", q.dtype), ("OutT", out_dtype), ("D", d),
                           ("INDEXED", indexed), ("ROPE", rope is not None), ("RD", rd),
                           ("WRITE", write is not None)])
    return out if write is None else (out, kw_new)


# ----------------------------------------------------------------------------- rows
NORM_NONE, NORM_PLAIN, NORM_WEIGHTED = 0, 1, 2
FP8_BLOCK = FP8_ACT_BLOCK  # the QAT FP8 round trip's block, as rows.metal gets it


def rope_rows_serves(dtype: mx.Dtype, d: int, rope_dims: int, q_rank: int | None = None) -> bool:
    """Whether :func:`rope_rows` serves rows of ``d`` features (``rope_dims`` rotated) for a
    model running in ``dtype`` (with ``q_rank``: and q_norm rows of that width alongside): the
    variant is on and passed its first-use check. The caller asks, since the twin is its own
    ops (it runs them when this is False)."""
    if q_rank is not None and q_rank % 32:
        return False
    return dispatch.serves(ROPE_ROWS) and dispatch.first_use_ok(
        ROPE_ROWS, dtype, head_dim=d, rope_dims=rope_dims, q_rank=q_rank)


def rope_rows(x: mx.array, pos: np.ndarray, freqs: mx.array, *, norm: int = NORM_NONE,
              weight: mx.array | None = None, eps: float = 0.0, fp8: bool = False,
              inverse: bool = False, out_dtype: mx.Dtype | None = None,
              q_norm: tuple[mx.array, mx.array] | None = None, comp: tuple | None = None):
    """Kernel ``rope_rows`` on rows ``x [..., D]``: RMS normalisation (``norm``: none, plain or
    times ``weight [D]``), RoPE of the last ``2·len(freqs)`` features at positions ``pos``
    (host ints, one per row, broadcast to ``x.shape[:-1]``; ``inverse`` rotates back), then,
    with ``fp8``, the e4m3 round trip of the other features in blocks of 64. Each step's result
    is rounded to ``out_dtype`` (default x's dtype), as when the steps run as ops.

    ``q_norm`` = (rows ``[..., DQ]`` in x's dtype, weight ``[DQ]``): those rows RMS-normalised
    (with ``eps``) in the same launch, as ``mx.fast.rms_norm``; then (out, normalised rows)
    are returned (the attention's kv rows and its q_norm, both from one merged projection).

    ``comp`` = the arguments of :func:`compress_rows` (x, w, bias, bufs, n): the layer's
    compressor step in the same launch; its buffers come last in the returned tuple."""
    d = x.shape[-1]
    rd = 2 * freqs.shape[0]
    out_dtype = out_dtype or x.dtype
    dpl = d // 32
    if d % 32 or dpl % 2 or (d - rd) % dpl or not 0 < rd <= d:
        raise KernelInputError(f"rope_rows: {d} features with {rd} rotated do not split into "
                               "32 lanes of whole pairs")
    if fp8 and ((d - rd) % FP8_BLOCK or FP8_BLOCK % dpl):
        raise KernelInputError(f"rope_rows: {d - rd} rounded features are not whole FP8 "
                               f"blocks of {FP8_BLOCK} over 32 lanes")
    if norm == NORM_WEIGHTED and (weight is None or tuple(weight.shape) != (d,)):
        raise KernelInputError(f"rope_rows: the norm weight must be ({d},)")
    if not dispatch.serves(ROPE_ROWS):
        raise KernelInputError("rope_rows: no kernel serves this call (the caller runs its ops)")
    lead = x.shape[:-1]
    rows = int(np.prod(lead)) if lead else 1
    pos = np.broadcast_to(np.asarray(pos, dtype=np.int32), lead).reshape(rows)
    w = weight if norm == NORM_WEIGHTED else _dummy(mx.float32)
    pos = np.pad(pos, (0, max(0, 8 - rows)))  # padded here, not by a launch
    if q_norm is None:
        qr, wq, dq = _dummy(x.dtype), _dummy(w.dtype), 0
    else:
        qr, wq = q_norm[0], q_norm[1]
        dq = qr.shape[-1]
        if tuple(qr.shape[:-1]) != tuple(lead) or tuple(wq.shape) != (dq,) or dq % 32 \
                or qr.dtype != x.dtype or wq.dtype != w.dtype:
            raise KernelInputError(f"rope_rows: q_norm rows {tuple(qr.shape)} and weight "
                                   f"{tuple(wq.shape)} must be [{', '.join(map(str, lead))}, DQ] "
                                   "and [DQ], DQ a multiple of 32, in x's and the weight's dtypes")
        qr = qr.reshape(rows, dq)
    f32 = _dummy(mx.float32)
    if comp is None:
        cin = {"cx": f32, "cw": f32, "cbias": f32, "cp0": f32, "cp1": f32, "CROW": 0, "CK": 0,
               "CN0": 0, "CN1": 0, "CR": 0}  # never read
        cout, features = [(1,), (1,)], 0
    else:
        _compress_args(*comp)
        bufs = comp[3]
        cin = _compress_inputs(*comp, "c")
        cout = [tuple(bufs[0].shape), tuple(bufs[1].shape) if len(bufs) == 2 else (1,)]
        features = comp[1].shape[0]
    out, qn, co0, co1 = dispatch.run(
        "rows.metal", "rope_rows",
        {"x": x.reshape(rows, d), "w": device_array(w), "pos": mx.array(pos),
         "freqs": device_array(freqs.astype(mx.float32)), "eps": float(eps),
         "qr": qr, "wq": wq, "R": rows, **cin},
        {"out": ((rows, d), out_dtype), "qn": ((rows, dq) if dq else (1,), x.dtype),
         "co0": (cout[0], mx.float32), "co1": (cout[1], mx.float32)},
        grid=(32, rows * (2 if dq else 1) + features, 1), threadgroup=(32, 1, 1),
        template=[("T", x.dtype), ("WT", w.dtype), ("OutT", out_dtype), ("NORM", int(norm)),
                  ("FP8", bool(fp8)), ("INV", bool(inverse)), ("D", d), ("RD", rd), ("DQ", dq),
                  ("COMP", comp is not None)])
    res = (out.reshape(*lead, d),) + (() if q_norm is None else (qn.reshape(*lead, dq),))
    if comp is not None:
        res += (co0, co1) if len(comp[3]) == 2 else (co0,)
    return res[0] if len(res) == 1 else res


# ----------------------------------------------------------------------------- compressor rows
_COMP_SG = 8  # SG of comp_rows: features per threadgroup


def compress_rows_ops(x: mx.array, w: mx.array, bias: mx.array, bufs: list[mx.array],
                      n: int) -> list[mx.array]:
    """Ops twin of :func:`compress_rows`: the product with the bias (one ``addmm``, as the
    model's merged projection), split over the buffers, each written at row ``n``."""
    y = mx.addmm(bias.reshape(1, -1), x.reshape(1, -1).astype(mx.float32), w.T)
    out, start = [], 0
    for buf in bufs:
        width = buf.shape[2]
        part = y[:, start:start + width].reshape(1, 1, width)
        out.append(mx.slice_update(buf, part, mx.array([0, n, 0]), (0, 1, 2)))
        start += width
    return out


def compress_rows(x: mx.array, w: mx.array, bias: mx.array, bufs: list[mx.array],
                  n: int) -> list[mx.array]:
    """Kernel ``comp_rows``: one token's compressor rows, written into the unfinished windows'
    buffers. x: the token's input (``K`` values, float32); w ``[N, K]`` float32: the merged kv |
    score weights of one or two compressors; bias ``[N]`` float32 (the slot's APE row); bufs: one
    or two buffers ``[1, R, Ni]`` float32 with ``sum(Ni) = N``. Returns the buffers with row
    ``n`` = their part of ``x @ w.T + bias`` (the rest copied): the product and the writes in
    one launch, for what the ops run as three. The caller asks :func:`rope_rows_serves` (the
    rows kernels' variant) first."""
    _compress_args(x, w, bias, bufs, n)
    if not dispatch.serves(ROPE_ROWS):
        raise KernelInputError("compress_rows: no kernel serves this call (the caller runs its ops)")
    two = len(bufs) == 2
    o0, o1 = dispatch.run("rows.metal", "comp_rows", _compress_inputs(x, w, bias, bufs, n, ""),
                          {"o0": (tuple(bufs[0].shape), mx.float32),
                           "o1": (tuple(bufs[1].shape) if two else (1,), mx.float32)},
                          grid=(32 * _COMP_SG * ceil_div(w.shape[0], _COMP_SG), 1, 1),
                          threadgroup=(32 * _COMP_SG, 1, 1), template=[])
    return [o0, o1] if two else [o0]


def _compress_inputs(x, w, bias, bufs, n: int, prefix: str) -> dict:
    two = len(bufs) == 2
    named = {"x": x.reshape(-1).astype(mx.float32), "w": w,
             "bias": device_array(bias.astype(mx.float32)), "p0": bufs[0],
             "p1": bufs[1] if two else _dummy(mx.float32), "n": int(n), "K": x.size,
             "N0": bufs[0].shape[2], "N1": bufs[1].shape[2] if two else 0, "R": bufs[0].shape[1]}
    if prefix:  # rope_rows' names: c-prefixed, the row upper case
        named = {("CROW" if k == "n" else f"c{k}" if k.islower() else f"C{k}"): v
                 for k, v in named.items()}
    return named


def _compress_args(x, w, bias, bufs, n: int) -> None:
    k = x.size
    widths = [b.shape[2] for b in bufs]
    if not 1 <= len(bufs) <= 2 or w.ndim != 2 or tuple(w.shape) != (sum(widths), k) \
            or tuple(bias.shape) != (w.shape[0],) or w.dtype != mx.float32 \
            or any(b.ndim != 3 or b.shape[0] != 1 or b.shape[1] != bufs[0].shape[1]
                   or b.dtype != mx.float32 for b in bufs) or not 0 <= n < bufs[0].shape[1]:
        raise KernelInputError(
            f"compress_rows: x of {k}, w {tuple(w.shape)} {w.dtype}, bias {tuple(bias.shape)}, "
            f"buffers {[tuple(b.shape) for b in bufs]} at row {n}: need w [sum of widths, K] "
            "float32, bias [N], one or two float32 buffers [1, R, width] and 0 <= n < R")
