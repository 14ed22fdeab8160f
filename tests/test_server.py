"""``ds4mlx serve`` driven by the real openai and anthropic clients on 127.0.0.1 (demo model,
float32). References: ``ds4mlx.generate`` on the same prompt with a fresh state, the official
encoder's rendering (``encode_messages``), and streaming == non-streaming."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ds4mlx import encoding
from ds4mlx.generate import generate
from ds4mlx.server import BackgroundServer, build_app
from ds4mlx.server.engine import ForceContent

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")

N = 6  # generated tokens per request: the demo model costs ~0.1 s a token on a shared CPU
CTX = 1536
SCRIPT: list[int] = []  # when set, the model's answer is forced to these tokens (a scripted model)


def _scripted(job, passed):
    return [ForceContent(list(SCRIPT), passed, None)] if SCRIPT else []


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    app = build_app(model, tok, model_id="demo", ctx=CTX, processors=_scripted)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def anth(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def ids_of(tok, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


def reference(demo, messages, mode="thinking", tools=None, n=N) -> dict:
    """What ds4mlx.generate answers (greedy, fresh state) for these messages, parsed."""
    model, tok = demo
    ids = ids_of(tok, encoding.encode_messages(messages, mode, tools=tools))
    return encoding.parse_completion(generate(model, tok, ids, temp=0.0, max_tokens=n), mode) | {"n_prompt": len(ids)}


def collect_openai_stream(stream):
    reasoning, content, calls, finish, usage = "", "", {}, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            d = choice.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            for c in d.tool_calls or []:
                entry = calls.setdefault(c.index, {"id": c.id, "name": "", "arguments": ""})
                entry["name"] += c.function.name or ""
                entry["arguments"] += c.function.arguments or ""
            finish = choice.finish_reason or finish
    return reasoning, content, [calls[i] for i in sorted(calls)], finish, usage


MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


# ----------------------------------------------------------------------------- OpenAI


def test_models(oai):
    assert [m.id for m in oai.models.list().data] == ["demo"]


@pytest.mark.parametrize("mode", ["thinking", "chat"])
def test_chat_equals_generate_and_stream_equals_whole(demo, oai, mode):
    ref = reference(demo, MESSAGES, mode)
    extra = {"thinking": {"type": "enabled" if mode == "thinking" else "disabled"}}
    r = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, temperature=0, extra_body=extra)
    msg = r.choices[0].message
    assert (msg.reasoning_content or "") == ref["reasoning_content"]
    assert (msg.content or "") == ref["content"]
    assert r.usage.prompt_tokens == ref["n_prompt"] and r.usage.completion_tokens == N
    assert r.choices[0].finish_reason == "length"
    stream = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body=extra)
    reasoning, content, calls, finish, usage = collect_openai_stream(stream)
    assert (reasoning, content, calls, finish) == (ref["reasoning_content"], ref["content"], [], "length")
    assert usage.prompt_tokens == ref["n_prompt"]


def test_second_turn_reuses_prefix_and_matches_fresh_prefill(demo, oai):
    extra = {"thinking": {"type": "disabled"}}
    turn1 = [{"role": "user", "content": "Write a short poem about the sea."}]
    r1 = oai.chat.completions.create(model="demo", messages=turn1, max_tokens=N, temperature=0, extra_body=extra)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "Thank you, that was helpful. One more?"}]
    r2 = oai.chat.completions.create(model="demo", messages=turn2, max_tokens=N, temperature=0, extra_body=extra)
    ref = reference(demo, turn2, "chat")
    assert r2.choices[0].message.content == ref["content"]
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # at least the whole first prompt (the snapshot after <｜Assistant｜> or the end of turn 1)
    assert cached >= r1.usage.prompt_tokens - 1 and cached < r2.usage.prompt_tokens


def test_seeded_sampling_equals_generate(demo, oai):
    model, tok = demo
    ids = ids_of(tok, encoding.encode_messages(MESSAGES, "chat"))
    want = encoding.parse_completion(generate(model, tok, ids, temp=0.9, top_p=0.95, seed=7, max_tokens=N), "chat")
    for _ in range(2):
        r = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, temperature=0.9, top_p=0.95,
                                        seed=7, extra_body={"thinking": {"type": "disabled"}})
        assert r.choices[0].message.content == want["content"]


def test_stop_string_cuts_the_answer(demo, oai):
    extra = {"thinking": {"type": "disabled"}}
    full = reference(demo, MESSAGES, "chat")["content"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip() and len(full) > 4
    r = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, temperature=0, stop=[stop],
                                    extra_body=extra)
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=N, temperature=0, stop=[stop],
                                         stream=True, extra_body=extra)
    assert collect_openai_stream(stream)[1] == full[: full.index(stop)]


def test_completions_equal_generate(demo, oai):
    model, tok = demo
    prompt = "The quick brown fox"
    want = generate(model, tok, prompt, temp=0.0, max_tokens=N)
    r = oai.completions.create(model="demo", prompt=prompt, max_tokens=N, temperature=0)
    assert r.choices[0].text == want and r.usage.completion_tokens == N
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model="demo", prompt=prompt, max_tokens=N, temperature=0, stream=True) if c.choices)
    assert streamed == want


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def _script(tok, text: str) -> None:
    SCRIPT[:] = ids_of(tok, text) + [tok.eos_token_id]


@pytest.mark.slow
def test_openai_tool_call_round_trip(demo, oai):
    model, tok = demo
    call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
    answer = "check the weather" + encoding.THINK_END + "\n\n" + encoding.render_tool_calls([call])
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    _script(tok, answer)
    try:
        r = oai.chat.completions.create(model="demo", messages=messages, tools=TOOLS, max_tokens=200, temperature=0)
        s = collect_openai_stream(oai.chat.completions.create(
            model="demo", messages=messages, tools=TOOLS, max_tokens=200, temperature=0, stream=True))
    finally:
        SCRIPT.clear()
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.reasoning_content == "check the weather"
    [tc] = choice.message.tool_calls
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris", "days": 2}
    assert s[0] == "check the weather" and s[3] == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in s[2]] == [("get_weather", {"city": "Paris", "days": 2})]

    # the tool result goes back in; with tools every turn keeps its reasoning, so the whole
    # first turn (prompt + scripted answer) is a cached prefix of the second
    turn2 = messages + [
        {"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
         "tool_calls": [{"id": tc.id, "type": "function",
                         "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
        {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 21 C"}]
    r2 = oai.chat.completions.create(model="demo", messages=turn2, tools=TOOLS, max_tokens=N, temperature=0)
    ref = reference(demo, turn2, tools=TOOLS)
    assert r2.usage.prompt_tokens == ref["n_prompt"]
    assert (r2.choices[0].message.reasoning_content or "") == ref["reasoning_content"]
    assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens + r.usage.completion_tokens - 1


def test_parallel_tool_calls_off_keeps_the_first_call(demo, oai, anth):
    """A model that answers two calls: both by default, the first alone when the request turns
    parallel calls off (OpenAI ``parallel_tool_calls``, Anthropic ``disable_parallel_tool_use``)."""
    from ds4mlx.server.channels import ChannelSplitter

    _, tok = demo
    calls = [{"function": {"name": "a", "arguments": json.dumps({"x": 1})}}, {"function": {"name": "b", "arguments": "{}"}}]
    text = "\n\n" + encoding.render_tool_calls(calls)
    for limit, names in ((None, ["a", "b"]), (1, ["a"])):
        splitter = ChannelSplitter(False, limit)
        splitter.feed(text)
        message = splitter.finish()[2]
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
            [(c["function"]["name"], c["function"]["arguments"]) for c in calls if c["function"]["name"] in names]
    # through both APIs (calls without arguments: the demo tokenizer spells DSML letter by letter)
    _script(tok, "\n\n" + encoding.render_tool_calls([{"function": {"name": n, "arguments": "{}"}} for n in "ab"]))
    try:
        first = oai.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "go"}], max_tokens=100, temperature=0,
            tools=[{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in "ab"],
            parallel_tool_calls=False, extra_body={"thinking": {"type": "disabled"}}).choices[0]
        m = anth.messages.create(model="demo", max_tokens=100, messages=[{"role": "user", "content": "go"}],
                                 tools=[{"name": n, "input_schema": {"type": "object"}} for n in "ab"],
                                 tool_choice={"type": "auto", "disable_parallel_tool_use": True},
                                 extra_body={"temperature": 0})
    finally:
        SCRIPT.clear()
    assert first.finish_reason == "tool_calls" and [c.function.name for c in first.message.tool_calls] == ["a"]
    assert m.stop_reason == "tool_use" and [b.name for b in m.content if b.type == "tool_use"] == ["a"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "go"}], max_tokens=1,
                                    extra_body={"parallel_tool_calls": "no"})
    assert "parallel_tool_calls" in str(e.value)


@pytest.mark.slow
def test_forced_tool_choice_opens_a_tool_call(demo, oai):
    _, tok = demo
    forced = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = oai.chat.completions.create(model="demo", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
                                    max_tokens=len(ids_of(tok, forced)) + 1, temperature=0,
                                    extra_body={"thinking": {"type": "disabled"}})
    # the demo model writes noise after the forced opening, so the block stays unparsed text
    assert (r.choices[0].message.content or "").startswith(forced)


def test_response_format_is_rendered_on_the_system_prompt(demo, oai):
    _, tok = demo
    schema = {"name": "answer", "schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    r = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=1, temperature=0,
                                    response_format={"type": "json_schema", "json_schema": schema})
    rendered = [{**MESSAGES[0], "response_format": schema}, MESSAGES[1]]
    assert r.usage.prompt_tokens == len(ids_of(tok, encoding.encode_messages(rendered)))
    assert r.usage.prompt_tokens > len(ids_of(tok, encoding.encode_messages(MESSAGES)))


def test_prompt_longer_than_ctx_is_refused(oai, anth):
    long = "one two three " * 600
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": long}], max_tokens=2)
    assert f"{CTX} tokens" in str(e.value) and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="demo", prompt=long, max_tokens=2)
    assert f"{CTX} tokens" in str(e.value) and e.value.status_code == 400
    with pytest.raises(anthropic.BadRequestError) as e:
        anth.messages.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": long}])
    assert f"{CTX} tokens" in str(e.value) and e.value.status_code == 400
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


# ----------------------------------------------------------------------------- Anthropic


def test_anthropic_messages_equal_generate_and_stream(demo, anth):
    ref = reference(demo, MESSAGES, "thinking")
    kwargs = dict(model="demo", max_tokens=N, system=MESSAGES[0]["content"], messages=MESSAGES[1:],
                  thinking={"type": "enabled", "budget_tokens": 64}, extra_body={"temperature": 0})
    m = anth.messages.create(**kwargs)
    thinking = [b.thinking for b in m.content if b.type == "thinking"]
    text = "".join(b.text for b in m.content if b.type == "text")
    assert thinking == ([ref["reasoning_content"]] if ref["reasoning_content"] else []) and text == ref["content"]
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == N
    assert m.usage.input_tokens + m.usage.cache_read_input_tokens == ref["n_prompt"]
    kinds = []
    with anth.messages.stream(**kwargs) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in m.content]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert final.stop_reason == m.stop_reason


def test_anthropic_second_turn_reads_cache(demo, anth):
    kwargs = dict(model="demo", max_tokens=N, extra_body={"temperature": 0})
    turn1 = [{"role": "user", "content": "Explain how a transformer works in simple words."}]
    m1 = anth.messages.create(messages=turn1, **kwargs)
    turn2 = turn1 + [{"role": "assistant", "content": m1.content[0].text},
                     {"role": "user", "content": [{"type": "text", "text": "And in one line?"}]}]
    m2 = anth.messages.create(messages=turn2, **kwargs)
    ref = reference(demo, [{"role": "user", "content": turn1[0]["content"]},
                           {"role": "assistant", "content": m1.content[0].text},
                           {"role": "user", "content": "And in one line?"}], "chat")
    assert "".join(b.text for b in m2.content if b.type == "text") == ref["content"]
    assert m2.usage.cache_read_input_tokens >= m1.usage.input_tokens + m1.usage.cache_read_input_tokens - 1


@pytest.mark.slow
def test_anthropic_tool_use_round_trip(demo, anth):
    _, tok = demo
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    call = {"function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}
    _script(tok, "\n\n" + encoding.render_tool_calls([call]))
    kwargs = dict(model="demo", max_tokens=200, tools=tools, messages=[{"role": "user", "content": "Oslo?"}],
                  extra_body={"temperature": 0})
    try:
        m = anth.messages.create(**kwargs)
        with anth.messages.stream(**kwargs) as stream:
            final = stream.get_final_message()
    finally:
        SCRIPT.clear()
    [use] = [b for b in m.content if b.type == "tool_use"]
    assert m.stop_reason == "tool_use" and use.name == "get_weather" and use.input == {"city": "Oslo"}
    [suse] = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and (suse.name, suse.input) == (use.name, use.input)
    turn2 = kwargs["messages"] + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "snow, -3 C"}]}]
    m2 = anth.messages.create(**{**kwargs, "messages": turn2, "max_tokens": N})
    expected = [{"role": "user", "content": "Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": use.id, "type": "function", "function": {"name": "get_weather",
                                                                    "arguments": json.dumps({"city": "Oslo"})}}]},
                {"role": "tool", "tool_call_id": use.id, "content": "snow, -3 C"}]
    oa_tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": tools[0]["input_schema"]}}]
    ref = reference(demo, expected, "chat", tools=oa_tools)
    assert m2.usage.input_tokens + m2.usage.cache_read_input_tokens == ref["n_prompt"]
    assert "".join(b.text for b in m2.content if b.type == "text") == ref["content"]
    assert m2.usage.cache_read_input_tokens > 0


# ----------------------------------------------------------------------------- bad input, cancel, load

BAD_OPENAI = [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"model": "demo"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": True}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -3}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools[0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "yaml"}}, "response_format.type"),
]
BAD_ANTHROPIC = [
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "system", "content": "hi"}]}, "messages[0].role"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages[0].content[0].type"),
    ({"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     "temperature"),
]


def test_bad_requests_get_4xx_naming_the_field_and_server_keeps_serving(server, oai):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for body, field in BAD_OPENAI:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = http.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kw)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == field and (field is None or f"'{field}'" in err["message"]), (body, err)
        for body, field in BAD_ANTHROPIC:
            r = http.post("/v1/messages", json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()
            assert err["type"] == "error" and field in err["error"]["message"], (body, err)
        assert http.get("/v1/nothing").status_code == 404
        assert http.get("/v1/chat/completions").status_code == 405
        assert http.post("/v1/completions", json={"prompt": [5, 10**6]}).json()["error"]["param"] == "prompt[1]"
    r = oai.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


def test_disconnect_cancels_generation(server, oai):
    engine = server.app.state.engine
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "temperature": 0, "stream": True, "thinking": {"type": "disabled"}}
    done = engine.jobs_done
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data:") and '"content"' in line:
                    seen += 1
                if seen >= 3:
                    break
    deadline = time.time() + 30
    while engine.jobs_done == done and time.time() < deadline:
        time.sleep(0.05)
    assert engine.last.finish_reason == "cancelled"
    assert engine.last.completion_tokens < 40  # stopped within a few tokens, not at 400


@pytest.mark.slow
def test_concurrent_clients_get_their_own_answers(demo, server, oai):
    engine = server.app.state.engine
    engine.most_together = 0
    prompts = [f"Question number {i}: how many days are there in a leap year?" for i in range(8)]
    extra = {"thinking": {"type": "disabled"}}
    want = {p: reference(demo, [{"role": "user", "content": p}], "chat", n=3)["content"] for p in prompts}
    got, errors = {p: [] for p in prompts}, []

    def client(p):
        try:
            for _ in range(5):
                r = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": p}], max_tokens=3,
                                                temperature=0, extra_body=extra)
                got[p].append(r.choices[0].message.content)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    for p in prompts:
        assert got[p] == [want[p]] * 5
    assert engine.most_together > 1  # requests were decoded together


@pytest.mark.parametrize("max_batch", [1, 8])
def test_cancel_stops_within_a_token(demo, max_batch):
    # The cancel is set from the model thread while token K is sampled (a logits processor),
    # alone and in a batch: the job ends with at most one more token, not at max_tokens.
    import asyncio

    from ds4mlx.server.engine import Engine, Job

    model, tok = demo
    K = 5

    class CancelAt:
        def __init__(self, job):
            self.job, self.calls = job, 0

        def __call__(self, history, logits):
            self.calls += 1
            if self.calls == K:
                self.job.cancel.set()
            return logits

    engine = Engine(model, tok, max_batch=max_batch, processors=lambda job, passed: [CancelAt(job)])

    async def run():
        jobs = [Job(ids_of(tok, f"Tell me a long story, number {i}."), max_tokens=200, temp=0.0) for i in range(2)]
        queues = [engine.submit(job) for job in jobs]
        results = []
        for events in queues:
            while (event := await events.get())[0] not in ("done", "error"):
                pass
            assert event[0] == "done", event
            results.append(event[1])
        return results

    try:
        results = asyncio.run(run())
    finally:
        engine.close()
    assert [r.finish_reason for r in results] == ["cancelled"] * 2
    assert all(K - 1 <= r.completion_tokens <= K + 1 for r in results), [r.completion_tokens for r in results]
    assert (engine.most_together == 2) if max_batch > 1 else engine.most_together == 0
