"""What the server does not implement gets a 400 naming the field, never an answer that
silently ignores it (log probabilities, several choices, images, penalties, echo/suffix); the
fields' no-op values are accepted, and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

from ds4mlx.server import BackgroundServer, build_app

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
