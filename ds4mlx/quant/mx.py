"""The official checkpoint's quantised formats and their exact MLX views.

Official DeepSeek V4 Flash weights (the bit rules of the codes are in ``codecs.py``):

* dense FP8: E4M3 codes ``q[out, in]`` (uint8) and one E8M0 scale byte per 128×128 block,
  ``s[ceil(out/128), ceil(in/128)]``: ``W[r, c] = e4m3(q[r, c]) · 2^(s[r//128, c//128] − 127)``;
* routed-expert FP4: two E2M1 codes per byte ``p[out, in/2]`` (low nibble = even column) and one
  E8M0 byte per 32 inputs of a row, ``s[out, in/32]``: ``W[r, c] = e2m1(code[r, c]) · 2^(s[r, c//32] − 127)``.

MLX's ``mxfp8`` / ``mxfp4`` modes (group 32, uint8 E8M0 scales) hold exactly these codes, so the
conversion copies the bytes: the codes are reinterpreted as uint32 words and, for FP8, each block
scale is repeated over its 128 rows and four 32-column groups. The numpy dequantizers below are
written from the format definition and are the reference the MLX views are tested against.
"""

from __future__ import annotations

import numpy as np

from .codecs import E2M1_TABLE, E4M3_TABLE, FP8_WEIGHT_BLOCK, MX_GROUP, e4m3_decode, e8m0_decode


class QuantFormatError(ValueError):
    """Packed weight and scale arrays do not fit the format."""


