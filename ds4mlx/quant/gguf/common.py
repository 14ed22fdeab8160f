"""Helpers shared by the GGUF block formats: byte slicing in MLX, fp16 fields, and the
least-squares scale/min search used by the K-quant quantizers.

All dequantizers take raw bytes ``uint8 [..., n_blocks * BLOCK_BYTES]`` and work on the view
``[..., n_blocks, BLOCK_BYTES]``. Arithmetic is float32 and follows the order of the reference
formula of each format, so results are bit-identical to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import native


class BlockShapeError(ValueError):
    """A byte row or value row does not hold a whole number of blocks."""


# ----------------------------------------------------------------------------- MLX side
def as_blocks(blocks: mx.array, block_bytes: int, name: str) -> mx.array:
    """``uint8 [..., n * block_bytes]`` -> ``[..., n, block_bytes]``."""
    if blocks.dtype != mx.uint8:
        raise BlockShapeError(f"{name}: expected uint8 bytes, got {blocks.dtype}")
    if blocks.ndim == 0 or blocks.shape[-1] % block_bytes:
        raise BlockShapeError(
            f"{name}: last dimension {blocks.shape[-1] if blocks.ndim else None} is not a "
            f"multiple of the block size {block_bytes} bytes"
        )
    return blocks.reshape(*blocks.shape[:-1], blocks.shape[-1] // block_bytes, block_bytes)


def flat_values(values: mx.array) -> mx.array:
    """Merge the last two dimensions: ``[..., a, b]`` -> ``[..., a·b]``."""
    return values.reshape(*values.shape[:-2], -1) if values.ndim >= 2 else values


def field_f16(b: mx.array, start: int) -> mx.array:
    """The little-endian fp16 at byte ``start`` of each block, as float32 ``[..., n, 1]``."""
    return mx.view(b[..., start:start + 2], mx.float16).astype(mx.float32)


def bits(x: mx.array, shift: int | mx.array, mask: int) -> mx.array:
    """``(x >> shift) & mask`` for unsigned integer arrays."""
    return mx.bitwise_and(mx.right_shift(x, shift), mask)


# ----------------------------------------------------------------------------- numpy side
def np_blocks(x: np.ndarray, block_size: int, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """float ``[..., n]`` -> float32 ``[n_total_blocks, block_size]`` and the leading shape."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % block_size:
        raise BlockShapeError(
            f"{name}: row length {x.shape[-1] if x.ndim else None} is not a multiple of {block_size}"
        )
    return x.reshape(-1, block_size), x.shape[:-1]


def np_importance(weights: np.ndarray | None, x_shape: tuple[int, ...], block_size: int,
                  name: str) -> np.ndarray | None:
    """Importance weights broadcast to ``x`` (e.g. an imatrix of shape ``[n]``), as blocks."""
    if weights is None:
        return None
    given = np.asarray(weights, dtype=np.float32)
    w = np.broadcast_to(given, x_shape)
    if not np.all(np.isfinite(given)) or np.any(given < 0):  # (before broadcasting: a row, not the matrix)
        raise ValueError(f"{name}: importance weights must be finite and non-negative")
    return np.ascontiguousarray(w).reshape(-1, block_size)


def np_out(packed: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    """``uint8 [n_total_blocks, block_bytes]`` -> ``[..., n_blocks * block_bytes]``."""
    return np.ascontiguousarray(packed, dtype=np.uint8).reshape(*lead, -1)


def np_out_rows(out: np.ndarray | None, n: int, block_bytes: int) -> np.ndarray:
    """``out`` (checked: C-contiguous uint8 ``[n, block_bytes]``, what a compiled quantizer
    writes into), or a new one."""
    if out is None:
        return np.empty((n, block_bytes), dtype=np.uint8)
    if out.shape != (n, block_bytes) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"output rows {out.shape} {out.dtype} are not C-contiguous uint8 [{n}, {block_bytes}]")
    return out


