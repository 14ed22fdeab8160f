"""Request fields: what the server does not implement gets a 400 naming the field, never an
answer that silently ignores it (log probabilities, several choices, images, penalties,
echo/suffix), while the fields' no-op values are accepted; the fields it does take are obeyed
(``max_completion_tokens``, Anthropic's ``thinking.budget_tokens``), and Anthropic streams come
in Anthropic's event order."""

from __future__ import annotations

import httpx
import pytest

from ds4mlx import encoding
from ds4mlx.generate import generate
from ds4mlx.server import BackgroundServer, build_app

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

USER = [{"role": "user", "content": "hi"}]
IMAGE = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
REFUSED_CHAT = [
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": USER, "n": 3}, "n"),
    ({"messages": IMAGE}, "messages[0].content[1].type"),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": USER, "frequency_penalty": -1}, "frequency_penalty"),
    ({"messages": USER, "logit_bias": {"5": 10}}, "logit_bias"),
    ({"messages": USER, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
]
REFUSED_COMPLETIONS = [
    ({"prompt": "hi", "logprobs": 2}, "logprobs"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "suffix": "end"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "n": 2}, "n"),
]
REFUSED_ANTHROPIC = [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0].type"),
]


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    with BackgroundServer(build_app(model, tok, model_id="demo", ctx=512, cache_bytes=0)) as srv:
        yield srv


def test_unimplemented_fields_are_refused_by_name(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for route, cases in (("/v1/chat/completions", REFUSED_CHAT), ("/v1/completions", REFUSED_COMPLETIONS)):
            for body, field in cases:
                r = http.post(route, json={"model": "demo", "max_tokens": 1, **body})
                assert r.status_code == 400, (route, body, r.text)
                err = r.json()["error"]
                assert err["param"] == field and f"'{field}'" in err["message"], (body, err)
        for body, field in REFUSED_ANTHROPIC:
            r = http.post("/v1/messages", json={"model": "demo", "max_tokens": 1, **body})
            assert r.status_code == 400 and r.json()["type"] == "error", r.text
            assert f"'{field}'" in r.json()["error"]["message"], r.text


def test_no_op_values_of_those_fields_are_accepted(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="demo", messages=USER, max_tokens=1, temperature=0, n=1, logprobs=False,
                                       presence_penalty=0.0, frequency_penalty=0, logit_bias={}, modalities=["text"])
    assert r.usage.completion_tokens == 1 and r.choices[0].logprobs is None
    c = client.completions.create(model="demo", prompt="hi", max_tokens=1, temperature=0, echo=False, best_of=1)
    assert c.usage.completion_tokens == 1


def test_max_completion_tokens_bounds_the_answer(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="demo", messages=USER, max_completion_tokens=3, max_tokens=9,
                                       temperature=0, extra_body={"thinking": {"type": "disabled"}})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_anthropic_thinking_budget_ends_reasoning_and_stream_order(demo, server):
    model, tok = demo
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    ids = list(tok.encode(encoding.encode_messages(question, "thinking"), add_special_tokens=False))
    free = encoding.parse_completion(generate(model, tok, ids, temp=0.0, max_tokens=8), "thinking")
    first2 = encoding.parse_completion(generate(model, tok, ids, temp=0.0, max_tokens=2), "thinking")
    assert encoding.THINK_END not in generate(model, tok, ids, temp=0.0, max_tokens=2)
    kwargs = dict(model="demo", max_tokens=8, messages=question, thinking={"type": "enabled", "budget_tokens": 2},
                  extra_body={"temperature": 0})
    m = client.messages.create(**kwargs)
    [thinking] = [b.thinking for b in m.content if b.type == "thinking"]
    # the first two reasoning tokens are the free run's; then </think> and the answer
    assert thinking == first2["reasoning_content"] != free["reasoning_content"]
    assert m.usage.output_tokens == 8
    with client.messages.stream(**kwargs) as stream:
        kinds = [(e.type, getattr(getattr(e, "content_block", None), "type", None)) for e in stream]
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in m.content]
    # message_start, ping, then each block as start, deltas, stop; message_delta; message_stop
    names = [k for k, _ in kinds if k in ("message_start", "content_block_start", "content_block_delta",
                                          "content_block_stop", "message_delta", "message_stop")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks, open_block = [], False
    for k, block in kinds:
        if k == "content_block_start":
            assert not open_block
            open_block = True
            blocks.append(block)
        elif k == "content_block_delta":
            assert open_block
        elif k == "content_block_stop":
            assert open_block
            open_block = False
    assert not open_block and blocks[0] == "thinking"
