"""DeepSeek V4 Flash: embedding, hyper-connected blocks (attention + MoE), head, MTP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..config import ModelConfig
from ..state import LayerCache
from .attention import Attention
from .. import kernels
from ..ops import RMSNorm, hc_head, hc_post
from .moe import MoE


def _hc_params(config: ModelConfig) -> tuple[tuple[int, int], tuple[int], tuple[int]]:
    m = config.hc_mult
    mix = (2 + m) * m
    return (mix, m * config.hidden_size), (mix,), (3,)


class Block(nn.Module):
    """One decoder layer: h ← HC(attention), then h ← HC(MoE), over ``hc_mult`` streams."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config = config
        fn, base, scale = _hc_params(config)
        self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = mx.zeros(fn), mx.zeros(base), mx.ones(scale)
        self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale = mx.zeros(fn), mx.zeros(base), mx.ones(scale)
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.ffn = MoE(config, layer)

    def _pre(self, h, fn, base, scale, dtype, norm, prev=None, also_f32=False):
        # the sublayer's norm, the previous sublayer's HC post and the float32 copy of x the
        # sublayer's float32 consumers take, in the HC pre kernel
        c = self.config
        return kernels.hc_pre(h, fn, base, scale, iters=c.hc_sinkhorn_iters, eps=c.hc_eps,
                              norm_eps=c.rms_norm_eps, out_dtype=dtype, norm=norm, prev=prev,
                              also_f32=also_f32)

    def __call__(self, h: mx.array, token_ids: mx.array, cache: LayerCache, dtype) -> mx.array:
        h, (y, post, comb) = self.deferred(h, token_ids, cache, dtype)
        return hc_post(y, h, post, comb)

    def deferred(self, h: mx.array, token_ids: mx.array, cache: LayerCache, dtype,
                 pending: tuple | None = None) -> tuple[mx.array, tuple]:
        """The layer without its last HC post: (streams before it, (y, post, comb) of it), which
        the next layer's HC pre kernel runs first (``pending``: the previous layer's). A stack
        of layers ends with ``ops.hc_post(y, h, post, comb)``."""
        prev = () if pending is None else (pending,)
        if self.attn.ratio:  # the compressors read x in float32
            x, post, comb, *h_new, x32 = self._pre(h, self.hc_attn_fn, self.hc_attn_base,
                                                   self.hc_attn_scale, dtype, self.attn_norm,
                                                   *prev, also_f32=True)
        else:
            x, post, comb, *h_new = self._pre(h, self.hc_attn_fn, self.hc_attn_base,
                                              self.hc_attn_scale, dtype, self.attn_norm, *prev)
            x32 = None
        h = h_new[0] if h_new else h
        y = self.attn(x, cache, x32)
        x, post, comb, h, x32 = self._pre(h, self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale,
                                          dtype, self.ffn_norm, prev=(y, post, comb), also_f32=True)
        y = self.ffn(x, token_ids, x32)  # the router reads x in float32
        return h, (y, post, comb)


