"""The numpy GGUF quantizers as they were before the faster versions in ``ds4mlx.quant.gguf``
(commit 647e5a9), kept verbatim as the reference the new ones must match byte for byte
(``tests/test_gguf_quant_speed.py``) and as the "before" side of ``scripts/bench_quantizers.py``.
Only the packing helpers, which did not change, are imported from the package.
"""

from __future__ import annotations

import numpy as np

from ds4mlx.quant.codecs import E2M1_MAGNITUDES, E2M1_MAX, E2M1_TABLE
from ds4mlx.quant.gguf.common import np_blocks, np_f16_bytes, np_importance, np_out
from ds4mlx.quant.gguf.iq2_xxs import GRID
from ds4mlx.quant.gguf.q4_k import pack_scale_min


# ----------------------------------------------------------------------------- common.py
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


def fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                  nstep: int, refine: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The numpy (scale, min) search that ``ds4mlx.quant.gguf.common.fit_scale_min`` keeps bit
    for bit (its docstring states the search); kept here as the reference its C kernel and its
    vectorised form are checked against."""
    x = x.astype(np.float32, copy=False)
    w = w.astype(np.float32, copy=False)
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    sw = w.sum(axis=1, dtype=np.float64)
    wx = w * x
    sx = wx.sum(axis=1, dtype=np.float64)

    # candidate inverse scales: the plain min/max fit first, then the sweep
    steps = np.concatenate([[float(nmax)], nmax + rmin + rdelta * np.arange(nstep + 1)])
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


def kquant_weights(sub: np.ndarray, xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Error weight of each element of K-quant sub-blocks ``sub [N, n_sub, len]`` (``xb [N, 256]``).

    Without importance data the weight grows with ``|x|`` (large weights matter more to a
    matmul); with it, ``qw·sqrt(σ² + x²)`` where σ² is twice the block's mean square.
    """
    if qw is None:
        return np.sqrt((sub * sub).mean(axis=-1, keepdims=True)) + np.abs(sub)
    sigma2 = 2.0 * (xb * xb).mean(axis=-1)[:, None, None]
    return qw.reshape(sub.shape) * np.sqrt(sigma2 + sub * sub)


