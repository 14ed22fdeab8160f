"""Text generation: mlx-lm's token loop (``generate_step``) with DeepSeek V4's conventions.

``stream_generate`` yields one ``GenerationResponse`` per generated token: the new text, the
token, running statistics, and whether the text is reasoning (between ``<think>`` and
``</think>``; the markers themselves are not part of ``text``). A ``prompt_cache`` carries the
decode state across calls, so a conversation only ever prefills its new tokens.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence, Union

if TYPE_CHECKING:  # MLX loads on first use, so ``import ds4mlx`` (and the CLI's start) stay light
    import mlx.core as mx
    import mlx.nn as nn

# DeepSeek's recommended sampling for V4 (temperature 1, top-p 1) with ds4's min-p floor.
DEFAULT_TEMP = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
DEFAULT_MIN_P = 0.05
DEFAULT_MAX_TOKENS = 512
DEFAULT_PREFILL_STEP = 2048
DEFAULT_DRAFT_TOKENS = 2

Prompt = Union[str, Sequence[int], "mx.array"]
MAX_SEED = 2**64 - 1  # mx.random.seed takes an unsigned 64-bit integer


class ContextLengthError(ValueError):
    """The prompt does not fit in the context (the message gives both lengths)."""


class PromptError(ValueError):
    """A prompt that cannot be given to the model (bad text, token ids outside the vocabulary)."""


class NonFiniteLogitsError(ValueError):
    """The model produced NaN/Inf logits: nothing sampled from them would mean anything."""


def check_text(text: str, what: str = "the prompt") -> str:
    """``text`` if it is valid Unicode that UTF-8 can carry, else ``PromptError`` saying where.
    Undecodable bytes arrive as lone surrogates (Python's ``surrogateescape`` for argv and a
    non-UTF-8 locale's stdin); the tokenizer could only fail on them obscurely."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError as e:
        ch = ord(text[e.start])
        if 0xDC80 <= ch <= 0xDCFF:
            why = f"invalid UTF-8 byte 0x{ch - 0xDC00:02x}"
        else:
            why = f"a lone surrogate U+{ch:04X}"
        raise PromptError(f"{what} is not valid UTF-8 text: {why} at character {e.start}") from None


def check_sampling(
    *,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    seed: Optional[int] = None,
    max_tokens: Optional[int] = None,
) -> None:
    """``ValueError`` naming the first setting out of range (NaN and infinity included)."""
    def number(v) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

    def integer(v) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    if not (number(temp) and temp >= 0):
        raise ValueError(f"temp must be a finite number >= 0, got {temp}")
    if not (number(top_p) and 0 <= top_p <= 1):
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not (number(min_p) and 0 <= min_p <= 1):
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if not (integer(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0, got {top_k}")
    if seed is not None and not (integer(seed) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed}")
    if max_tokens is not None and not (integer(max_tokens) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")


def context_limit(model: Any, max_context: Optional[int] = None) -> tuple[Optional[int], bool]:
    """``(tokens the context may hold, whether the model's max_position_embeddings cut
    max_context down)``."""
    model_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_context is None or model_max is None:
        return (model_max if max_context is None else max_context), False
    return min(model_max, max_context), max_context > model_max


@dataclass
class GenerationResponse:
    """One generated token, field for field mlx-lm's ``GenerationResponse`` plus two fields.

    ``prompt_tokens`` counts the tokens prefilled by this call (not earlier turns in the cache);
    ``context_tokens`` counts every token in the decode state after this one; ``reasoning``
    says whether ``text`` belongs to the reasoning rather than the answer; with drafts,
    ``draft_stats`` counts verify forwards and accepted drafts.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None
    reasoning: bool = False
    context_tokens: int = 0
    draft_stats: Optional[Any] = None  # SpeculativeStats of the generation so far (drafts only)


def cache_offset(cache: Optional[list]) -> int:
    """Tokens already held by a decode state (0 for None or a fresh one)."""
    return 0 if not cache else int(cache[0].offset)


def chat_prompt(
    tokenizer: Any,
    prompt: str,
    *,
    system: Optional[str] = None,
    thinking: bool = True,
    reasoning_effort: Optional[str] = None,
    context: Optional[list[dict]] = None,
) -> list[int]:
    """Token ids of one user turn in DeepSeek V4's chat format, ending with the assistant
    prefix (``<think>`` when thinking, ``</think>`` otherwise). ``context`` holds the earlier
    messages already in the decode state: only the new turn is rendered."""
    from .encoding import encode_messages

    check_text(prompt)
    if system is not None:
        check_text(system, "the system prompt")
    messages = [{"role": "user", "content": prompt}]
    if system and not context:
        messages.insert(0, {"role": "system", "content": system})
    text = encode_messages(
        messages, "thinking" if thinking else "chat", reasoning_effort, context=context or None
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def make_sampling(
    *,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: int = 20,
) -> tuple[Callable[["mx.array"], "mx.array"], list]:
    """mlx-lm's sampler and logits processors for these settings (``temp=0``: greedy)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p)
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return sampler, processors


def _prompt_ids(tokenizer: Any, prompt: Prompt, fresh: bool, vocab_size: Optional[int]) -> list[int]:
    import mlx.core as mx

    if isinstance(prompt, str):
        ids = list(tokenizer.encode(check_text(prompt), add_special_tokens=False))
        bos = getattr(tokenizer, "bos_token_id", None)
        if fresh and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)  # V4 adds no BOS itself, but a sequence must start with it
    else:
        if isinstance(prompt, mx.array):
            if not mx.issubdtype(prompt.dtype, mx.integer):
                raise PromptError(f"token ids must be integers, got an array of {prompt.dtype}")
            prompt = prompt.reshape(-1).tolist()
        ids = list(prompt)
        for i, t in enumerate(ids):
            if not isinstance(t, numbers.Integral) or isinstance(t, bool):
                raise PromptError(f"token id {t!r} at position {i} is not an integer")
        ids = [int(t) for t in ids]
    # an id past the embedding table would read outside it (a crash, not an error)
    for i, t in enumerate(ids):
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            top = f"0..{vocab_size - 1}" if vocab_size is not None else "ids >= 0"
            raise PromptError(f"token id {t} at position {i} is outside the model's vocabulary ({top})")
    return ids


def think_ids(tokenizer: Any) -> tuple[Optional[int], Optional[int]]:
    try:
        if getattr(tokenizer, "has_thinking", False):
            return tokenizer.think_start_id, tokenizer.think_end_id
    except ValueError:  # multi-token markers: not DeepSeek's
        pass
    return None, None


def stream_generate(
    model: "nn.Module",
    tokenizer: Any,
    prompt: Prompt,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temp: float = DEFAULT_TEMP,
    top_p: float = DEFAULT_TOP_P,
    top_k: int = DEFAULT_TOP_K,
    min_p: float = DEFAULT_MIN_P,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    sampler: Optional[Callable[["mx.array"], "mx.array"]] = None,
    logits_processors: Optional[list] = None,
    prompt_cache: Optional[list] = None,
    max_context: Optional[int] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    draft: Optional[Any] = None,
    num_draft_tokens: int = DEFAULT_DRAFT_TOKENS,
    steps: Optional[Callable[[list[int], Callable, Optional[list]], Iterator[tuple[int, "mx.array"]]]] = None,
) -> Iterator[GenerationResponse]:
    """Generate from ``prompt`` (text taken verbatim, token ids, or an ``mx.array``).

    A text prompt gets BOS in front when the decode state is empty and it has none; build chat
    prompts with ``chat_prompt``. ``sampler``/``logits_processors`` (mlx-lm callables) replace
    the ones made from ``temp``/``top_p``/``top_k``/``min_p``/``repetition_penalty``.
    ``prompt_cache`` (from ``model.make_cache()``) is extended in place: afterwards it holds
    the prompt and every generated token including a final EOS. ``max_context`` bounds prompt
    plus generation (default: the model's ``max_position_embeddings``); a prompt that does not
    fit raises ``ContextLengthError``, a generation that reaches it ends with "length".
    ``draft="mtp"`` decodes speculatively with the model's MTP block (load with ``mtp=True``),
    ``num_draft_tokens`` (1-3) drafts per verify forward: greedy output is the same token for
    token, sampled output follows the same distribution (a custom ``sampler`` cannot be used).
    ``steps(ids, sampler, logits_processors)``, if given, yields the (token, logprobs) pairs in
    place of mlx-lm's ``generate_step`` (the server's batched decoder runs the forwards).
    """
    import mlx.core as mx
    from mlx_lm.generate import generate_step, generation_stream, wired_limit

    check_sampling(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, max_tokens=max_tokens)
    if prompt_cache is None:
        prompt_cache = model.make_cache()
    start = cache_offset(prompt_cache)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = _prompt_ids(tokenizer, prompt, fresh=start == 0, vocab_size=vocab_size)
    if not ids:
        raise ValueError("the prompt is empty")
    limit, _ = context_limit(model, max_context)
    if limit is not None:
        room = limit - start - len(ids)
        if room < 1:
            held = f" after {start} tokens already in context" if start else ""
            model_max = getattr(model.config, "max_position_embeddings", None)
            advice = ("shorten the prompt: the model's maximum context (max_position_embeddings) is "
                      f"{model_max} tokens" if limit == model_max else
                      "raise --ctx or shorten the prompt" + (f"; the model allows at most {model_max}"
                                                             if model_max is not None else ""))
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens{held}, more than the context of {limit} tokens allows "
                f"({advice})"
            )
        max_tokens = min(max_tokens, room)
    custom_sampler = sampler is not None
    if sampler is None or logits_processors is None:
        made_sampler, made_processors = make_sampling(
            temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty
        )
        sampler = sampler or made_sampler
        logits_processors = made_processors if logits_processors is None else logits_processors
    if seed is not None:
        mx.random.seed(seed)

    think_start, think_end = think_ids(tokenizer)
    eos_ids = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    reasoning = think_start is not None and ids[-1] == think_start
    detokenizer = tokenizer.detokenizer
    stats = None
    if steps is not None:
        if draft is not None:
            raise ValueError("steps and draft cannot be combined")
        steps = ((t, lp, False) for t, lp in steps(ids, sampler, logits_processors or None))
    elif draft is None:
        steps = ((t, lp, False) for t, lp in generate_step(
            mx.array(ids),
            model,
            generation_stream,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=logits_processors or None,
            prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size,
            prompt_progress_callback=prompt_progress_callback,
        ))
    else:
        from .speculative import Sampling, SpeculativeStats, make_drafter, speculative_generate_step

        if custom_sampler:
            raise ValueError("speculative decoding needs the sampling distribution: give temp/top_p/top_k/"
                             "min_p instead of a sampler")
        stats = SpeculativeStats()
        steps = speculative_generate_step(
            mx.array(ids, dtype=mx.int32), model, make_drafter(draft), num_draft_tokens=num_draft_tokens,
            max_tokens=max_tokens, sampling=Sampling(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k),
            logits_processors=logits_processors or None, prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size, prompt_progress_callback=prompt_progress_callback, stats=stats,
        )

    def response(text, token, logprobs, n, finish=None, channel=None):
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=len(ids),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            reasoning=reasoning if channel is None else channel,
            context_tokens=start + len(ids) + n,
            draft_stats=stats,
        )

    mx.reset_peak_memory()
    prompt_tps = 0.0
    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        n = 0
        for n, (token, logprobs, from_draft) in enumerate(steps, start=1):
            # NaN/Inf logits (damaged weights, an overflow) sample noise: stop before any text
            if not mx.all(mx.isfinite(logprobs)).item():
                raise NonFiniteLogitsError(
                    f"the model produced NaN or Inf logits at generated token {n}; the weights "
                    "are damaged or the computation overflowed (generation stopped)"
                )
            if n == 1:
                prompt_tps = len(ids) / max(time.perf_counter() - tic, 1e-9)
                tic = time.perf_counter()
            if token in eos_ids:
                detokenizer.finalize()
                yield response(detokenizer.last_segment, token, logprobs, n, "stop")
                return
            if token in (think_start, think_end):
                # flush the channel that ends here, then start the other one afresh
                detokenizer.finalize()
                text, channel = detokenizer.last_segment, reasoning
                detokenizer.reset()
                reasoning = token == think_start
            else:
                detokenizer.add_token(token)
                text, channel = None, None
            if n == max_tokens:
                detokenizer.finalize()
                yield response((text or "") + detokenizer.last_segment, token, logprobs, n, "length", channel)
                return
            yield response(detokenizer.last_segment if text is None else text, token, logprobs, n, None, channel)


def generate(model: "nn.Module", tokenizer: Any, prompt: Prompt, *, verbose: bool = False, **kwargs) -> str:
    """The completion as the model wrote it (without EOS): reasoning, if any, is closed by
    ``</think>``, so ``ds4mlx.parse_completion`` splits it. Keyword arguments are those of
    ``stream_generate``."""
    think_start, think_end = think_ids(tokenizer)
    markers = {think_start: getattr(tokenizer, "think_start", None), think_end: getattr(tokenizer, "think_end", None)}
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        text += response.text
        if response.token in markers and response.finish_reason != "stop":
            text += markers[response.token] or ""
        if verbose:
            print(response.text, end="", flush=True)
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_stats(response: GenerationResponse) -> str:
    """One line: prompt tokens and prefill speed, generated tokens and speed, peak memory, and
    with drafts their acceptance and tokens per verify forward."""
    line = (
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s | "
        f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s | "
        f"Peak memory: {response.peak_memory:.2f} GB"
    )
    if response.draft_stats is not None:
        line += f" | {response.draft_stats.format()}"
    return line


def batch_generate(
    model: "nn.Module",
    tokenizer: Any,
    prompts: Sequence[Prompt],
    prompt_caches: Optional[list[list]] = None,
    max_tokens: Union[int, list[int]] = 128,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    **kwargs: Any,
) -> Any:
    """Decode several prompts together (mlx-lm's ``batch_generate``: same arguments, its
    ``BatchResponse``; keyword arguments go to its ``BatchGenerator``). Each weight is read once
    per step for the whole batch, and each sequence keeps its own position, so a sequence gets
    the tokens it gets alone. A prompt may also be text (taken verbatim, BOS in front as in
    ``generate``) or an ``mx.array``; ids are checked against the vocabulary first. The
    returned prompt caches are per-sequence ``model.make_cache()`` lists."""
    from mlx_lm.generate import batch_generate as _batch_generate

    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    caches = list(prompt_caches) if prompt_caches is not None else [None] * len(prompts)
    if len(caches) != len(prompts):
        raise ValueError(f"{len(caches)} prompt caches for {len(prompts)} prompts")
    ids = [_prompt_ids(tokenizer, p, fresh=cache_offset(c) == 0, vocab_size=vocab_size)
           for p, c in zip(prompts, caches)]
    for i, p in enumerate(ids):
        if not p:
            raise PromptError(f"prompt {i} is empty")
    if isinstance(max_tokens, numbers.Integral):
        check_sampling(max_tokens=int(max_tokens))
    else:
        if len(max_tokens) != len(ids):
            raise ValueError(f"{len(max_tokens)} max_tokens for {len(ids)} prompts")
        for m in max_tokens:
            check_sampling(max_tokens=m)
    return _batch_generate(model, tokenizer, ids, prompt_caches=prompt_caches, max_tokens=max_tokens,
                           verbose=verbose, return_prompt_caches=return_prompt_caches,
                           return_token_ids=return_token_ids, return_logprobs=return_logprobs, **kwargs)
