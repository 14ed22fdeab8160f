"""DeepSeek V4 chat encoding and completion parsing.

References: the official encoder's test vectors (byte for byte), the message inputs they were
made from, and literal strings of the official format written out here.
"""

import json
from pathlib import Path

import pytest

from ds4mlx.encoding import DSMLError, apply_chat_template, encode_messages, parse_completion

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "encoding"

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
MAX_PREAMBLE = (  # typed from the official encoder's REASONING_EFFORT_MAX
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to "
    "resolve the root cause, rigorously stress-testing your logic against all potential paths, "
    "edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate "
    "step, considered alternative, and rejected hypothesis to ensure absolutely no assumption "
    "is left unchecked.\n\n"
)


def load_case(n):
    if not VECTORS.is_dir():
        pytest.skip(f"{VECTORS} not present")
    data = json.loads((VECTORS / f"case_{n}_input.json").read_text(encoding="utf-8"))
    expected = (VECTORS / f"case_{n}_expected.txt").read_text(encoding="utf-8")
    if isinstance(data, dict):  # case 1: the tools belong to the first message
        messages = [dict(m) for m in data["messages"]]
        messages[0]["tools"] = data["tools"]
        return messages, data["tools"], expected
    return data, None, expected


def assistant_turns(prompt):
    """(mode, completion text up to and incl. EOS) for every assistant turn of a prompt."""
    turns, pos = [], prompt.find(ASSISTANT)
    while pos >= 0:
        start = pos + len(ASSISTANT)
        end = prompt.index(EOS, start) + len(EOS)
        body = prompt[start:end]
        if body.startswith("<think>"):
            turns.append(("thinking", body[len("<think>") :]))
        else:
            assert body.startswith("</think>")
            turns.append(("chat", body[len("</think>") :]))
        pos = prompt.find(ASSISTANT, end)
    return turns


@pytest.mark.parametrize("case", [1, 2])
def test_official_vectors_byte_for_byte(case):
    messages, _, expected = load_case(case)
    assert encode_messages(messages, thinking_mode="thinking") == expected


def test_request_level_tools_go_on_the_system_message():
    messages, tools, expected = load_case(1)
    plain = [{k: v for k, v in m.items() if k != "tools"} for m in messages]
    assert encode_messages(plain, "thinking", tools=tools) == expected


@pytest.mark.parametrize("case", [1, 2])
def test_assistant_turns_parse_back(case):
    messages, _, expected = load_case(case)
    replies = [m for m in messages if m["role"] == "assistant"]
    turns = assistant_turns(expected)
    assert len(turns) == len(replies)
    for (mode, text), reply in zip(turns, replies):
        parsed = parse_completion(text, thinking_mode=mode, strict=True)
        # A turn rendered without <think> had its reasoning dropped (case 2, first turn).
        want_reasoning = reply.get("reasoning_content", "") if mode == "thinking" else ""
        assert parsed["reasoning_content"] == want_reasoning
        assert parsed["content"] == (reply.get("content") or "")
        want_calls = reply.get("tool_calls") or []
        assert [c["function"]["name"] for c in parsed["tool_calls"]] == [
            c["function"]["name"] for c in want_calls
        ]
        for got, want in zip(parsed["tool_calls"], want_calls):
            assert got["type"] == "function" and got["id"]
            assert json.loads(got["function"]["arguments"]) == json.loads(
                want["function"]["arguments"]
            )
    if case == 2:  # earlier reasoning is dropped, the last turn keeps its own
        assert turns[0][0] == "chat" and turns[1][0] == "thinking"


def test_api_prompt_form():
    # BOS + user marker + text + assistant marker + </think> (the hosted API, thinking off).
    prompt = encode_messages([{"role": "user", "content": "Who was Ada?"}], thinking_mode="chat")
    assert prompt == f"{BOS}{USER}Who was Ada?{ASSISTANT}</think>"
    prompt = encode_messages([{"role": "user", "content": "Q"}], thinking_mode="thinking")
    assert prompt == f"{BOS}{USER}Q{ASSISTANT}<think>"


