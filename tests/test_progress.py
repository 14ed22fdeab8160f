"""Loading and prefill progress: the bytes each reader reports against what the files hold (read with
the safetensors library and gguf-py), the line's arithmetic, and silence off a terminal or with --quiet."""

from __future__ import annotations

import glob
import io
from math import prod

import pytest

from ds4mlx.cli import main
from ds4mlx.progress import LoadProgress, PrefillProgress, ProgressLine, clock_time, human_bytes

_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U32": 4, "U16": 2, "U64": 8,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def safetensors_bytes(directory, skip_prefix="mtp."):
    """Bytes of every tensor in a directory's shards, from the safetensors library's headers."""
    from safetensors import safe_open

    total = 0
    for f in glob.glob(f"{directory}/*.safetensors"):
        with safe_open(f, "np") as h:
            for name in h.keys():
                if not name.startswith(skip_prefix):
                    s = h.get_slice(name)
                    total += prod(s.get_shape()) * _ST_BYTES[s.get_dtype()]
    return total


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_line_arithmetic():
    clock, out = Clock(), io.StringIO()
    p = LoadProgress("big.gguf", stream=out, clock=clock)
    p(0, 80_000_000_000)
    clock.t += 16
    p(20_000_000_000, 80_000_000_000)  # 20 GB in 16 s: 1.25 GB/s, 60 GB left: 48 s
    assert out.getvalue().endswith("\r\x1b[KLoading big.gguf: 20.00 GB / 80.00 GB (25%), 1.25 GB/s, ETA 0:48")
    clock.t += 0.05
    p(21_000_000_000, 80_000_000_000)  # redrawn at most ten times a second
    assert "21.00 GB" not in out.getvalue()
    clock.t += 47.95  # 64 s in all
    p(80_000_000_000, 80_000_000_000)
    p.finish()
    assert out.getvalue().endswith("\r\x1b[KLoaded big.gguf: 80.00 GB in 64.0 s (1.25 GB/s)\n")
    assert clock_time(3725) == "1:02:05" and human_bytes(999) == "999 B"
    assert ProgressLine("x", unit=str, rate_unit=str, stream=out).finish() >= 0


def test_prefill_progress_during_generation(demo):
    from ds4mlx.generate import stream_generate

    model, tokenizer = demo
    out = io.StringIO()
    seen = []
    progress = PrefillProgress(min_tokens=16, stream=out)

    def record(done, total):
        seen.append((done, total))
        progress(done, total)

    ids = [(7 * i + 3) % model.config.vocab_size for i in range(40)]
    list(stream_generate(model, tokenizer, ids, max_tokens=2, temp=0.0, prefill_step_size=8,
                         prompt_progress_callback=record))
    assert seen[-1] == (40, 40) and seen[0][1] == 40
    text = out.getvalue()
    assert "prefill 0 / 40 tokens (0%)" in text
    assert text.endswith("\r\x1b[K")  # wiped once the prefill is done
    short = io.StringIO()
    quiet = PrefillProgress(min_tokens=4096, stream=short)
    quiet(0, 40), quiet(40, 40)
    assert short.getvalue() == ""  # short prompts draw nothing


def check_reports(calls, expected_total):
    assert calls, "no progress reported"
    assert all(total == expected_total for _, total in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == expected_total


def test_load_reports_the_bytes_the_files_hold(demo_dir, tmp_path):
    import mlx.core as mx

    from ds4mlx.convert import convert
    from ds4mlx.loader import load

    calls = []
    load(demo_dir, dtype=mx.float32, progress=lambda d, t: calls.append((d, t)))
    check_reports(calls, safetensors_bytes(demo_dir))

    mlx_dir = convert(demo_dir, tmp_path / "mlx", to="mlx", progress=False)
    calls = []
    load(mlx_dir, dtype=mx.float32, progress=lambda d, t: calls.append((d, t)))
    check_reports(calls, safetensors_bytes(mlx_dir))


def test_gguf_load_reports_the_bytes_the_file_holds(demo_dir, tmp_path):
    gguf = pytest.importorskip("gguf")
    import mlx.core as mx

    from ds4mlx.convert import convert
    from ds4mlx.loader import load

    path = convert(demo_dir, tmp_path / "demo.gguf", to="gguf", preset="mxfp4", progress=False)
    calls = []
    load(path, dtype=mx.float32, progress=lambda d, t: calls.append((d, t)))
    reader = gguf.GGUFReader(str(path))
    check_reports(calls, sum(int(t.n_bytes) for t in reader.tensors if not t.name.startswith("mtp.")))


def test_cli_draws_progress_only_on_a_terminal(demo_dir, capsys, monkeypatch):
    import ds4mlx.progress

    args = ["generate", "-m", "demo", "-p", "Hi", "--no-think", "--temp", "0", "-n", "3"]
    assert main(args) == 0
    _, err = capsys.readouterr()
    assert "\r" not in err and "\x1b" not in err and "Loading demo ..." in err  # a log or pipe
    monkeypatch.setattr(ds4mlx.progress, "is_terminal", lambda stream=None: True)
    assert main(args) == 0
    _, err = capsys.readouterr()
    assert f"\r\x1b[KLoaded demo: {human_bytes(safetensors_bytes(demo_dir))} in " in err
    assert main(args + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""
