"""Options of ``ds4mlx convert`` and the errors it raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..io.hf import HFCheckpoint

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)


class ConvertError(ValueError):
    """Conversion cannot proceed; the message names the file, tensor, option or path at fault."""


class OutputExistsError(ConvertError):
    """The output path is already taken."""


@dataclass(frozen=True)
class Options:
    to: str
    preset: str | None
    experts_per_token: int | None
    expert_bits: int | None
    dense_bits: int | None
    group_size: int
    include_mtp: bool

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_options(ckpt: HFCheckpoint, opts: Options) -> None:
    if opts.to not in ("mlx", "gguf"):
        raise ConvertError(f"--to must be 'mlx' or 'gguf', got {opts.to!r}")
    if opts.to == "mlx" and opts.preset is not None:
        raise ConvertError("--preset is for GGUF output; MLX output uses --expert-bits / --dense-bits")
    if opts.to == "gguf" and (opts.expert_bits or opts.dense_bits):
        raise ConvertError("--expert-bits / --dense-bits are for MLX output; GGUF output uses --preset")
    for what, bits in (("--expert-bits", opts.expert_bits), ("--dense-bits", opts.dense_bits)):
        if bits is not None and bits not in AFFINE_BITS:
            raise ConvertError(f"{what} must be one of {AFFINE_BITS}, got {bits}")
    if opts.group_size not in GROUP_SIZES:
        raise ConvertError(f"--group-size must be one of {GROUP_SIZES}, got {opts.group_size}")
    k = opts.experts_per_token
    if k is not None:
        cfg = ckpt.config
        widths = [ckpt.file(ckpt.weight_map[n]).info(n).shape[1] for n in ckpt.entries if n.endswith(".tid2eid")]
        limit = min(widths) if widths else int(cfg["n_routed_experts"])
        if not 1 <= k <= limit:
            why = f"the hash tables (tid2eid) have {limit} columns" if widths else f"there are {limit} experts"
            raise ConvertError(f"--experts-per-token {k}: must be 1..{limit} ({why})")
