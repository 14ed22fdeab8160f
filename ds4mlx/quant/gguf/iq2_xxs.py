"""GGUF IQ2_XXS (type 16): 256 weights in 66 bytes, 8 groups of 32, codebook quantization.

Layout of one block::

    bytes 0..1    d    fp16 super-scale
    bytes 2..65   qs   8 groups × two little-endian uint32 words (a, b)

Group g (elements 32g..32g+31) is four runs of 8. Byte k of ``a`` indexes :data:`GRID` (256 of
the 3^8 vectors over {8, 25, 43}) for run k. Bits ``7k..7k+6`` of ``b`` index :data:`KSIGNS`, an
8-bit sign mask for run k (bit j set: negate element j); the mask has an even number of set
bits, so 7 bits name it. ``ls = b >> 28`` is the 4-bit group scale. Value::

    x = d · (0.5 + ls) · 0.25 · GRID[a_k][j] · (±1)

i.e. ``d·(2ls+1)/8 · v`` with v ∈ {±8, ±25, ±43}. Every product is exact in float32.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from . import native
from .common import (as_blocks, field_f16, flat_values, importance_weights, np_f16_bytes, np_out_rows,
                     quantize_in_chunks)

NAME = "IQ2_XXS"
GGML_TYPE = int(GGMLQuantizationType.IQ2_XXS)
BLOCK_SIZE, BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.IQ2_XXS]  # weights, bytes per block
SCALE_FIELDS = (0,)  # byte offsets of the block's fp16 scales (the load-time finite check reads them)

# The 256 codebook vectors: entry i packs eight levels, 2 bits each (element j at bits 2j),
# level 0, 1, 2 standing for the values 8, 25, 43 (ggml's iq2xxs_grid).
GRID_CODES = np.array([
    0x0000, 0x0002, 0x0005, 0x0008, 0x000a, 0x0011, 0x0014, 0x0020,
    0x0022, 0x0028, 0x002a, 0x0041, 0x0044, 0x0050, 0x0058, 0x0061,
    0x0064, 0x0080, 0x0082, 0x008a, 0x00a2, 0x0101, 0x0104, 0x0110,
    0x0115, 0x0140, 0x0184, 0x0198, 0x0200, 0x0202, 0x0222, 0x0282,
    0x0401, 0x0404, 0x0410, 0x0421, 0x0424, 0x0440, 0x0442, 0x0448,
    0x0460, 0x0481, 0x0484, 0x0490, 0x04a4, 0x0500, 0x0502, 0x0508,
    0x0520, 0x0546, 0x0569, 0x0580, 0x0591, 0x0609, 0x0610, 0x0640,
    0x0684, 0x06a4, 0x0800, 0x0805, 0x0808, 0x0814, 0x0828, 0x0841,
    0x0844, 0x0850, 0x0852, 0x0888, 0x0904, 0x0940, 0x0a02, 0x0a14,
    0x1001, 0x1004, 0x1010, 0x1021, 0x1040, 0x1060, 0x1084, 0x1090,
    0x1095, 0x1100, 0x1108, 0x1120, 0x1150, 0x115a, 0x1180, 0x1224,
    0x1245, 0x1400, 0x1408, 0x1420, 0x1425, 0x1449, 0x1480, 0x1518,
    0x1562, 0x1600, 0x1616, 0x1801, 0x1804, 0x1810, 0x1840, 0x1881,
    0x1900, 0x1905, 0x19a0, 0x1a51, 0x2000, 0x2002, 0x200a, 0x2044,
    0x2061, 0x2080, 0x2082, 0x2129, 0x2148, 0x2200, 0x2202, 0x2401,
    0x2404, 0x2410, 0x2440, 0x2456, 0x2500, 0x2541, 0x2564, 0x2690,
    0x2808, 0x2820, 0x2894, 0x2a44, 0x4001, 0x4004, 0x4010, 0x4018,
    0x4021, 0x4024, 0x4040, 0x4048, 0x4056, 0x4060, 0x4081, 0x4084,
    0x4090, 0x4100, 0x4120, 0x4161, 0x4180, 0x4185, 0x4201, 0x4210,
    0x4248, 0x4256, 0x4268, 0x4400, 0x4408, 0x4420, 0x4480, 0x4499,
    0x4512, 0x4524, 0x4600, 0x4801, 0x4804, 0x4810, 0x4840, 0x4845,
    0x4900, 0x4958, 0x4961, 0x4982, 0x4a45, 0x4a90, 0x5000, 0x5008,
    0x5011, 0x5019, 0x5020, 0x5080, 0x5088, 0x5104, 0x5142, 0x51a4,
    0x5291, 0x5490, 0x5492, 0x550a, 0x5601, 0x5654, 0x5800, 0x5811,
    0x5819, 0x5864, 0x5940, 0x5a08, 0x6004, 0x6010, 0x6040, 0x6068,
    0x6100, 0x6155, 0x6218, 0x6260, 0x6400, 0x6405, 0x6510, 0x6512,
    0x6584, 0x6842, 0x8000, 0x8002, 0x800a, 0x8041, 0x8082, 0x8104,
    0x8118, 0x8140, 0x8211, 0x8401, 0x8404, 0x8410, 0x8415, 0x8440,
    0x8460, 0x8500, 0x8546, 0x8594, 0x8609, 0x8640, 0x8660, 0x8802,
    0x8904, 0x8a11, 0x9004, 0x9010, 0x9024, 0x9040, 0x90a1, 0x9116,
    0x9180, 0x9245, 0x9400, 0x9422, 0x9444, 0x9551, 0x9881, 0x9920,
    0xa002, 0xa050, 0xa085, 0xa109, 0xa200, 0xa418, 0xa850, 0xa904,
], dtype=np.uint16)
GRID_LEVELS = np.array([8, 25, 43], dtype=np.float32)
GRID: np.ndarray = GRID_LEVELS[(GRID_CODES[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3]

# Sign masks: the 7 stored bits plus an 8th that makes the count of negated elements even.
KSIGNS: np.ndarray = np.array(
    [i | ((bin(i).count("1") & 1) << 7) for i in range(128)], dtype=np.uint8
)
SIGNS: np.ndarray = np.where((KSIGNS[:, None] >> np.arange(8)) & 1, -1.0, 1.0).astype(np.float32)

_GRID_MX = mx.array(GRID)
_SIGNS_MX = mx.array(SIGNS)


def dequantize(blocks: mx.array) -> mx.array:
    b = as_blocks(blocks, BLOCK_BYTES, NAME)
    lead = b.shape[:-1]
    d = field_f16(b, 0)
    words = mx.view(b[..., 2:], mx.uint32).reshape(*lead, 8, 2)
    sw = words[..., 1]  # [..., n, 8]
    ls = mx.right_shift(sw, 28).astype(mx.float32)
    db = (d * (0.5 + ls) * 0.25)[..., None, None]  # [..., n, 8, 1, 1]
    idx = b[..., 2:].reshape(*lead, 8, 8)[..., :4].astype(mx.uint32)  # bytes of a
    sidx = mx.bitwise_and(mx.right_shift(sw[..., None], mx.array([0, 7, 14, 21], dtype=mx.uint32)), 127)
    grid = mx.take(_GRID_MX, idx, axis=0)  # [..., n, 8, 4, 8]
    signs = mx.take(_SIGNS_MX, sidx, axis=0)
    return flat_values(flat_values(flat_values(db * grid * signs)))


# ----------------------------------------------------------------------------- quantizer
_CHUNK_BLOCKS = 256  # blocks per numpy batch: keeps the [runs, 256] cost tables in cache
_NATIVE_CHUNK_BLOCKS = 4096  # the compiled recipe keeps no batch-sized temporaries
# group scale candidates, as multiples of amax/43: around "amax on the top level", plus amax on
# the middle and bottom levels (flat groups)
_SCALE_STEPS = np.array([0.8, 1.0, 1.2, 43 / 25, 43 / 8], dtype=np.float32)
_SUPER_STEPS = np.array([1.0, 0.95], dtype=np.float32)  # super-scale candidates
_REFINE = 2  # least-squares refinements of the group scales
# cost of entry e for a run at scale s: Σ_j w_j (s·g_ej − y_j)² − Σ w y² = [−2·w·y, s·w] @ _COST_T
_COST_T = np.ascontiguousarray(np.concatenate([GRID.T, (GRID * GRID).T], axis=0))  # [16, 256]


# grid entry of each of the 3^8 level patterns (element j's level times 3^j), −1 where none
_POW3 = 3 ** np.arange(8)
_PATTERN_OF_ENTRY = (((GRID_CODES[:, None] >> (2 * np.arange(8, dtype=np.uint16))) & 3) * _POW3).sum(axis=1)
# the C search's view: the level patterns of elements 0..3 and 4..7 of each entry
_LO_PATTERN = (_PATTERN_OF_ENTRY % 81).astype(np.int32)
_HI_PATTERN = (_PATTERN_OF_ENTRY // 81).astype(np.int32)
_ENTRY_OF_PATTERN = np.full(3 ** 8, -1, dtype=np.int64)
_ENTRY_OF_PATTERN[_PATTERN_OF_ENTRY] = np.arange(256)
_ENTRY_OF_PATTERN_16 = _ENTRY_OF_PATTERN.astype(np.int16)  # the C search's copy: 13 kB, in L1
# y nearer to the middle level than to the bottom (top) one when y > s·16.5 (s·34)
_MIDPOINTS = ((GRID_LEVELS[:-1] + GRID_LEVELS[1:]) / 2).astype(np.float32)


def _ptr(a: np.ndarray, kind=ctypes.c_float):
    return a.ctypes.data_as(ctypes.POINTER(kind))


def _candidate_entries(y: np.ndarray, w: np.ndarray, s0: np.ndarray, lib=None) -> np.ndarray:
    """Per run, the best grid entry at each scale ``s0·f`` (f in ``_SCALE_STEPS``): ``[n, 8, 4, F]``.

    The cost is a sum over elements, so where every element's nearest level (and all weights
    positive) forms a grid entry, that entry is the minimum and needs no search: at the sweep's
    scales that holds for 15–100 % of the runs. The others search all 256 entries, in C
    (``native/iq2_search.c``) when it builds, else as one matrix product and one argmin per
    scale; the two round the costs differently, so only near-equal costs can choose differently.
    Everything after chooses among these few entries.
    """
    runs = y.shape[:3]
    yf = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, 8)
    wf = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 8)
    s_run = np.repeat(np.asarray(s0, dtype=np.float32).reshape(-1), 4)  # each run's group scale
    n = yf.shape[0]
    out = np.empty((n, len(_SCALE_STEPS)), dtype=np.int64)
    if lib is not None:
        lhs, rows = np.empty((n, 16), dtype=np.float32), np.empty(n, dtype=np.int64)
        lib.iq2_candidates(_ptr(yf), _ptr(wf), _ptr(s_run), ctypes.c_int64(n), _ptr(_SCALE_STEPS),
                           ctypes.c_int64(len(_SCALE_STEPS)), _ptr(GRID_LEVELS),
                           _ptr(_LO_PATTERN, ctypes.c_int32), _ptr(_HI_PATTERN, ctypes.c_int32),
                           _ptr(_ENTRY_OF_PATTERN_16, ctypes.c_int16), _ptr(lhs), _ptr(rows, ctypes.c_int64),
                           _ptr(out, ctypes.c_int64))
        return out.reshape(*runs, -1)
    wy = -2.0 * wf * yf
    searchable = np.all(wf > 0, axis=1)
    for i, f in enumerate(_SCALE_STEPS):
        s = s_run * f
        level = (yf > (s[:, None] * _MIDPOINTS[0])).astype(np.int64)
        level += yf > (s[:, None] * _MIDPOINTS[1])
        entry = _ENTRY_OF_PATTERN[level @ _POW3]
        search = np.flatnonzero((entry < 0) | ~searchable | ~(s > 0))
        if search.size:
            lhs = np.concatenate([wy[search], wf[search] * s[search, None]], axis=1)
            entry[search] = np.argmin(lhs @ _COST_T, axis=-1)  # [runs, 256] costs
        out[:, i] = entry
    return out.reshape(*runs, -1)


def _candidate_sums(wy: np.ndarray, w: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs ``[..., 8]`` and their candidate entries ``cand [..., F]``: A = Σ w·y·g and
    B = Σ w·g² of each candidate ``g``, ``[..., F]`` float32."""
    g = GRID[cand]  # [..., F, 8]
    return (np.einsum("rgkj,rgkfj->rgkf", wy, g), np.einsum("rgkj,rgkfj->rgkf", w, g * g))


