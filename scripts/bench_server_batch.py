"""Aggregate throughput of ``ds4mlx serve`` with concurrent clients: requests decoded together
(``--max-batch 8``) against one at a time (``--max-batch 1``), side by side in one run.

Both servers run in this process on 127.0.0.1 over the same loaded model; each round sends the
same N greedy requests at once to one server, then to the other (interleaved), and counts the
completion tokens the clients received per second of wall time. Usage:

    python scripts/bench_server_batch.py --model demo --clients 8 --max-tokens 48 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


def one_round(url: str, prompts: list[str], max_tokens: int) -> tuple[float, int, list[str]]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="-", timeout=3600, max_retries=0)
    answers: list[str] = [""] * len(prompts)
    tokens = [0] * len(prompts)

    def ask(i: int) -> None:
        r = client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompts[i]}],
                                           max_tokens=max_tokens, temperature=0.0,
                                           extra_body={"chat_template_kwargs": {"thinking": False}})
        answers[i] = r.choices[0].message.content or ""
        tokens[i] = r.usage.completion_tokens

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, sum(tokens), answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from ds4mlx import load
    from ds4mlx.server import BackgroundServer, build_app

    model, tok = load(args.model)
    prompts = [f"Client {i} asks: describe step {i} of loading a model." for i in range(args.clients)]
    # no prefix cache, so each round prefills the same work on both servers
    apps = {b: build_app(model, tok, model_id="bench", cache_bytes=0, max_batch=b) for b in (1, 8)}
    rates: dict[int, list[float]] = {1: [], 8: []}
    with BackgroundServer(apps[1]) as one, BackgroundServer(apps[8]) as batched:
        servers = {1: one, 8: batched}
        for b in (1, 8):  # warm-up: compile the step functions, untimed
            one_round(servers[b].url, prompts[:2], 4)
        answers = {}
        for _ in range(args.rounds):
            for b in (1, 8):
                wall, n, got = one_round(servers[b].url, prompts, args.max_tokens)
                rates[b].append(n / wall)
                answers[b] = got
    same = answers[1] == answers[8]
    med = {b: statistics.median(v) for b, v in rates.items()}
    print(f"{args.clients} concurrent greedy requests of {args.max_tokens} tokens, {args.rounds} interleaved rounds:")
    for b in (1, 8):
        runs = ", ".join(f"{r:.1f}" for r in rates[b])
        print(f"  --max-batch {b}: {med[b]:7.1f} tokens/s aggregate (median; rounds {runs})")
    print(f"  batched / one at a time: {med[8] / med[1]:.2f}x; same answers: {same}")
    print(json.dumps({"tokens_per_s_max_batch_1": round(med[1], 2), "tokens_per_s_max_batch_8": round(med[8], 2),
                      "ratio": round(med[8] / med[1], 3), "same_answers": same}))


if __name__ == "__main__":
    main()
