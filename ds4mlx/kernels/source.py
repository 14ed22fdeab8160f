"""The Metal sources as ``mx.fast.metal_kernel`` compiles them: ``metal/<file>`` with its includes
inlined, split into kernel bodies at ``// @kernel NAME`` lines, under a header that defines the
constants the sources share with Python (layout ids, GGUF block geometry, tile and threadgroup
sizes, the IQ2_XXS grid, the FP8 rounding block). Grids are computed from the same constants, so
a kernel and its launch cannot disagree on a tile size.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import gguf
import mlx.core as mx

from ..quant.codecs import E2M1_MAX, E4M3_MAX, FP8_ACT_BLOCK, MX_GROUP
from ..quant.gguf import iq2_xxs as _iq2_xxs

METAL_DIR = Path(__file__).with_name("metal")
KERNEL_FORMATS = ("Q8_0", "Q4_K", "Q2_K", "IQ2_XXS", "MXFP4")  # GGUF block formats with kernels
# Layout ids (DS4_<name> in the Metal sources, defined from here); MXFP4 has two layouts.
LAYOUT = {"Q8_0": 0, "Q4_K": 1, "Q2_K": 2, "IQ2_XXS": 3}
MLX_MXFP4, GGUF_MXFP4 = 4, 5
# Float rows the decode kernels read beside packed experts (a folded shared expert), by dtype_name
DENSE_LAYOUT = {"float32": 6, "float16": 7, "bfloat16": 8}
# MLX's quantized modes a folded shared expert may take: mxfp8, and affine 8-bit group 32 by the
# dtype_name of its scales and biases (metal/mxfp8.h, metal/affine8.h)
MLX_MXFP8 = 9
AFFINE8_LAYOUT = {"float32": 10, "float16": 11, "bfloat16": 12}


def dtype_name(dtype: mx.Dtype) -> str:
    """``"bfloat16"`` for ``mx.bfloat16``: the name the layouts and the checks go by."""
    return str(dtype).rsplit(".", 1)[-1]

# Tile sizes: defined into the Metal sources from here (see defines), so grid and kernel agree.
DECODE_ROWS, DECODE_SIMDGROUPS = 4, 2  # output rows per simdgroup, simdgroups per threadgroup
DECODE_ROWS_PER_TG = DECODE_ROWS * DECODE_SIMDGROUPS
DECODE_THREADS = 32 * DECODE_SIMDGROUPS
# moe_down_decode: simdgroups per threadgroup, sharing its DECODE_ROWS rows and splitting the
# token's expert slots (4: six routed + the shared expert take two passes, not seven)
DOWN_SIMDGROUPS = 4
MATVEC_TOKENS = 8  # gguf_matvec: tokens per call (decode, a speculative verify)
TILE, TILE_K, TILE_THREADS = 32, 32, 128  # pairs = outputs per tile, K step, threads
HC_THREADS = 256  # threads per threadgroup of hc_pre
# hc_pre's grid form: inputs (of a token's M * D) per threadgroup; Flash's 4 x 4096 -> 32
# threadgroups per token read the 1.5 MB float32 mixer, 3.2 KB of partials per token
HC_CHUNK = 512
ATTN_SIMDGROUPS = 4  # simdgroups per (token, head) of attn_decode; they split the keys
INDEX_THREADS = 256  # threads per threadgroup of the indexer score kernel
# indexer_scores_q (the queries made in the scores' launch): passes of INDEX_THREADS / 8 keys per
# threadgroup, so that each threadgroup's copy of the queries' work serves 4 x 32 keys
INDEX_KEY_PASSES = 4
ROUTER_THREADS = 256  # threads per token of router_topk
ROUTE_MAX_K = 32  # moe_gate_up_decode with ROUTE: experts per token it picks at most


def _iq2xxs_grid_define() -> str:
    codes = ", ".join(f"0x{int(c):04x}" for c in _iq2_xxs.GRID_CODES)
    return f"#define DS4_IQ2XXS_GRID {codes}\n"


def defines() -> str:
    """The constants the Metal sources share with this module: layout ids, block geometry of
    each GGUF format (gguf.GGML_QUANT_SIZES) and tile sizes."""
    values = {f"DS4_{name}": v for name, v in LAYOUT.items()}
    values.update(DS4_MXFP4=MLX_MXFP4, DS4_MXFP4_GGUF=GGUF_MXFP4)
    values.update(DS4_F32=DENSE_LAYOUT["float32"], DS4_F16=DENSE_LAYOUT["float16"],
                  DS4_BF16=DENSE_LAYOUT["bfloat16"], DS4_MXFP8=MLX_MXFP8,
                  DS4_AFF8_F32=AFFINE8_LAYOUT["float32"], DS4_AFF8_F16=AFFINE8_LAYOUT["float16"],
                  DS4_AFF8_BF16=AFFINE8_LAYOUT["bfloat16"])
    for name in KERNEL_FORMATS:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        values[f"DS4_{name}_BLOCK"], values[f"DS4_{name}_BYTES"] = block, nbytes
    values.update(DS4_ROWS=DECODE_ROWS, DS4_SIMDGROUPS=DECODE_SIMDGROUPS,
                  DS4_DOWN_SG=DOWN_SIMDGROUPS, DS4_MV_TOKENS=MATVEC_TOKENS, DS4_BM=TILE,
                  DS4_BN=TILE, DS4_BK=TILE_K, DS4_TG=TILE_THREADS, DS4_HC_TG=HC_THREADS,
                  DS4_HC_CHUNK=HC_CHUNK, DS4_ATTN_SG=ATTN_SIMDGROUPS, DS4_INDEX_TG=INDEX_THREADS,
                  DS4_INDEX_KPT=INDEX_KEY_PASSES,
                  DS4_ROUTER_TG=ROUTER_THREADS, DS4_ROUTE_MAX_K=ROUTE_MAX_K)
    # the QAT FP8 round trip's block and range (quant/codecs.py), for metal/rows.metal
    values.update(DS4_FP8_BLOCK=FP8_ACT_BLOCK, DS4_E4M3_MAX=f"{E4M3_MAX:.1f}f")
    # the indexer's Hadamard + FP4 rounding (model/qat.py hadamard_fp4), for index_q
    values.update(DS4_MX_GROUP=MX_GROUP, DS4_E2M1_MAX=f"{E2M1_MAX:.1f}f")
    return "".join(f"#define {k} {v}\n" for k, v in values.items())


_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)
_SECTION = re.compile(r"^// @kernel (\w+)\s*$", re.M)


def _inline_includes(text: str, seen: set[str]) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _inline_includes((METAL_DIR / name).read_text(), seen)

    return _INCLUDE.sub(sub, text).replace("#pragma once", "")


@functools.cache
def metal_source(file: str) -> tuple[str, dict[str, str]]:
    """``metal/<file>`` -> (header, {kernel name: body}). Includes are inlined (metal_kernel
    compiles one string) and the header starts with the tables defined from Python."""
    text = _inline_includes((METAL_DIR / file).read_text(), set())
    parts = _SECTION.split(text)
    header = defines() + _iq2xxs_grid_define() + parts[0]
    return header, {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