def test_max_reasoning_effort_preamble():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    plain = encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == (
        BOS + MAX_PREAMBLE + plain[len(BOS) :]
    )
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == plain
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")
    with pytest.raises(ValueError, match="reasoning_effort"):
        encode_messages(msgs, "thinking", reasoning_effort="low")
    with pytest.raises(ValueError, match="thinking_mode"):
        encode_messages(msgs, "fast")


def test_earlier_reasoning_dropped_unless_tools():
    msgs = [
        {"role": "user", "content": "A"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1"},
        {"role": "user", "content": "B"},
    ]
    assert encode_messages(msgs, "thinking") == (
        f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}<think>"
    )
    assert encode_messages(msgs, "thinking", drop_thinking=False) == (
        f"{BOS}{USER}A{ASSISTANT}<think>r1</think>a1{EOS}{USER}B{ASSISTANT}<think>"
    )
    assert encode_messages(msgs, "chat") == (
        f"{BOS}{USER}A{ASSISTANT}</think>a1{EOS}{USER}B{ASSISTANT}</think>"
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with_tools = encode_messages(msgs, "thinking", tools=[tool])
    assert "<think>r1</think>a1" in with_tools


def test_tool_results_follow_call_order_and_merge_with_user_text():
    calls = [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "b", "content": "B"},
        {"role": "tool", "tool_call_id": "a", "content": "A"},
        {"role": "user", "content": "thanks"},
    ]
    prompt = encode_messages(msgs, "chat")
    assert prompt.endswith(
        f"{EOS}{USER}<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nthanks"
        f"{ASSISTANT}</think>"
    )
    assert (
        '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>' + EOS
    ) in prompt


def test_system_response_format_developer_and_reminder():
    schema = {"type": "object"}
    msgs = [
        {"role": "system", "content": "S", "response_format": schema},
        {"role": "developer", "content": "D"},
        {"role": "user", "content": "U"},
        {"role": "latest_reminder", "content": "R"},
    ]
    assert encode_messages(msgs, "chat") == (
        f"{BOS}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to "
        f'reply:\n{{"type": "object"}}{USER}D{USER}U{ASSISTANT}</think><｜latest_reminder｜>R'
    )


def test_context_renders_only_the_new_messages():
    ctx = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "a"},
    ]
    new = [{"role": "user", "content": "B"}]
    whole = encode_messages(ctx + new, "chat")
    assert encode_messages(ctx, "chat") + encode_messages(new, "chat", context=ctx) == whole


TYPED_ARGS = {
    "text": "multi\nline \"quoted\" <b>tag</b> 北京",
    "digits_as_text": "42",
    "empty": "",
    "int": 3,
    "negative": -7,
    "float": 2.5,
    "true": True,
    "false": False,
    "none": None,
    "object": {"a": [1, {"b": "c"}], "d": None},
    "array": ["x", 1, 2.0, False],
}


