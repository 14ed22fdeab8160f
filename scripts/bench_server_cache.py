"""Time to first token of each turn of a growing conversation, with and without the prefix cache.

Two ``ds4mlx serve`` apps run side by side on 127.0.0.1 (one with the prefix cache, one with
it off) and get the same conversation through the real openai client, greedy, streaming. For
each turn: prompt tokens, tokens the cache saved from prefill, time to the first streamed
token on each server and their ratio, and whether both answers are identical.

    python scripts/bench_server_cache.py --model demo --turns 6 --words 250
"""

from __future__ import annotations

import argparse
import random
import time


def ttft(client, messages, max_tokens: int) -> tuple[float, str, int, int]:
    """(seconds to the first token, answer, prompt tokens, cached tokens)."""
    tic = time.perf_counter()
    first, answer, usage = None, "", None
    stream = client.chat.completions.create(
        model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"thinking": {"type": "disabled"}})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            if first is None and (d.content or getattr(d, "reasoning_content", None) or choice.finish_reason):
                first = time.perf_counter() - tic
            answer += d.content or ""
    return first, answer, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--words", type=int, default=250, help="Words per user message.")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=32768)
    args = ap.parse_args()

    import openai

    from ds4mlx import load
    from ds4mlx.server import BackgroundServer, build_app

    model, tok = load(args.model)
    rng = random.Random(0)
    vocab = ("the model reads the prompt in chunks and keeps its decode state between calls while "
             "experts route every token and compressed rows summarise the context").split()
    cached_app = build_app(model, tok, model_id="bench", ctx=args.ctx)
    plain_app = build_app(model, tok, model_id="bench", ctx=args.ctx, cache_bytes=0)
    print("turn | prompt tok | cached tok | TTFT no cache (s) | TTFT cache (s) | speed-up | same answer")
    with BackgroundServer(cached_app) as with_cache, BackgroundServer(plain_app) as without:
        clients = [openai.OpenAI(base_url=s.url + "/v1", api_key="-", timeout=3600, max_retries=0)
                   for s in (without, with_cache)]
        for client in clients:  # warm-up, untimed and unrelated to the conversation: compile the steps
            ttft(client, [{"role": "user", "content": "warm up"}], 2)
        messages = [{"role": "system", "content": "You are a careful coding assistant."}]
        for turn in range(1, args.turns + 1):
            words = " ".join(rng.choice(vocab) for _ in range(args.words))
            messages.append({"role": "user", "content": f"Turn {turn}: {words}"})
            t_plain, a_plain, n_prompt, _ = ttft(clients[0], messages, args.max_tokens)
            t_cache, a_cache, _, cached = ttft(clients[1], messages, args.max_tokens)
            print(f"{turn:4d} | {n_prompt:10d} | {cached:10d} | {t_plain:17.3f} | {t_cache:14.3f} | "
                  f"{t_plain / max(t_cache, 1e-9):7.2f}x | {a_plain == a_cache}", flush=True)
            messages.append({"role": "assistant", "content": a_cache})


if __name__ == "__main__":
    main()
