"""The built-in demo model: ``--model demo`` works anywhere, offline, on first use.

A tiny random DeepSeek V4 checkpoint in the official on-disk format
(``synthetic.demo_model_path``) plus a byte-level BPE tokenizer with the V4 special tokens and
pre-tokenizer, trained on a short built-in text. Its output is gibberish, but every path a real
model takes (chat template, thinking, decode state, sampling, CLI) runs for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from . import encoding

# Bump when the tokenizer recipe changes, so cached demo directories are rebuilt (the corpus
# is part of the version too).
_RECIPE = 1
DEMO_VOCAB_SIZE = 1024  # = synthetic.DEMO_PROFILE["vocab_size"]

# The V4 vocabulary's named special tokens (the published tokenizer.json); the first three carry
# HF's ``special`` flag, the others are ordinary added tokens there too.
SPECIAL_TOKENS = (encoding.BOS, encoding.EOS, "<｜▁pad▁｜>")
NAMED_TOKENS = (
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>",
    encoding.USER, encoding.ASSISTANT, "<|EOT|>",
    encoding.THINK_START, encoding.THINK_END, encoding.DSML,
    "<｜begin▁sys｜>", "<｜end▁sys｜>", encoding.LATEST_REMINDER,
    *encoding.TASK_TOKENS.values(),
)

_CORPUS = """\
DeepSeek V4 Flash is a mixture of experts language model with two hundred and eighty four
billion parameters, of which about thirteen billion are active for each token. Every layer
routes a token to six of its two hundred and fifty six experts, and a shared expert sees every
token. The first layers route by a hash of the token id; the others use a learned router.
Attention keeps a sliding window of recent keys and values. Compressed layers add rows that
summarise four or one hundred and twenty eight tokens each, and a lightning indexer picks the
most useful compressed rows for every query. Hyper-connections keep four residual streams and
mix them with small learned matrices that are balanced by a few Sinkhorn iterations.
This demo model has the same architecture in miniature: five layers, eight experts and a
vocabulary of one thousand and twenty four tokens. Its weights are random numbers drawn from a
fixed seed, so what it writes is noise, but the program that runs it is the real one. The
prompt is encoded with the official chat format, the model reads it in chunks, keeps its decode
state between calls, and samples one token at a time with temperature, top p, top k and min p.
MLX runs the same code on the CPU of a Linux machine and on the GPU of a Mac with Apple Silicon.
On a Mac with enough memory the full model answers questions, writes code, explains ideas and
thinks step by step before it replies. Try a question such as: what is the capital of France?
How many days are there in a leap year? Write a short poem about the sea. Explain how a
transformer works in simple words. Hello! Thank you, that was helpful. The answer is yes.
Weather today: sunny in the morning, clouds and light rain later, with a gentle breeze from
the west. Recipes need flour, sugar, butter, eggs, milk and a pinch of salt; bake for twenty
minutes until golden. Music, painting, science, history, mathematics and philosophy are old
friends of curious people. Please remember to drink water, sleep well, walk outside and call
your family. Questions about planets, oceans, mountains, rivers, forests, cities, languages,
computers, networks, algorithms, databases, compilers, kernels and memory are all welcome.
The quick brown fox jumps over the lazy dog. One, two, three, four, five, six, seven, eight,
nine, ten. 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14 (a + b) * c = d; x = [1, 2, 3]
def main(): print("hello world") return 0 if __name__ == "__main__": main()
"""


def _tokenizer_version() -> str:
    recipe = json.dumps([_RECIPE, DEMO_VOCAB_SIZE, SPECIAL_TOKENS, NAMED_TOKENS, _CORPUS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _train_tokenizer():
    """Byte-level BPE with the V4 pre-tokenizer: ids 0–2 = BOS, EOS, pad (as in V4), then the
    256 byte symbols and merges, the named tokens at the top, padded with V4's placeholder
    tokens to exactly ``DEMO_VOCAB_SIZE`` ids."""
    from tokenizers import AddedToken, models, pre_tokenizers, trainers

    from .tokenizer import v4_byte_level_bpe

    tok = v4_byte_level_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=DEMO_VOCAB_SIZE - len(NAMED_TOKENS),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NAMED_TOKENS])
    filler = DEMO_VOCAB_SIZE - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens(
        [AddedToken(f"<｜place▁holder▁no▁{i}｜>", special=True, normalized=False) for i in range(filler)]
    )
    assert tok.get_vocab_size(with_added_tokens=True) == DEMO_VOCAB_SIZE
    return tok


def _tokenizer_config() -> dict:
    # Mirrors the published V4 tokenizer_config.json (no BOS added automatically).
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": encoding.BOS,
        "eos_token": encoding.EOS,
        "pad_token": encoding.EOS,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
        "ds4mlx_demo_tokenizer": _tokenizer_version(),
    }


def _write_atomic(path: Path, text: str) -> None:
    from .synthetic import remove_stale_temps

    prefix = f".{path.name}.tmp-"
    remove_stale_temps(path.parent, prefix)  # left by a build that was killed
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_demo_tokenizer(directory: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of the demo into ``directory``.
    ``tokenizer.json`` is written last: its presence marks the directory complete."""
    directory = Path(directory)
    _write_atomic(directory / "tokenizer_config.json", json.dumps(_tokenizer_config(), indent=2) + "\n")
    _write_atomic(directory / "tokenizer.json", _train_tokenizer().to_str(pretty=True))
    return directory


def _tokenizer_current(directory: Path) -> bool:
    try:
        config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (directory / "tokenizer.json").is_file() and config.get("ds4mlx_demo_tokenizer") == _tokenizer_version()


def demo_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model directory (checkpoint + tokenizer), created on first use in
    ``cache_dir``, ``$DS4MLX_CACHE`` or ``~/.cache/ds4mlx``."""
    from .synthetic import demo_model_path

    path = demo_model_path(cache_dir, vocab_size=DEMO_VOCAB_SIZE)
    if not _tokenizer_current(path):
        write_demo_tokenizer(path)  # each file replaced atomically: concurrent writers agree
    return path