def _best(s: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the candidate of least cost s²B − 2sA at group scale ``s [n, 8]`` (``ca``,
    ``cb [n, 8, 4, F]``): its index and cost, ``[n, 8, 4]``."""
    c = s[..., None, None] * (s[..., None, None] * cb - 2.0 * ca)
    k = np.argmin(c, axis=-1)
    return k, np.take_along_axis(c, k[..., None], axis=-1)[..., 0]


def _native():
    """The compiled IQ2_XXS recipe, or None. Checked against the numpy recipe (bit for bit, with
    the same candidate search) before first use."""
    if native.load("iq2_search") is None:  # (also when a caller has switched it off)
        return None
    return native.load_checked("iq2_search", _check_native)


def compiled() -> bool:
    """Whether :func:`quantize` runs the compiled recipe (which releases the GIL)."""
    return _native() is not None


def _check_native(lib) -> bool:
    rng = np.random.default_rng(0)
    xb = (rng.standard_t(3, size=(48, 256)) * 0.01).astype(np.float32)
    xb[0] = 0.0
    xb[1, ::3] = 0.0
    xb[2] *= 1e6  # the fp16 super-scale overflows
    xb[3] *= 1e-7  # subnormal super-scales
    qw = rng.gamma(0.5, size=xb.shape).astype(np.float32) + 0.05
    return all(np.array_equal(numpy_chunk(xb, imp, lib), _compiled_chunk(lib, xb, imp)) for imp in (None, qw))


def _compiled_chunk(lib, xb: np.ndarray, qw: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    xc = np.ascontiguousarray(xb, dtype=np.float32)
    qc = None if qw is None else np.ascontiguousarray(qw, dtype=np.float32)
    out = np_out_rows(out, xc.shape[0], BLOCK_BYTES)
    lib.iq2_quantize(native.ptr(xc), None if qc is None else native.ptr(qc), ctypes.c_int64(xc.shape[0]),
                     _ptr(_SCALE_STEPS), ctypes.c_int32(len(_SCALE_STEPS)), _ptr(_SUPER_STEPS),
                     ctypes.c_int32(len(_SUPER_STEPS)), ctypes.c_int32(_REFINE), _ptr(GRID_LEVELS),
                     _ptr(_LO_PATTERN, ctypes.c_int32), _ptr(_HI_PATTERN, ctypes.c_int32),
                     _ptr(_ENTRY_OF_PATTERN_16, ctypes.c_int16), _ptr(GRID), native.ptr(out))
    return out


def _quantize_chunk(xb: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    lib = _native()
    return numpy_chunk(xb, qw, native.load("iq2_search")) if lib is None else _compiled_chunk(lib, xb, qw)


def numpy_chunk(xb: np.ndarray, qw: np.ndarray | None, search_lib=None) -> np.ndarray:
    """The numpy recipe for super-blocks ``xb [n, 256]`` (the compiled one's reference); the
    256-entry search in C when ``search_lib`` is the compiled library."""
    n = xb.shape[0]
    x = xb.reshape(n, 8, 4, 8)
    if qw is None:
        w = np.sqrt((x * x).mean(axis=(2, 3), keepdims=True)) + np.abs(x)
    else:
        w = importance_weights(x, xb, qw)

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
    cand = _candidate_entries(y, w, s0, search_lib)  # [n, 8, 4, F]
    ca, cb = _candidate_sums(w * y, w, cand)

    def best(s):  # per run, the candidate with the lowest cost s²B − 2sA at group scale s [n, 8]
        return _best(s, ca, cb)
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


def quantize(x: np.ndarray, weights: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``[..., n]`` (n a multiple of 256) -> IQ2_XXS bytes.

    Per run of 8 the signs are fixed first (parity-corrected), then each group's scale is
    searched over a sweep and refined by least squares, choosing for every run the codebook
    entry with the lowest weighted error at that scale (among the entries that win a full
    256-entry search at one of the sweep scales); finally the fp16 super-scale and the
    4-bit group scales are chosen among a few candidates by total error.
    ``weights``: optional importance, broadcast to ``x`` (e.g. an imatrix ``[n]``), weighted
    as ``common.importance_weights``. ``out``: the bytes go there (C-contiguous uint8
    ``[..., n // 256 * 66]``) and it is returned.
    """
    lib = _native()
    if lib is None:
        return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _CHUNK_BLOCKS, _quantize_chunk, out=out)
    return quantize_in_chunks(x, weights, BLOCK_SIZE, NAME, _NATIVE_CHUNK_BLOCKS,
                              lambda xb, qw, rows: _compiled_chunk(lib, xb, qw, rows), block_bytes=BLOCK_BYTES,
                              out=out)