class MTPBlock(Block):
    """Multi-token prediction: combines the main model's final streams at position p with the
    embedding of token p+1 and runs one sliding-window block to predict token p+2."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config, layer)
        d, m = config.hidden_size, config.hc_mult
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(d, eps=config.rms_norm_eps)
        self.norm = RMSNorm(d, eps=config.rms_norm_eps)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = mx.zeros((m, m * d)), mx.zeros((m,)), mx.ones((1,))


# Parameters that stay float32 whatever the activation dtype (the official graph keeps them so).
_FLOAT32_PARTS = ("hc_", "attn_sink", ".ape", "compressor.wkv", "compressor.wgate", "ffn.gate.")


def keeps_float32(path: str) -> bool:
    return any(p in path for p in _FLOAT32_PARTS)


class Model(nn.Module):
    def __init__(self, config: ModelConfig, *, dtype: mx.Dtype = mx.float32, qat_rounding: bool = True,
                 experts_per_token: int | None = None):
        super().__init__()
        self.config = config
        self.model_type = "deepseek_v4"
        c = config
        m, d = c.hc_mult, c.hidden_size
        self.embed = nn.Embedding(c.vocab_size, d)
        self.layers = [Block(c, i) for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(d, eps=c.rms_norm_eps)
        self.head = nn.Linear(d, c.vocab_size, bias=False)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = mx.zeros((m, m * d)), mx.zeros((m,)), mx.ones((1,))
        self.mtp = [MTPBlock(c, c.num_hidden_layers + j) for j in range(c.num_nextn_predict_layers)]
        self.dtype = dtype
        self.set_qat_rounding(qat_rounding)
        self.set_experts_per_token(experts_per_token)
        self._cast_parameters(dtype)

    # ------------------------------------------------------------------ setup
    def _cast_parameters(self, dtype: mx.Dtype) -> None:
        params = [
            (k, v if not mx.issubdtype(v.dtype, mx.floating) else v.astype(mx.float32 if keeps_float32(k) else dtype))
            for k, v in tree_flatten(self.parameters())
        ]
        self.update(tree_unflatten(params))

    def merge_projections(self) -> None:
        """Merge the projections that read one input (attention, shared expert) now, not on the
        first call (model/merged.py; the layers rebuild a merge whose weights were replaced).
        Blocks another pipeline stage holds (empty modules, ``loader.keep_stage``) are skipped."""
        for blk in list(self.layers) + list(self.mtp):
            if not isinstance(blk, Block):
                continue
            blk.attn.merge_projections()
            blk.ffn.shared_experts.merge_projections()

    def set_qat_rounding(self, on: bool) -> None:
        """Switch the official graph's FP8 (KV) and Hadamard+FP4 (indexer) rounding."""
        self.qat_rounding = bool(on)
        for blk in list(self.layers) + list(self.mtp):
            blk.attn.qat_rounding = self.qat_rounding

    def set_experts_per_token(self, k: int | None, source: str = "config") -> None:
        """Route to ``k`` experts per token (None: the file's ``num_experts_per_tok``); the
        shared config is not touched."""
        self.experts_per_token = self.config.check_experts_per_token(k, source)
        for blk in list(self.layers) + list(self.mtp):
            blk.ffn.gate.top_k = self.experts_per_token

    def make_cache(self) -> list[LayerCache]:
        """Fresh decode state: one entry per main layer, then one per MTP block."""
        c = self.config
        return [LayerCache(c.ratio(i)) for i in range(c.num_hidden_layers + c.num_nextn_predict_layers)]

    # ------------------------------------------------------------------ forward
    def hidden_streams(self, tokens: mx.array, cache: list[LayerCache] | None = None) -> mx.array:
        """Final HC streams [B, S, hc_mult, D] (float32), before the head collapse."""
        if tokens.ndim == 1:
            tokens = tokens[None]
        if cache is None:
            cache = self.make_cache()
        e = self.embed(tokens).astype(mx.float32)
        h = mx.broadcast_to(e[:, :, None, :], (*e.shape[:2], self.config.hc_mult, e.shape[-1]))
        pending = None
        for blk, c in zip(self.layers, cache):
            if isinstance(blk, Block):
                # each layer's last HC post runs in the next layer's HC pre kernel
                h, pending = blk.deferred(h, tokens, c, self.dtype, pending)
                continue
            if pending is not None:
                h, pending = hc_post(pending[0], h, pending[1], pending[2]), None
            h = blk(h, tokens, c, self.dtype)
        return h if pending is None else hc_post(pending[0], h, pending[1], pending[2])

    def head_logits(self, h: mx.array, fn, base, scale, norm: nn.RMSNorm) -> mx.array:
        c = self.config
        y = hc_head(h, fn, base, scale, eps=c.hc_eps, norm_eps=c.rms_norm_eps)
        y = norm(y.astype(self.dtype))
        # The official head is float32; with a bf16 head the logits are rounded to bf16 before
        # this cast (a float32 copy of a 1 GB head per token would cost more than it gives).
        return self.head(y).astype(mx.float32)

    def __call__(self, tokens: mx.array, cache: list[LayerCache] | None = None) -> mx.array:
        """tokens [B, S] → logits [B, S, vocab] float32 (mlx-lm's model protocol)."""
        return self.main_head(self.hidden_streams(tokens, cache))

    def mtp_logits(self, h: mx.array, next_tokens: mx.array, cache: list[LayerCache] | None = None,
                   index: int = 0) -> mx.array:
        """Draft logits for position p+2 from the main streams ``h`` at p and token p+1.

        ``cache`` is the model's cache (the MTP entry follows the main layers). The MTP block
        keeps its own position: feed it the streams of every position in order, as the main
        layers produce them; ``cache=None`` runs it on positions 0.. with a fresh state.
        """
        if not self.mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        c = self.config
        fresh = cache is None
        if fresh:
            cache = self.make_cache()
        layer_cache = cache[c.num_hidden_layers + index]
        n = next_tokens.shape[-1]
        if not fresh and layer_cache.offset + n > cache[0].offset:
            # The MTP block pairs h at position p with token p+1; it cannot run ahead of the main layers.
            raise ValueError(
                f"MTP cache at position {layer_cache.offset} + {n} tokens runs past the main layers "
                f"({cache[0].offset}); feed the MTP block the streams of every position, in order"
            )
        z = self.mtp_streams(h, next_tokens, layer_cache, index)
        return self.mtp_head(z, index)

    def mtp_streams(self, h: mx.array, next_tokens: mx.array, layer_cache: LayerCache, index: int = 0) -> mx.array:
        """The MTP block's output streams [B, S, hc_mult, D] for streams ``h`` and the tokens that
        follow them, at the block's own position (no check: a drafter runs it ahead)."""
        blk = self.mtp[index]
        if next_tokens.ndim == 1:
            next_tokens = next_tokens[None]
        e = blk.enorm(self.embed(next_tokens).astype(self.dtype))
        z = blk.e_proj(e)[:, :, None, :] + blk.h_proj(blk.hnorm(h.astype(self.dtype)))
        return blk(z.astype(mx.float32), next_tokens, layer_cache, self.dtype)

    def mtp_head(self, z: mx.array, index: int = 0) -> mx.array:
        """Logits of the MTP block's streams ``z`` (its own HC head and norm, the shared head)."""
        blk = self.mtp[index]
        return self.head_logits(z, blk.hc_head_fn, blk.hc_head_base, blk.hc_head_scale, blk.norm)

    def main_head(self, h: mx.array) -> mx.array:
        """Logits of the main model's final streams ``h``."""
        return self.head_logits(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.norm)