def np_f16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 ``[N]`` -> fp16 little-endian bytes ``[N, 2]``."""
    return np.ascontiguousarray(v, dtype="<f2").reshape(-1, 1).view(np.uint8)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C ``roundf``, what ggml's ``nearest_int`` mimics)."""
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _lsq_scale_min(q: np.ndarray, w: np.ndarray, wx: np.ndarray, sw: np.ndarray, sx: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares ``x ≈ scale·q + b`` with ``b ≤ 0`` for codes ``q [C, N, n]``.

    ``w``, ``wx``: the weights and ``w·x``, ``[N, n]``; ``sw``, ``sx``: their row sums.
    Returns ``scale``, ``b`` and the error without its constant ``Σ w x²``, each ``[C, N]`` float64.
    The big sums are float32 ``einsum`` passes; the small per-row algebra is float64 because the
    error is a difference of these sums.
    """
    sl = np.einsum("cnk,nk->cn", q, w).astype(np.float64)
    sxl = np.einsum("cnk,nk->cn", q, wx).astype(np.float64)
    sl2 = np.einsum("cnk,nk->cn", q * q, w).astype(np.float64)
    det = sw * sl2 - sl * sl
    ok = det > 0
    safe = np.where(ok, det, 1.0)
    scale = np.where(ok, (sw * sxl - sx * sl) / safe, 0.0)
    b = np.where(ok, (sl2 * sx - sl * sxl) / safe, 0.0)
    # m must be ≥ 0 (b ≤ 0): otherwise refit the scale alone through the origin
    pos = b > 0
    scale = np.where(pos, np.where(sl2 > 0, sxl / np.where(sl2 > 0, sl2, 1.0), 0.0), scale)
    b = np.where(pos, 0.0, b)
    scale = np.maximum(scale, 0.0)
    # Σ w (scale·q + b − x)² − Σ w x², expanded
    err = scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx
    return scale, b, err


def _fit_inputs(x: np.ndarray, w: np.ndarray):
    """``w·x``, the row minimum (at most 0), span, ``Σ w`` and ``Σ w·x`` of rows ``x``, ``w``."""
    lo = np.minimum(x.min(axis=1), 0.0)
    span = x.max(axis=1) - lo
    sw = w.sum(axis=1, dtype=np.float64)
    wx = w * x
    return wx, lo, span, sw, wx.sum(axis=1, dtype=np.float64)


def _search_scale_min(x, w, wx, lo, span, sw, sx, nmax: int, steps: np.ndarray, refine: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The search of :func:`fit_scale_min` in numpy: ``scale``, ``b`` per row, float64."""
    iscale = (steps[:, None] / span[None, :]).astype(np.float32)  # [C, N]
    # x − lo ≥ 0; rint's ties-to-even only differs from ggml's rounding on exact ties, which
    # does not matter for choosing a candidate (the final codes are rounded by requantize_codes)
    q = np.multiply(iscale[..., None], (x - lo[:, None])[None])
    np.rint(q, out=q)
    np.clip(q, 0, nmax, out=q)
    scale, b, err = _lsq_scale_min(q, w, wx, sw, sx)
    # the first candidate keeps the plain min/max fit as a fallback
    scale[0] = span / nmax
    b[0] = lo
    err[0] = _lsq_err(q[0], w, wx, sw, sx, scale[0], b[0])
    best = np.argmin(err, axis=0)
    rows = np.arange(x.shape[0])
    scale, b, err = scale[best, rows], b[best, rows], err[best, rows]

    for _ in range(refine):
        safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.subtract(x, b[:, None].astype(np.float32))
        q /= safe[:, None]
        np.rint(q, out=q)
        np.clip(q, 0, nmax, out=q)
        ns, nb, ne = (v[0] for v in _lsq_scale_min(q[None], w, wx, sw, sx))
        better = (ne < err) & (scale > 0)
        scale, b, err = np.where(better, ns, scale), np.where(better, nb, b), np.where(better, ne, err)

    return scale, b


def search_steps(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """The candidate inverse-scale numerators of :func:`fit_scale_min`: the plain min/max fit
    first, then the sweep (float64)."""
    return np.concatenate([[float(nmax)], nmax + rmin + rdelta * np.arange(nstep + 1)])


def fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                  nstep: int, refine: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Best ``x ≈ scale·q − m`` with integer ``q ∈ [0, nmax]``, ``scale ≥ 0``, ``m ≥ 0``, per row.

    ``x``, ``w``: float32 ``[N, n]`` (values and their error weights). Starting from the min/max
    fit, the inverse scale is swept over ``(nmax + rmin + rdelta·i) / (max − min)`` for
    ``i = 0..nstep``; for each candidate the codes are rounded and (scale, min) re-fit by weighted
    least squares, and the candidate with the lowest weighted squared error wins. The winner is
    then polished by ``refine`` rounds of "re-round the codes, re-fit", each kept only where it
    lowers the error (a coarse sweep plus polishing matches a fine sweep at a fraction of the
    cost). Rows whose minimum is positive are fit with ``m = 0``.
    Returns ``scale [N]`` and ``m [N]`` (the amount subtracted, ≥ 0).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w, dtype=np.float32)
    steps = search_steps(nmax, rmin, rdelta, nstep)
    wx, lo, span, sw, sx = _fit_inputs(x, w)
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    scale, b = _search_scale_min(x, w, wx, lo, span, sw, sx, nmax, steps, refine)
    scale = np.where(flat, 0.0, scale).astype(np.float32)
    m = np.where(flat, -lo, -b).astype(np.float32)
    return scale, m


def _lsq_err(q, w, wx, sw, sx, scale, b) -> np.ndarray:
    """``Σ w (scale·q + b − x)² − Σ w x²`` per row for codes ``q [N, n]`` and given (scale, b)."""
    sl = np.einsum("nk,nk->n", q, w).astype(np.float64)
    sxl = np.einsum("nk,nk->n", q, wx).astype(np.float64)
    sl2 = np.einsum("nk,nk->n", q * q, w).astype(np.float64)
    return scale * scale * sl2 + b * b * sw + 2 * scale * b * sl - 2 * scale * sxl - 2 * b * sx


def requantize_codes(x: np.ndarray, scale: np.ndarray, m: np.ndarray, nmax: int) -> np.ndarray:
    """Codes ``q = round((x + m) / scale)`` clipped to ``[0, nmax]`` (0 where ``scale`` is 0)."""
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
    # below zero everything clips to 0, so floor(v + 0.5) rounds half away from zero here
    q = np.add(x, m[..., None].astype(np.float32))
    q *= inv[..., None]
    q += np.float32(0.5)
    np.floor(q, out=q)
    np.clip(q, 0, nmax, out=q)
    return q.astype(np.uint8)


def importance_weights(x: np.ndarray, xb: np.ndarray, qw: np.ndarray, sigma_factor: float = 2.0) -> np.ndarray:
    """Error weight of each element of ``x`` (any view of super-blocks ``xb [N, 256]``) given the
    importance ``qw`` (an imatrix row, same shape as ``x``): ``qw·sqrt(σ² + x²)`` with σ² the
    block's mean square times ``sigma_factor``, the form llama.cpp's quantizers give their
    ``quant_weights``. llama.cpp's factor is 2 for Q4_K and 1 for Q2_K and IQ2_XXS; with our
    searches 2 gives the lower importance-weighted error for all three (measured 2–4 % lower for
    Q2_K and IQ2_XXS on skewed statistics, tests/test_gguf_quant_speed.py), so 2 is used."""
    sigma2 = (xb * xb).mean(axis=-1)
    if sigma_factor != 1.0:
        sigma2 = sigma_factor * sigma2
    return qw.reshape(x.shape) * np.sqrt(sigma2.reshape(-1, *(1,) * (x.ndim - 1)) + x * x)


def kquant_weights(sub: np.ndarray, xb: np.ndarray, qw: np.ndarray | None,
                   sigma_factor: float = 2.0) -> np.ndarray:
    """Error weight of each element of K-quant sub-blocks ``sub [N, n_sub, len]`` (``xb [N, 256]``).

    Without importance data the weight grows with ``|x|`` (large weights matter more to a
    matmul); with it, :func:`importance_weights`.
    """
    if qw is None:
        return np.sqrt((sub * sub).mean(axis=-1, keepdims=True)) + np.abs(sub)
    return importance_weights(sub, xb, qw, sigma_factor)


def _refit_sums(x: np.ndarray, w: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per sub-block Σ w q, Σ w q², Σ w q x, Σ w, Σ w x (``[N, subs]``) and per block Σ w x²
    (``[N]``), float64, for ``x``, ``w``, ``q`` ``[N, subs, n]``."""
    qf = q.astype(np.float32)
    wq = w * qf
    s_q = wq.sum(axis=2, dtype=np.float64)  # Σ w q
    s_qq = np.einsum("bji,bji->bj", wq, qf).astype(np.float64)  # Σ w q²
    s_qx = np.einsum("bji,bji->bj", wq, x).astype(np.float64)  # Σ w q x
    s_w = w.sum(axis=2, dtype=np.float64)
    s_x = np.einsum("bji,bji->bj", w, x).astype(np.float64)
    s_xx = np.einsum("bji,bji,bji->b", w, x, x).astype(np.float64)
    return s_q, s_qq, s_qx, s_w, s_x, s_xx


def refit_super_scales(x: np.ndarray, w: np.ndarray, q: np.ndarray, ls: np.ndarray, lm: np.ndarray,
                       d: np.ndarray, dmin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-fit the fp16 super-scales of a K-quant with the codes and sub-block scales fixed.

    Model ``x[b, j, i] ≈ d[b]·ls[b, j]·q[b, j, i] − dmin[b]·lm[b, j]``; the weighted least-squares
    ``(d, dmin)`` (rounded to fp16) replace the current ones only where they lower the error.
    """
    # per sub-block sums, then the sub-block scales fold in on the small arrays
    s_q, s_qq, s_qx, s_w, s_x, s_xx = _refit_sums(x, w, q)
    ls, lm = ls.astype(np.float64), lm.astype(np.float64)
    saa = (ls * ls * s_qq).sum(axis=1)
    scc = (lm * lm * s_w).sum(axis=1)
    sac = (ls * lm * s_q).sum(axis=1)
    sax = (ls * s_qx).sum(axis=1)
    scx = (lm * s_x).sum(axis=1)
    # normal equations of x ≈ d·a − e·c
    det = saa * scc - sac * sac
    ok = det > 1e-30 * np.maximum(saa * scc, 1e-30)
    safe = np.where(ok, det, 1.0)
    nd = (sax * scc - scx * sac) / safe
    ne = (sax * sac - scx * saa) / safe
    # no mins in use: fit d alone
    only_d = ~ok & (saa > 0)
    nd = np.where(only_d, sax / np.where(saa > 0, saa, 1.0), nd)
    ne = np.where(only_d, dmin, ne)
    nd = np.clip(nd, 0, 65504.0).astype(np.float16).astype(np.float32)
    ne = np.clip(ne, 0, 65504.0).astype(np.float16).astype(np.float32)

    def err(dd, ee):  # Σ w (d·a − e·c − x)², expanded
        dd, ee = dd.astype(np.float64), ee.astype(np.float64)
        return (dd * dd * saa + ee * ee * scc + s_xx - 2 * dd * ee * sac - 2 * dd * sax
                + 2 * ee * scx)

    better = (ok | only_d) & (err(nd, ne) < err(d, dmin))
    return np.where(better, nd, d), np.where(better, ne, dmin)


def quantize_in_chunks(x: np.ndarray, weights: np.ndarray | None, block_size: int, name: str,
                       chunk_blocks: int, quantize_chunk, block_bytes: int | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
    """Run ``quantize_chunk(blocks, importance)`` over batches of ``chunk_blocks`` blocks of ``x``
    (bounds the temporaries) and reassemble the bytes with ``x``'s leading shape. With
    ``block_bytes``, ``quantize_chunk(blocks, importance, out)`` writes each batch into its rows of
    one output instead (no second pass to reassemble them: 6-15 % of a compiled K-quant's time).
    ``out``: the bytes go there (C-contiguous uint8 ``[..., n_blocks * block_bytes]``) and it is
    returned (a conversion's reused buffers: no fresh pages per call)."""
    xb, lead = np_blocks(x, block_size, name)
    qw = np_importance(weights, np.shape(x), block_size, name)
    if block_bytes is not None:
        if out is None:
            packed = np.empty((xb.shape[0], block_bytes), dtype=np.uint8)
        else:
            _check_out(out, (*lead, np.shape(x)[-1] // block_size * block_bytes), name)
            packed = out.reshape(-1, block_bytes)
        for i in range(0, xb.shape[0], chunk_blocks):
            quantize_chunk(xb[i:i + chunk_blocks], None if qw is None else qw[i:i + chunk_blocks],
                           packed[i:i + chunk_blocks])
        return np_out(packed, lead) if out is None else out
    parts = [
        quantize_chunk(xb[i:i + chunk_blocks], None if qw is None else qw[i:i + chunk_blocks])
        for i in range(0, xb.shape[0], chunk_blocks)
    ]
    packed = np_out(np.concatenate(parts, axis=0), lead)
    if out is None:
        return packed
    _check_out(out, packed.shape, name)
    out[...] = packed
    return out


def _check_out(out: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if out.shape != tuple(shape) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"{name} output {out.shape} {out.dtype} is not C-contiguous uint8 {tuple(shape)}")


def kquant_fit(xb: np.ndarray, qw: np.ndarray | None, sub_size: int, nmax: int, lmax: int,
               search: tuple[float, float, int], sigma_factor: float = 2.0):
    """The K-quant recipe shared by Q2_K and Q4_K for super-blocks ``xb [n, 256]``, in numpy:
    per sub-block a weighted least-squares (scale, min), both coded in ``lmax`` steps of fp16
    super-scales (d, dmin), which are re-fit once the codes are known.
    Returns (d, dmin, ls, lm, q) with codes q ``[n, subs, sub_size]`` in 0..nmax.
    :func:`kquant_blocks` is the same recipe, packing included, in C."""
    n = xb.shape[0]
    sub = xb.reshape(n, -1, sub_size)
    subs = sub.shape[1]
    w = kquant_weights(sub, xb, qw, sigma_factor)
    scale, m = fit_scale_min(sub.reshape(-1, sub_size), w.reshape(-1, sub_size), nmax, *search)
    scale, m = scale.reshape(n, subs), m.reshape(n, subs)
    d = (scale.max(axis=1) / lmax).astype(np.float16).astype(np.float32)
    dmin = (m.max(axis=1) / lmax).astype(np.float16).astype(np.float32)
    ls = np.clip(round_half_away(scale / np.where(d > 0, d, 1.0)[:, None]), 0, lmax)
    lm = np.clip(round_half_away(m / np.where(dmin > 0, dmin, 1.0)[:, None]), 0, lmax)
    q = requantize_codes(sub, d[:, None] * ls, dmin[:, None] * lm, nmax)
    d, dmin = refit_super_scales(sub, w, q, ls, lm, d, dmin)
    q = requantize_codes(sub, d[:, None] * ls, dmin[:, None] * lm, nmax)
    return d, dmin, ls, lm, q


# the C kernel's kind, and bytes per block (gguf-py's table)
KQUANT_KINDS = {name: (kind, GGML_QUANT_SIZES[GGMLQuantizationType[name]][1])
                for name, kind in (("Q4_K", 4), ("Q2_K", 2))}
# name -> (numpy recipe and packing of super-blocks, search): what the compiled recipe is checked
# against; q4_k and q2_k register themselves (they import this module, not the other way)
KQUANT_NUMPY: dict = {}


def kquant_blocks(lib, name: str, xb: np.ndarray, qw: np.ndarray | None, search: tuple[float, float, int],
                  refine: int = 2, sigma_factor: float = 2.0, out: np.ndarray | None = None) -> np.ndarray:
    """Super-blocks ``xb [n, 256]`` (importance ``qw`` the same shape, or None) to ``name``'s
    (Q4_K or Q2_K) bytes ``[n, block_bytes]`` (into ``out`` when given: C-contiguous uint8 of that
    shape) by the compiled ``kquant_search`` library: the numpy recipe (:func:`kquant_fit` and the
    format's packing) one block at a time, bit for bit."""
    kind, block_bytes = KQUANT_KINDS[name]
    nmax = 15 if kind == 4 else 3
    xc = np.ascontiguousarray(xb, dtype=np.float32)
    qc = None if qw is None else np.ascontiguousarray(qw, dtype=np.float32)
    steps = search_steps(nmax, *search)
    out = np_out_rows(out, xc.shape[0], block_bytes)
    lib.kquant_quantize(native.ptr(xc), None if qc is None else native.ptr(qc), ctypes.c_int64(xc.shape[0]),
                        ctypes.c_int32(kind), native.ptr(steps), ctypes.c_int32(len(steps)), ctypes.c_int32(refine),
                        ctypes.c_float(sigma_factor), native.ptr(out))
    return out


def kquant_native():
    """The compiled K-quant library, or None where it does not build or fails its check."""
    return native.load_checked("kquant_search", _check_native)


def _check_native(lib) -> bool:
    """Whether the C recipe gives the numpy path's bytes on a few hundred random super-blocks of
    both K-quants, with and without importance: a compiler or platform that rounds
    differently is caught here, and numpy is used instead."""
    rng = np.random.default_rng(0)
    xb = (rng.standard_t(3, size=(96, 256)) * 0.01).astype(np.float32)
    xb[:8] = np.abs(xb[:8])  # blocks with positive minima
    xb[8, :40] = 0.0  # flat sub-blocks
    xb[9] = 0.0
    xb[10] *= 1e5  # fp16 overflow of the super-scale
    xb[11] *= 1e-6  # subnormal super-scales
    qw = rng.gamma(0.5, size=(96, 256)).astype(np.float32)
    qw[:, ::13] = 0.0
    for name, (numpy_chunk, search) in KQUANT_NUMPY.items():
        for imp in (None, qw):
            if not np.array_equal(numpy_chunk(xb, imp), kquant_blocks(lib, name, xb, imp, search)):
                return False
    return bool(KQUANT_NUMPY)
