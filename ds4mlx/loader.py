"""``load(path_or_repo)`` -> ``(model, tokenizer)`` for every supported source.

Sources: a local official-format directory (sharded safetensors + index, or one
``model.safetensors``), our converted MLX directory (``io/mlx_dir.py``), a ``.gguf`` file
(``ds4mlx.io.gguf``), ``"demo"`` (the built-in synthetic demo model), a Hugging Face repo
id, or one GGUF of a repo as ``REPO:FILE.gguf`` (both fetched by ``ds4mlx.hub``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lm.models.switch_layers import SwitchLinear

from .config import ModelConfig
from .hub import ModelNotFoundError, gguf_file, snapshot, split_gguf_ref
from .io.hf import CheckpointError, open_hf_checkpoint
from .io.mlx_dir import is_mlx_dir, open_mlx_dir
from .layers import apply_formats
from .model.transformer import Model
from .quant.formats import GGUF_PREFIX
from .stage import Stage

DEMO = "demo"


class TokenizerMismatchWarning(UserWarning):
    """The tokenizer beside the weights has more ids than the model's vocabulary, so it was not
    loaded (``load`` returns no tokenizer); the CLI gives this as the reason."""


class NonFiniteWeightError(ValueError):
    """A weight holds NaN or Inf; the message names the file and tensor."""


def default_dtype() -> mx.Dtype:
    """bfloat16 on Apple GPUs, float32 on CPU (MLX's CPU quantized matmuls accumulate in the
    output dtype, and ``gather_mm`` is float32-only there)."""
    try:
        return mx.bfloat16 if mx.metal.is_available() else mx.float32
    except AttributeError:  # MLX builds without the metal module
        return mx.float32


def load(
    path_or_repo: str | os.PathLike,
    *,
    experts_per_token: int | None = None,
    qat_rounding: bool = True,
    dtype: mx.Dtype | None = None,
    mtp: bool = False,
    mtp_path: str | os.PathLike | None = None,
    check_finite: bool = True,
    progress: Callable[[int, int], None] | None = None,
    stage: Stage | None = None,
) -> tuple[nn.Module, Any]:
    """Load DeepSeek V4 Flash and its tokenizer (None when the source ships none).

    ``mtp=True`` also loads the multi-token-prediction block (about 3.5 GB for Flash), which
    only a speculative drafter uses; by default it stays on disk. A GGUF takes it from its own
    ``mtp.*`` tensors, from ``mtp_path`` (ds4's separate MTP GGUF), or from that file found
    beside it (``find_mtp_gguf``). ``check_finite`` refuses weights holding NaN/Inf (one pass
    over each tensor as it loads; scripts/finite_check_cost.py).
    ``progress(bytes read, bytes to read)`` is called as the weights are read
    (``ds4mlx.progress.LoadProgress`` draws it). ``stage``: build and read only that pipeline
    stage's layers (and the embedding / head where it holds them); ``ds4mlx.distributed`` runs it.
    """
    dtype = default_dtype() if dtype is None else dtype
    path = resolve_model_path(path_or_repo)
    if mtp_path is not None and path.suffix != ".gguf":
        raise ValueError(f"{mtp_path}: a separate MTP file goes with a .gguf model; {path} carries its own")
    if path.suffix == ".gguf":
        return load_gguf(path, experts_per_token=experts_per_token, qat_rounding=qat_rounding, dtype=dtype,
                         mtp=mtp or mtp_path is not None, mtp_path=mtp_path, check_finite=check_finite,
                         progress=progress, stage=stage)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: expected a model directory or a .gguf file")
    model = load_dir(path, experts_per_token=experts_per_token, qat_rounding=qat_rounding, dtype=dtype, mtp=mtp,
                     check_finite=check_finite, progress=progress, stage=stage)
    return model, _load_tokenizer(path, model.config.vocab_size)


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A model argument -> a local path: an existing file or directory, ``"demo"`` (the built-in
    demo model, generated on first use), a Hugging Face repo id, or ``REPO:FILE.gguf`` (one GGUF
    of a repo); Hub names go through the huggingface_hub cache first, then the network."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text == DEMO:
        from .demo import demo_path  # checkpoint + tokenizer, cached

        return demo_path()
    ref = split_gguf_ref(text)
    if ref is not None:  # REPO:FILE.gguf
        return gguf_file(*ref)
    if text.endswith(".gguf"):
        raise ModelNotFoundError(f"{path}: GGUF file not found")
    return snapshot(text)


def open_checkpoint(path: Path):
    """Our converted MLX directory or an official-format one; both give
    ``config``, ``has_mtp``, ``load_weights(include_mtp=...)`` and ``close()``."""
    return open_mlx_dir(path) if is_mlx_dir(path) else open_hf_checkpoint(path)


def load_dir(
    path: str | os.PathLike,
    *,
    experts_per_token: int | None = None,
    qat_rounding: bool = True,
    dtype: mx.Dtype = mx.float32,
    mtp: bool = False,
    check_finite: bool = True,
    progress: Callable[[int, int], None] | None = None,
    stage: Stage | None = None,
) -> nn.Module:
    """Build the model for a checkpoint directory and load its weights (strict); with ``stage``,
    only that stage's part of the model and of the files."""
    path = Path(path)
    checkpoint = open_checkpoint(path)
    try:
        source = str(path / "config.json")
        config = ModelConfig.from_hf(checkpoint.config, source=source)
        k = config.check_experts_per_token(experts_per_token, source)
        if not (mtp and checkpoint.has_mtp):
            config = replace(config, num_nextn_predict_layers=0)  # the main model only
        model = Model(config, dtype=dtype, qat_rounding=qat_rounding, experts_per_token=k)
        if stage is not None:
            keep_stage(model, stage)
        weights, formats = checkpoint.load_weights(include_mtp=config.num_nextn_predict_layers > 0,
                                                   progress=progress, keep=None if stage is None else stage.holds)
    finally:
        checkpoint.close()
    apply_formats(model, formats)
    load_into(model, weights, formats, str(path), check_finite=check_finite)
    model.merge_projections()
    model.eval()
    return model


def load_into(model: nn.Module, weights: dict[str, mx.array], formats: dict[str, Any], source: str,
              *, check_finite: bool = True) -> None:
    """Cast float tensors to the dtype of the model's parameter at that path (the model decides
    what stays float32), keep packed arrays as stored (``formats``: module -> WeightFormat),
    refuse NaN/Inf (``check_finite``), then load strictly."""
    if check_finite:
        check_all_finite(weights, formats, source)
    params = dict(tree_flatten(model.parameters()))
    for path in list(weights):
        target = params.get(path)
        if target is None or path.rpartition(".")[0] in formats:
            continue  # unknown paths are reported by the strict load below
        array = weights[path]
        if array.ndim == 2 and path.endswith(".tid2eid") and array.shape[1] > target.shape[1]:
            array = array[:, : target.shape[1]]  # a wider hash table than the model's width
        if array.dtype != target.dtype:
            array = array.astype(target.dtype)
            mx.eval(array)  # one tensor at a time: the stored copy is released right away
        weights[path] = array
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{source}: the checkpoint does not match the model: {e}") from None


def _non_finite(array: mx.array, fmt: Any, leaf: str) -> mx.array | None:
    """Where ``array`` holds NaN/Inf, read in its stored form (bool, leading axes kept; None
    when the form cannot hold them): float arrays directly, E8M0 scales (0xFF is NaN) and FP8
    E4M3 codes (S.1111.111 is NaN) of the MX formats, and GGUF blocks by their fp16 scales."""
    if mx.issubdtype(array.dtype, mx.floating):
        return ~mx.isfinite(array)
    kind = getattr(fmt, "kind", None) or ""
    if kind in ("mxfp8", "mxfp4") and leaf == "scales":
        return array.view(mx.uint8) == 0xFF
    if kind == "mxfp8" and leaf == "weight":
        return (array.view(mx.uint8) & 0x7F) == 0x7F
    if kind.startswith(GGUF_PREFIX) and leaf == "weight":
        from .quant import gguf as gguf_quants

        return gguf_quants.non_finite_scales(gguf_quants.get(kind[len(GGUF_PREFIX):]), array.view(mx.uint8))
    return None


def _source_name(path: str, source: str, expert: int | None) -> str:
    """How the source file names the tensor at internal ``path`` (packed parts by their weight)."""
    from .names import internal_to_gguf, internal_to_hf

    module, _, leaf = path.rpartition(".")
    try:
        if source.endswith(".gguf"):
            return internal_to_gguf(module + ".weight" if leaf in ("scales", "biases") else path)
        if is_mlx_dir(source):
            return path
        if expert is not None:  # official checkpoints store every expert on its own
            head, _, proj = module.rpartition(".")
            path = f"{head}.{expert}.{proj}.{leaf}"
        return internal_to_hf(path)
    except Exception:  # a name the maps do not know: the internal path still says which
        return path


_FINITE_BATCH = 64  # tensors whose counts are evaluated together: few synchronisations, bounded temporaries


def check_all_finite(weights: dict[str, mx.array], formats: dict[str, Any], source: str) -> None:
    """``NonFiniteWeightError`` naming the first tensor (in load order) that holds NaN/Inf, as
    its file names it. One pass over what each stored form can hold NaN in; the counts of a
    batch of tensors are evaluated together (scripts/finite_check_cost.py measures it)."""
    items = list(weights.items())
    for start in range(0, len(items), _FINITE_BATCH):
        counts = []
        for path, array in items[start:start + _FINITE_BATCH]:
            fmt = formats.get(path.rpartition(".")[0])
            mask = _non_finite(array, fmt, path.rpartition(".")[2])
            if mask is not None:
                counts.append((path, array, fmt, mx.sum(mask)))
        mx.eval([c for *_, c in counts])
        for path, array, fmt, count in counts:
            if count.item():
                _report_non_finite(path, array, fmt, source, int(count.item()))


def _report_non_finite(path: str, array: mx.array, fmt: Any, source: str, bad: int) -> None:
    mask = _non_finite(array, fmt, path.rpartition(".")[2])
    expert = None
    if ".experts." in path and mask.ndim == 3:  # stacked experts: say which one
        expert = int(mx.argmax(mx.any(mask.reshape(mask.shape[0], -1), axis=1)).item())
    name = _source_name(path, source, expert)
    packed = array.dtype == mx.uint8 and getattr(fmt, "kind", "").startswith(GGUF_PREFIX)
    what = "blocks with a NaN or Inf scale" if packed else "NaN or Inf values"
    where = f" (expert {expert})" if expert is not None and f".{expert}." not in name else ""
    raise NonFiniteWeightError(f"{source}: tensor {name!r}{where} holds {bad} {what} (of {mask.size}); "
                               "the file is damaged")


def load_gguf(path: str | os.PathLike, *, experts_per_token: int | None = None,
              qat_rounding: bool = True, dtype: mx.Dtype | None = None, mtp: bool = False,
              mtp_path: str | os.PathLike | None = None, check_finite: bool = True,
              progress: Callable[[int, int], None] | None = None, stage: Stage | None = None,
              ) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a DeepSeek V4 GGUF (tokenizer None if the file has none).

    ``mtp=True`` loads the MTP block: the file's own ``mtp.{j}.*`` tensors if it has them, else
    ``mtp_path`` or the MTP GGUF beside it (ds4 keeps the block in a separate file); the block
    shares the main file's embedding and head. Asked for and found nowhere: ``GGUFError``.
    """
    from .io.gguf import GGUF_KEY_NAMES, GGUFError, open_gguf_checkpoint

    dtype = default_dtype() if dtype is None else dtype
    if mtp and mtp_path is None:
        mtp_path = find_mtp_gguf(path)
    checkpoint = open_gguf_checkpoint(path, mtp_path, mtp=mtp)
    if mtp and not checkpoint.has_mtp:
        checkpoint.close()
        raise GGUFError(f"{path}: no MTP block: the file has no mtp.* tensors and no MTP GGUF was found "
                        f"beside it (give it with --mtp-gguf FILE)")
    try:
        source = str(checkpoint.path)
        config = ModelConfig.from_hf(checkpoint.config, source=source, names=GGUF_KEY_NAMES)
        k = config.check_experts_per_token(experts_per_token, source)
        model = Model(config, dtype=dtype, qat_rounding=qat_rounding, experts_per_token=k)
        if stage is not None:
            keep_stage(model, stage)
        params = {p: tuple(v.shape) for p, v in tree_flatten(model.parameters())}
        weights, formats = checkpoint.load_weights(params, projection_modules(model), progress)
        apply_formats(model, formats)
        load_into(model, weights, formats, source, check_finite=check_finite)
        model.merge_projections()
        model.eval()
        fields = checkpoint.tokenizer_fields()
        tokenizer = None
        if fields is not None:
            from .tokenizer import tokenizer_from_gguf_fields

            tokenizer = tokenizer_from_gguf_fields(fields, source=source)
    finally:
        checkpoint.close()
    return model, tokenizer


def keep_stage(model: nn.Module, stage: Stage) -> None:
    """Drop what ``stage`` does not hold from a model not yet loaded (its parameters are still
    unevaluated zeros, so nothing was allocated): other layers become empty modules (indices
    keep their meaning), the embedding / head parts go where the stage lacks them."""
    if stage.num_layers != len(model.layers):
        raise ValueError(f"{stage.describe()} splits {stage.num_layers} layers, the model has {len(model.layers)}")
    for i in range(len(model.layers)):
        if not stage.holds_layer(i):
            model.layers[i] = nn.Module()
    for j in range(len(model.mtp)):  # the drafter's block is not split
        model.mtp[j] = nn.Module()
    for name in ("embed", "norm", "head"):
        if not stage.holds(name + ".weight"):
            setattr(model, name, nn.Module())
    for name in ("hc_head_fn", "hc_head_base", "hc_head_scale"):
        if not stage.holds(name):
            model.pop(name)


def find_mtp_gguf(path: str | os.PathLike) -> Path | None:
    """ds4's separate MTP GGUF beside the main file: ``<stem>-MTP.gguf`` (what ``ds4mlx convert``
    writes), else the one other ``.gguf`` in the folder whose name says MTP (the published
    ``DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf``); None if there is none or it is ambiguous."""
    path = Path(path)
    own = path.with_name(f"{path.stem}-MTP.gguf")
    if own.is_file():
        return own
    others = [p for p in path.parent.glob("*.gguf")
              if p != path and "mtp" in p.stem.lower() and "mtp" not in path.stem.lower()]
    return others[0] if len(others) == 1 else None


def projection_modules(model: nn.Module) -> set[str]:
    """Module paths of every float projection (Linear / SwitchLinear) of the model."""
    return {p for p, m in model.named_modules() if isinstance(m, (nn.Linear, SwitchLinear))}


def _load_tokenizer(path: Path, vocab_size: int):
    from .tokenizer import TokenizerNotFoundError, load_tokenizer, published_token_ids

    if path.is_dir() and not (path / "tokenizer.json").is_file():
        # The published fallback: too many ids for a small test checkpoint is known from its
        # count alone (building the tokenizer takes seconds, and would be dropped below).
        try:
            if published_token_ids() > vocab_size:
                return None
        except TokenizerNotFoundError:
            return None
    try:
        tokenizer = load_tokenizer(path)
    except FileNotFoundError:  # a checkpoint without tokenizer files (e.g. the tiny ones)
        return None
    n_ids = len(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else 0
    if n_ids > vocab_size:
        # Its ids would index past the embedding: offer no tokenizer rather than a wrong one.
        # Silent when it is the published fallback next to a small test checkpoint.
        if (path / "tokenizer.json").is_file():
            warnings.warn(f"{path / 'tokenizer.json'}: the tokenizer has {n_ids} token ids but the model's "
                          f"vocab_size is {vocab_size}, so it does not belong to these weights; not loaded",
                          TokenizerMismatchWarning, stacklevel=2)
        return None
    return tokenizer