def refit_super_scales(x: np.ndarray, w: np.ndarray, q: np.ndarray, ls: np.ndarray, lm: np.ndarray,
                       d: np.ndarray, dmin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Re-fit the fp16 super-scales of a K-quant with the codes and sub-block scales fixed.

    Model ``x[b, j, i] ≈ d[b]·ls[b, j]·q[b, j, i] − dmin[b]·lm[b, j]``; the weighted least-squares
    ``(d, dmin)`` (rounded to fp16) replace the current ones only where they lower the error.
    """
    # per sub-block sums, then the sub-block scales fold in on the small arrays
    qf = q.astype(np.float32)
    wq = w * qf
    s_q = wq.sum(axis=2, dtype=np.float64)  # Σ w q
    s_qq = np.einsum("bji,bji->bj", wq, qf).astype(np.float64)  # Σ w q²
    s_qx = np.einsum("bji,bji->bj", wq, x).astype(np.float64)  # Σ w q x
    s_w = w.sum(axis=2, dtype=np.float64)
    s_x = np.einsum("bji,bji->bj", w, x).astype(np.float64)
    s_xx = np.einsum("bji,bji,bji->b", w, x, x).astype(np.float64)
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
                       chunk_blocks: int, quantize_chunk) -> np.ndarray:
    """Run ``quantize_chunk(blocks, importance)`` over batches of ``chunk_blocks`` blocks of ``x``
    (bounds the temporaries) and reassemble the bytes with ``x``'s leading shape."""
    xb, lead = np_blocks(x, block_size, name)
    qw = np_importance(weights, np.shape(x), block_size, name)
    out = [
        quantize_chunk(xb[i:i + chunk_blocks], None if qw is None else qw[i:i + chunk_blocks])
        for i in range(0, xb.shape[0], chunk_blocks)
    ]
    return np_out(np.concatenate(out, axis=0), lead)


def kquant_fit(xb: np.ndarray, qw: np.ndarray | None, sub_size: int, nmax: int, lmax: int,
               search: tuple[float, float, int]):
    """The K-quant recipe shared by Q2_K and Q4_K for super-blocks ``xb [n, 256]``:
    per sub-block a weighted least-squares (scale, min), both coded in ``lmax`` steps of fp16
    super-scales (d, dmin), which are re-fit once the codes are known.
    Returns (d, dmin, ls, lm, q) with codes q ``[n, subs, sub_size]`` in 0..nmax."""
    n = xb.shape[0]
    sub = xb.reshape(n, -1, sub_size)
    subs = sub.shape[1]
    w = kquant_weights(sub, xb, qw)
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


# ----------------------------------------------------------------------------- q4_k.py
def _q4_k_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = xb.shape[0]
    d, dmin, ls, lm, q = kquant_fit(xb, qw, 32, 15, 63, (-1.0, 0.5, 4))
    qs = q.reshape(n, 4, 2, 32)
    qs = qs[:, :, 0, :] | (qs[:, :, 1, :] << 4)
    return np.concatenate([np_f16_bytes(d), np_f16_bytes(dmin), pack_scale_min(ls, lm),
                           qs.reshape(n, 128)], axis=1)


def quantize_q4_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return quantize_in_chunks(x, weights, 256, "Q4_K", 512, _q4_k_chunk)


# ----------------------------------------------------------------------------- q2_k.py
def _q2_k_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = xb.shape[0]
    d, dmin, ls, lm, q = kquant_fit(xb, qw, 16, 3, 15, (-0.5, 0.5, 2))
    q = q.reshape(n, 2, 4, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    scales = (ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)).astype(np.uint8)
    return np.concatenate([scales, qs.reshape(n, 64), np_f16_bytes(d), np_f16_bytes(dmin)], axis=1)


def quantize_q2_k(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return quantize_in_chunks(x, weights, 256, "Q2_K", 512, _q2_k_chunk)


# ----------------------------------------------------------------------------- iq2_xxs.py
_SCALE_STEPS = np.array([0.8, 1.0, 1.2, 43 / 25, 43 / 8], dtype=np.float32)
_SUPER_STEPS = np.array([1.0, 0.95], dtype=np.float32)  # super-scale candidates
_REFINE = 2  # least-squares refinements of the group scales
# cost of entry e for a run at scale s: Σ_j w_j (s·g_ej − y_j)² − Σ w y² = [−2·w·y, s·w] @ _COST_T
_COST_T = np.ascontiguousarray(np.concatenate([GRID.T, (GRID * GRID).T], axis=0))  # [16, 256]


def _candidate_entries(y: np.ndarray, w: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """Per run, the best grid entry at each scale ``s0·f`` (f in ``_SCALE_STEPS``): ``[n, 8, 4, F]``.

    Searching all 256 entries is the expensive part, so it happens only here, one matrix product
    and one argmin per scale; everything after chooses among these few entries.
    """
    runs = y.shape[:3]
    lhs = np.empty((*runs, 16), dtype=np.float32)
    lhs[..., :8] = -2.0 * w * y
    out = []
    for f in _SCALE_STEPS:
        lhs[..., 8:] = w * (s0 * f)[..., None, None]
        cost = lhs.reshape(-1, 16) @ _COST_T  # [runs, 256]
        out.append(np.argmin(cost, axis=-1).reshape(runs))
    return np.stack(out, axis=-1)


def _quantize_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    n = xb.shape[0]
    x = xb.reshape(n, 8, 4, 8)
    if qw is None:
        w = np.sqrt((x * x).mean(axis=(2, 3), keepdims=True)) + np.abs(x)
    else:
        sigma2 = 2.0 * (xb * xb).mean(axis=-1)[:, None, None, None]
        w = qw.reshape(x.shape) * np.sqrt(sigma2 + x * x)

    # Signs: the mask must have even parity, so in an odd run the element that costs least
    # (smallest w·x²) keeps the wrong sign; in the mask's frame its target is −|x|.
    neg = x < 0
    odd = (neg.sum(axis=-1) & 1).astype(bool)
    cheapest = np.argmin(w * x * x, axis=-1)
    flip = odd[..., None] & (np.arange(8) == cheapest[..., None])
    neg = neg ^ flip
    y = np.where(flip, -np.abs(x), np.abs(x))
    mask = (neg.astype(np.uint32) << np.arange(8, dtype=np.uint32)).sum(axis=-1)  # [n, 8, 4]

    # the few entries worth considering per run, and their sums A = Σ w y g, B = Σ w g²
    s0 = y.max(axis=(2, 3)) / 43.0  # [n, 8]
    cand = _candidate_entries(y, w, s0)  # [n, 8, 4, F]
    g = GRID[cand]  # [n, 8, 4, F, 8]
    ca = np.einsum("rgkj,rgkfj->rgkf", w * y, g)
    cb = np.einsum("rgkj,rgkfj->rgkf", w, g * g)

    def best(s):  # per run, the candidate with the lowest cost s²B − 2sA at group scale s [n, 8]
        c = s[..., None, None] * (s[..., None, None] * cb - 2.0 * ca)
        k = np.argmin(c, axis=-1)
        return k, np.take_along_axis(c, k[..., None], axis=-1)[..., 0]

    # group scale: the best of the sweep, then least-squares refinements
    costs = np.stack([best(s0 * f)[1].sum(axis=-1) for f in _SCALE_STEPS])  # [F, n, 8]
    s = s0 * _SCALE_STEPS[np.argmin(costs, axis=0)]
    for _ in range(_REFINE):
        k, _ = best(s)
        sa = np.take_along_axis(ca, k[..., None], axis=-1)[..., 0].sum(axis=-1)
        sb = np.take_along_axis(cb, k[..., None], axis=-1)[..., 0].sum(axis=-1)
        s = np.where(sb > 0, np.maximum(sa, 0.0) / np.where(sb > 0, sb, 1.0), 0.0)

    # super-scale D (fp16) and 4-bit group scales: s ≈ D·(2ls+1)/8; keep the best D candidate
    dmax = s.max(axis=1) * 8.0 / 31.0
    best_d = None
    for f in _SUPER_STEPS:
        dd = (dmax * f).astype(np.float16).astype(np.float32)
        safe = np.where(dd > 0, dd, 1.0)[:, None]
        ls = np.clip(np.floor((8.0 * s / safe - 1.0) / 2.0 + 0.5), 0, 15)
        k, cost = best(dd[:, None] * (2.0 * ls + 1.0) / 8.0)
        total = cost.sum(axis=(1, 2))
        if best_d is None:
            best_d = [total, dd, ls, k]
        else:
            better = total < best_d[0]
            best_d[0] = np.where(better, total, best_d[0])
            best_d[1] = np.where(better, dd, best_d[1])
            best_d[2] = np.where(better[:, None], ls, best_d[2])
            best_d[3] = np.where(better[:, None, None], k, best_d[3])
    _, dd, ls, k = best_d
    idx = np.take_along_axis(cand, k[..., None], axis=-1)[..., 0]

    words_a = (idx.astype(np.uint32) << (8 * np.arange(4, dtype=np.uint32))).sum(axis=-1)
    sign7 = (mask & 127).astype(np.uint32)
    words_b = (sign7 << (7 * np.arange(4, dtype=np.uint32))).sum(axis=-1) | (ls.astype(np.uint32) << 28)
    words = np.stack([words_a, words_b], axis=-1).astype("<u4").reshape(n, 16)
    return np.concatenate([np_f16_bytes(dd), words.view(np.uint8)], axis=1)


def quantize_iq2_xxs(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    return quantize_in_chunks(x, weights, 256, "IQ2_XXS", 256, _quantize_chunk)


# ----------------------------------------------------------------------------- codecs.py, mxfp4.py
def _nearest_even(grid: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Index of the nearest value of the increasing ``grid`` (consecutive codes 0, 1, ...) to
    each ``mag`` in ``[0, grid[-1]]``; an exact midpoint goes to the even index. Compares with
    the midpoints themselves, which are exact in float32 for these few-bit grids."""
    mid = (grid[1:] + grid[:-1]) / 2
    k = np.searchsorted(mid, mag, side="left")  # a tie lands on the lower index here...
    tie = mag == mid[np.minimum(k, len(mid) - 1)]
    return np.where(tie & (k % 2 == 1), k + 1, k)  # ...and goes to the even one


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """Nearest E2M1 code (0..15) of each float32 value: ties to even, saturating at ±6. Values
    that round to zero take code 0 (+0) whatever their sign, as ggml and DeepSeek's packers do;
    NaN has no code and saturates."""
    x = np.asarray(x, dtype=np.float32)
    k = _nearest_even(E2M1_MAGNITUDES, np.minimum(np.abs(x), E2M1_MAX)).astype(np.uint8)
    return k | np.where((x < 0) & (k > 0), 8, 0).astype(np.uint8)


def quantize_mxfp4(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 32) -> MXFP4 bytes.

    Each block tries the two exponents around its largest magnitude (``amax/2^(e−127)`` in
    [4, 8), which may saturate at 6, or in [2, 4)) and keeps the one with the lower (weighted)
    squared error. ``weights``: optional importance, broadcast to ``x``.
    """
    xb, lead = np_blocks(x, 32, "MXFP4")
    qw = np_importance(weights, np.shape(x), 32, "MXFP4")
    w = np.ones_like(xb) if qw is None else qw
    amax = np.abs(xb).max(axis=1)
    with np.errstate(divide="ignore"):
        e0 = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2 + 127, 0)
    best_err = np.full(xb.shape[0], np.inf)
    best_codes = np.zeros(xb.shape, dtype=np.uint8)
    best_e = np.zeros(xb.shape[0], dtype=np.uint8)
    for de in (0, 1):
        e = np.clip(e0 + de, 0, 254)
        scale = np.exp2(e - 127.0)
        codes = e2m1_encode(xb / scale[:, None]); coded = E2M1_TABLE[codes]
        err = (w * (coded * scale[:, None] - xb) ** 2).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_codes = np.where(better[:, None], codes, best_codes)
        best_e = np.where(better, e, best_e).astype(np.uint8)
    qs = best_codes[:, :16] | (best_codes[:, 16:] << 4)
    return np_out(np.concatenate([best_e[:, None], qs], axis=1), lead)


QUANTIZE = {"Q4_K": quantize_q4_k, "Q2_K": quantize_q2_k, "IQ2_XXS": quantize_iq2_xxs, "MXFP4": quantize_mxfp4}