def fp8_scale_shape(out_dim: int, in_dim: int) -> tuple[int, int]:
    """Shape of the E8M0 block scales of an FP8 ``[out, in]`` weight (ragged edges round up)."""
    return (-(-out_dim // FP8_WEIGHT_BLOCK), -(-in_dim // FP8_WEIGHT_BLOCK))


def official_shapes(storage: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """``(stored weight shape, scale shape or None)`` of a tensor of logical ``shape`` held as
    ``storage`` (``fp8``, ``fp4``, or an unquantised dtype) in an official checkpoint."""
    shape = tuple(shape)
    if storage == "fp8":
        return shape, fp8_scale_shape(*shape)
    if storage == "fp4":  # two codes per byte, one scale per 32 inputs
        return shape[:-1] + (shape[-1] // 2,), shape[:-1] + (shape[-1] // MX_GROUP,)
    return shape, None


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """E2M1 codes ``[..., in]`` -> official packed bytes ``[..., in/2]`` as int8 (low nibble = even column)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        raise QuantFormatError(f"FP4 packing needs an even row length, got {codes.shape[-1]}")
    packed = (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)
    return packed.astype(np.uint8).view(np.int8)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """Official packed bytes ``[..., in/2]`` -> E2M1 codes ``[..., in]`` (uint8)."""
    p = np.asarray(packed).view(np.uint8)
    codes = np.empty(p.shape[:-1] + (2 * p.shape[-1],), dtype=np.uint8)
    codes[..., 0::2] = p & 0xF
    codes[..., 1::2] = p >> 4
    return codes


# --- reference dequantizers (numpy, from the format definition) -----------------------------


def _check_fp8(weight: np.ndarray, scale: np.ndarray, name: str) -> tuple[int, int]:
    if weight.ndim != 2:
        raise QuantFormatError(f"{name}: FP8 weight must be 2-D, got shape {weight.shape}")
    out_dim, in_dim = weight.shape
    want = fp8_scale_shape(out_dim, in_dim)
    if tuple(scale.shape) != want:
        raise QuantFormatError(
            f"{name}: FP8 scale shape {tuple(scale.shape)} does not match weight {weight.shape} "
            f"(expected {want} for {FP8_WEIGHT_BLOCK}×{FP8_WEIGHT_BLOCK} blocks)"
        )
    return out_dim, in_dim


def _check_fp4(weight: np.ndarray, scale: np.ndarray, name: str) -> None:
    if weight.ndim < 2 or weight.shape[:-1] != scale.shape[:-1] or scale.shape[-1] * 16 != weight.shape[-1]:
        raise QuantFormatError(
            f"{name}: FP4 weight {weight.shape} (two codes per byte) and scale {scale.shape} "
            f"(one per {MX_GROUP} inputs) do not match"
        )


def dequant_fp8_np(weight: np.ndarray, scale: np.ndarray, name: str = "weight", *,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``W[r, c] = e4m3(q[r, c]) · e8m0(s[r // 128, c // 128])`` in float32 (into ``out``, a
    C-contiguous float32 array of that shape, where given and compiled: reused memory)."""
    weight, scale = np.asarray(weight), np.asarray(scale)
    _check_fp8(weight, scale, name)
    lib = _fp4_native()  # the library has both decoders
    if lib is not None:
        return _fp8_compiled(lib, weight, scale, out=out)
    return _fp8_numpy(weight, scale)


def _fp8_numpy(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    out_dim, in_dim = weight.shape
    s = e8m0_decode(scale)
    values = e4m3_decode(weight.view(np.uint8))
    b = FP8_WEIGHT_BLOCK
    if out_dim % b == 0 and in_dim % b == 0:  # whole blocks: scale each in place (same products)
        values.reshape(out_dim // b, b, in_dim // b, b)[...] *= s[:, None, :, None]
        return values
    s_full = s[np.arange(out_dim)[:, None] // b, np.arange(in_dim)[None, :] // b]
    return values * s_full


# packed FP4 byte -> its two values (element 2j in the low nibble, 2j+1 in the high one)
_FP4_PAIRS = np.stack([E2M1_TABLE[np.arange(256) & 0xF], E2M1_TABLE[np.arange(256) >> 4]], axis=1)


_E8M0_VALUES = e8m0_decode(np.arange(256, dtype=np.uint8))


def dequant_fp4_np(weight: np.ndarray, scale: np.ndarray, name: str = "weight", *,
                   out: np.ndarray | None = None) -> np.ndarray:
    """``W[..., r, c] = e2m1(code[..., r, c]) · e8m0(s[..., r, c // 32])`` in float32 (in C
    where the compiled decoder builds: the same products, one pass instead of four; into
    ``out``, a C-contiguous float32 array of that shape, where given: reused memory)."""
    weight, scale = np.asarray(weight), np.asarray(scale)
    _check_fp4(weight, scale, name)
    lib = _fp4_native()
    if lib is not None:
        return _fp4_compiled(lib, weight, scale, out=out)
    return _fp4_numpy(weight, scale)


def _fp4_numpy(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    # one table look-up per packed byte gives both of its values (low nibble first), and the
    # scale multiplies each group of 32 in place: the same products, a third of the passes
    values = np.take(_FP4_PAIRS, weight.view(np.uint8), axis=0)
    groups = values.reshape(*scale.shape, MX_GROUP)
    groups *= e8m0_decode(scale)[..., None]
    return values.reshape(*weight.shape[:-1], 2 * weight.shape[-1])


def _fp4_compiled(lib, weight: np.ndarray, scale: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    import ctypes

    from .gguf import native

    codes = np.ascontiguousarray(weight).view(np.uint8)
    sc = np.ascontiguousarray(scale, dtype=np.uint8)
    out = _output(out, (*weight.shape[:-1], 2 * weight.shape[-1]))
    lib.fp4_decode(native.ptr(codes), native.ptr(sc), ctypes.c_int64(sc.size), native.ptr(_FP4_PAIRS),
                   native.ptr(_E8M0_VALUES), native.ptr(out))
    return out


def _fp8_compiled(lib, weight: np.ndarray, scale: np.ndarray, block: int = FP8_WEIGHT_BLOCK,
                  out: np.ndarray | None = None) -> np.ndarray:
    import ctypes

    from .gguf import native

    codes = np.ascontiguousarray(weight).view(np.uint8)
    sc = np.ascontiguousarray(scale).view(np.uint8)
    out = _output(out, codes.shape)
    lib.fp8_decode(native.ptr(codes), native.ptr(sc), ctypes.c_int64(codes.shape[0]), ctypes.c_int64(codes.shape[1]),
                   ctypes.c_int64(block), native.ptr(E4M3_TABLE), native.ptr(_E8M0_VALUES),
                   native.ptr(out))
    return out


def _output(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if out.shape != tuple(shape) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"decoder output {out.shape} {out.dtype} is not C-contiguous float32 {tuple(shape)}")
    return out


def _fp4_native():
    """The compiled FP4 decoder (``quant/gguf/native/fp4_decode.c``), checked against numpy on
    every code and scale byte at first use; None without a compiler."""
    from .gguf import native

    return native.load_checked("fp4_decode", _check_fp4_native)


def _check_fp4_native(lib) -> bool:
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(16, 128), dtype=np.uint8)
    codes[0, :] = np.arange(128)  # every byte value
    codes[1, :] = np.arange(128, 256)
    scales = np.arange(256, dtype=np.uint8).reshape(32, 8)[:16]  # scale bytes 0..127 ...
    scales = np.concatenate([scales, np.arange(128, 256, dtype=np.uint8).reshape(16, 8)])  # ... and the rest
    codes = np.concatenate([codes, codes[::-1]])
    with np.errstate(over="ignore", invalid="ignore"):  # the largest scales overflow, as they may
        a = _fp4_numpy(codes, scales)
    b = _fp4_compiled(lib, codes, scales)
    # FP8: every code under every scale byte, with ragged edges: blocks of 16 (the kernel takes
    # the block size; 128 would take 4M values for 256 blocks), then 128 on a small ragged matrix
    fp8 = ((np.arange(16 * 16 + 3)[:, None] * 16 + np.arange(16 * 16 + 5)[None, :]) % 256).astype(np.uint8)
    fp8_scales = (np.arange(17 * 17) % 256).astype(np.uint8).reshape(17, 17)
    with np.errstate(over="ignore", invalid="ignore"):
        c = E4M3_TABLE[fp8] * e8m0_decode(fp8_scales)[np.arange(fp8.shape[0])[:, None] // 16,
                                                      np.arange(fp8.shape[1])[None, :] // 16]
        small, small_scales = fp8[:130, :140], fp8_scales[:2, :2]
        e = _fp8_numpy(small, small_scales)
    d = _fp8_compiled(lib, fp8, fp8_scales, 16)
    f = _fp8_compiled(lib, small, small_scales)
    return a.tobytes() == b.tobytes() and c.tobytes() == d.tobytes() and e.tobytes() == f.tobytes()


# --- exact MLX views -----------------------------------------------------------------------


def fp8_to_mxfp8(weight: np.ndarray, scale: np.ndarray, name: str = "weight"):
    """Official FP8 (E4M3 ``[out, in]`` + E8M0 128×128 blocks) -> MLX ``mxfp8`` (group 32).

    Returns ``(w, scales)`` as mx arrays: ``w`` uint32 ``[out, in/4]`` (the same bytes) and
    ``scales`` uint8 ``[out, in/32]`` with ``scales[r, g] = s[r // 128, 32·g // 128]``.
    Ragged block grids (dims not multiples of 128) follow the ceil rule; the input dimension must
    be a multiple of 32, MLX's group size.
    """
    import mlx.core as mx

    w, scales = fp8_to_mxfp8_np(weight, scale, name)
    return mx.array(w), mx.array(scales)


def fp8_to_mxfp8_np(weight: np.ndarray, scale: np.ndarray, name: str = "weight") -> tuple[np.ndarray, np.ndarray]:
    """:func:`fp8_to_mxfp8` in numpy: ``w`` a uint32 view of ``weight``'s bytes (no copy when
    ``weight`` is contiguous), ``scales`` a new uint8 array."""
    weight, scale = np.asarray(weight), np.asarray(scale)
    out_dim, in_dim = _check_fp8(weight, scale, name)
    if in_dim % MX_GROUP:
        raise QuantFormatError(
            f"{name}: FP8 input dimension {in_dim} is not a multiple of {MX_GROUP}; "
            "it has no exact mxfp8 form"
        )
    w = np.ascontiguousarray(weight).view(np.uint8).view(np.uint32)
    return w, fp8_scales_to_mxfp8_np(scale, weight.shape, name)


def fp8_scales_to_mxfp8_np(scale: np.ndarray, weight_shape: tuple[int, ...], name: str = "weight") -> np.ndarray:
    """The ``mxfp8`` scales (uint8 ``[out, in/32]``) of an FP8 weight of ``weight_shape`` from its
    128×128-block E8M0 ``scale``: each block's byte for each of its 32-wide groups (the codes
    themselves stay as they are; a converter that passes them on untouched needs only this)."""
    scale = np.asarray(scale)
    if len(weight_shape) != 2:
        raise QuantFormatError(f"{name}: FP8 weight must be 2-D, got shape {tuple(weight_shape)}")
    out_dim, in_dim = weight_shape
    if tuple(scale.shape) != fp8_scale_shape(out_dim, in_dim):
        raise QuantFormatError(f"{name}: FP8 scale shape {tuple(scale.shape)} does not match weight "
                               f"{tuple(weight_shape)} (expected {fp8_scale_shape(out_dim, in_dim)} for "
                               f"{FP8_WEIGHT_BLOCK}×{FP8_WEIGHT_BLOCK} blocks)")
    if in_dim % MX_GROUP:
        raise QuantFormatError(f"{name}: FP8 input dimension {in_dim} is not a multiple of {MX_GROUP}; "
                               "it has no exact mxfp8 form")
    # each block's byte repeated over its rows and its groups: a broadcast copied once (an
    # index array per axis took twice as long, measured)
    blocks_out, blocks_in = scale.shape
    per_block = FP8_WEIGHT_BLOCK // MX_GROUP
    spread = np.broadcast_to(np.asarray(scale, dtype=np.uint8)[:, None, :, None],
                             (blocks_out, FP8_WEIGHT_BLOCK, blocks_in, per_block))
    return np.ascontiguousarray(spread.reshape(blocks_out * FP8_WEIGHT_BLOCK, blocks_in * per_block)
                                [:out_dim, : in_dim // MX_GROUP])


def fp4_to_mxfp4(weight: np.ndarray, scale: np.ndarray, name: str = "weight"):
    """Official FP4 (I8 ``[..., out, in/2]`` + E8M0 ``[..., out, in/32]``) -> MLX ``mxfp4`` (group 32).

    Returns ``(w, scales)`` as mx arrays: ``w`` uint32 ``[..., out, in/8]`` (the same bytes: MLX
    also keeps element 2k in the low nibble of byte k) and ``scales`` uint8, unchanged.
    """
    import mlx.core as mx

    weight, scale = np.asarray(weight), np.asarray(scale)
    _check_fp4(weight, scale, name)
    w = np.ascontiguousarray(weight).view(np.uint8).view(np.uint32)
    return mx.array(w), mx.array(np.asarray(scale, dtype=np.uint8))


def stack_fp4_to_mxfp4(weights: list[np.ndarray], scales: list[np.ndarray], name: str = "experts"):
    """Per-expert official FP4 tensors -> one stacked ``mxfp4`` pair ``[E, out, in/8]``, ``[E, out, in/32]``.

    Fills a single preallocated buffer so peak memory is one copy of the stacked bytes.
    """
    import mlx.core as mx

    for e, (w, s) in enumerate(zip(weights, scales)):
        _check_fp4(np.asarray(w), np.asarray(s), f"{name}[{e}]")
    if not weights:
        raise QuantFormatError(f"{name}: no experts to stack")
    if len({np.shape(w) for w in weights}) != 1 or len({np.shape(s) for s in scales}) != 1:
        raise QuantFormatError(f"{name}: experts have different shapes")
    w_out = np.empty((len(weights),) + np.shape(weights[0]), dtype=np.uint8)
    s_out = np.empty((len(scales),) + np.shape(scales[0]), dtype=np.uint8)
    for e, (w, s) in enumerate(zip(weights, scales)):
        w_out[e] = np.asarray(w).view(np.uint8)
        s_out[e] = s
    return mx.array(w_out.view(np.uint32)), mx.array(s_out)