def test_typed_tool_call_round_trip():
    tools = [{"type": "function", "function": {"name": "do_it", "parameters": {}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "do_it"}}
    call["function"]["arguments"] = json.dumps(TYPED_ARGS)
    msgs = [
        {"role": "user", "content": "please"},
        {"role": "assistant", "reasoning_content": "think", "content": "Sure.",
         "tool_calls": [call, {**call, "id": "c2"}]},
    ]
    prompt = encode_messages(msgs, "thinking", tools=tools)
    # Strings raw with string="true", everything else JSON with string="false".
    assert '<｜DSML｜parameter name="digits_as_text" string="true">42</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="int" string="false">3</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="true" string="false">true</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="text" string="true">multi\nline "quoted"' in prompt

    (mode, text), = assistant_turns(prompt)
    parsed = parse_completion(text, thinking_mode=mode, strict=True)
    assert parsed["reasoning_content"] == "think" and parsed["content"] == "Sure."
    assert len(parsed["tool_calls"]) == 2
    for got in parsed["tool_calls"]:
        args = json.loads(got["function"]["arguments"])
        assert got["function"]["name"] == "do_it"
        assert args == TYPED_ARGS
        assert [type(v) for v in args.values()] == [type(v) for v in TYPED_ARGS.values()]


def test_dict_arguments_are_not_nested():
    call = {"type": "function", "function": {"name": "f", "arguments": {"q": "x", "n": 2}}}
    prompt = encode_messages([{"role": "user", "content": "u"},
                              {"role": "assistant", "content": "", "tool_calls": [call]}], "chat")
    assert '<｜DSML｜parameter name="q" string="true">x</｜DSML｜parameter>' in prompt
    assert '<｜DSML｜parameter name="n" string="false">2</｜DSML｜parameter>' in prompt


GOOD_CALL = (
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
    '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
)
MALFORMED = [
    # unclosed block (truncated generation)
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="tr',
    # junk between invokes
    '<｜DSML｜tool_calls>\nhello\n<｜DSML｜invoke name="f">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>',
    # parameter without its closing tag
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="true">1'
    "\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    # bad string flag
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="x" string="yes">1'
    "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    # duplicate parameter
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
    '<｜DSML｜parameter name="x" string="true">1</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="x" string="true">2</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    # invoke never closed
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n</｜DSML｜tool_calls>',
    # empty block
    "<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",
]


@pytest.mark.parametrize("block", MALFORMED)
def test_malformed_dsml_is_kept_as_content(block):
    text = f"r</think>Let me check.\n\n{block}{EOS}"
    parsed = parse_completion(text, thinking_mode="thinking")
    assert parsed["reasoning_content"] == "r"
    assert parsed["tool_calls"] == []
    assert parsed["content"] == f"Let me check.\n\n{block}"
    with pytest.raises(DSMLError):
        parse_completion(text, thinking_mode="thinking", strict=True)
    assert issubclass(DSMLError, ValueError)


def test_lenient_parsing_of_imperfect_completions():
    # Generation stopped on the EOS id (not in the text): same result as with the string.
    with_eos = parse_completion(f"r</think>A\n\n{GOOD_CALL}{EOS}", "thinking")
    without = parse_completion(f"r</think>A\n\n{GOOD_CALL}", "thinking")
    for parsed in (with_eos, without):
        assert parsed["content"] == "A"
        assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"x": 1}
    with pytest.raises(DSMLError, match="EOS"):
        parse_completion("r</think>A", "thinking", strict=True)
    # Reasoning cut off by the token limit.
    cut = parse_completion("still thinking about", "thinking")
    assert cut["reasoning_content"] == "still thinking about" and cut["content"] == ""
    with pytest.raises(DSMLError, match="think"):
        parse_completion(f"still thinking about{EOS}", "thinking", strict=True)
    # A block without the blank line before it, and text after it.
    odd = parse_completion(f"A{GOOD_CALL}\nmore{EOS}", "chat")
    assert odd["content"] == "A\n\nmore" and len(odd["tool_calls"]) == 1
    # A non-JSON value flagged string="false" is kept as a string.
    bad_json = GOOD_CALL.replace(">1<", ">not json<")
    parsed = parse_completion(f"\n\n{bad_json}{EOS}", "chat")
    assert json.loads(parsed["tool_calls"][0]["function"]["arguments"]) == {"x": "not json"}
    with pytest.raises(DSMLError, match="not JSON"):
        parse_completion(f"\n\n{bad_json}{EOS}", "chat", strict=True)
    # Chat mode: no reasoning, content up to EOS.
    assert parse_completion(f"Hello{EOS}", "chat") == {
        "role": "assistant", "reasoning_content": "", "content": "Hello", "tool_calls": []
    }


def test_apply_chat_template_matches_encode_messages():
    msgs = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(msgs, add_generation_prompt=True) == encode_messages(msgs)
    assert apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False) == (
        encode_messages(msgs, "chat")
    )
    assert apply_chat_template(msgs) == f"{BOS}{USER}hi"
    reply = msgs + [{"role": "assistant", "content": "partial"}]
    assert apply_chat_template(reply, continue_final_message=True, enable_thinking=False) == (
        f"{BOS}{USER}hi{ASSISTANT}</think>partial"
    )
