"""Helpers of the bad-input tests: run the CLI in this process or as ``python -m ds4mlx`` in a
session of its own (and find what it leaves running), assert the one-line answer, and damage
copies of the demo model and of a GGUF byte by byte."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ds4mlx.cli import main

ROOT = Path(__file__).resolve().parents[1]
ERROR = "ds4mlx: error:"


# ----------------------------------------------------------------------------- helpers


def run(capsys, monkeypatch, *args, stdin: bytes | None = None) -> tuple[int, str, str]:
    """The CLI in this process: ``(exit status, stdout, stderr)``."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, out: str, err: str, *needles: str, status: int = 1) -> str:
    """Assert the answer to bad input: ``status``, no traceback, nothing on stdout (no answer
    that looks complete), exactly one error line, last on stderr, holding every needle."""
    assert code == status, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert out == "", out
    errors = [line for line in err.splitlines() if line.startswith(ERROR)]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) -> SHA-256 of its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def cli_process(*args, extra_env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    """``python -m ds4mlx ARGS`` in a session of its own (so what it leaves behind can be found)."""
    return subprocess.Popen([sys.executable, "-m", "ds4mlx", *map(os.fsencode, map(str, args))],
                            env={**env(), **(extra_env or {})}, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def session_members(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc, else ``ps``), zombies excluded."""
    pids = []
    if Path("/proc/self/stat").exists():
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids
    ps = subprocess.run(["ps", "-A", "-o", "pid=,sess=,stat="], capture_output=True, text=True).stdout
    return [int(p) for p, s, st in (line.split()[:3] for line in ps.splitlines()) if int(s) == sid
            and not st.startswith("Z")]


def assert_none_left(sid: int, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while (left := session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left running: {left}"


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    """Wait for the process and its pipes (a survivor holding them open would hang here)."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# ----------------------------------------------------------------------------- damaged files


def model_copy(src: Path, dst: Path, *, real: tuple[str, ...] = ()) -> Path:
    """``src`` as a new directory: the files named in ``real`` (and the small ones) copied, the
    other weight shards linked (they stay read-only: the source check covers them)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors" and f.name not in real:
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy2(f, dst / f.name)
    return dst


def st_header(shard: Path) -> tuple[dict, int]:
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), 8 + n


def shard_of(model: Path, tensor: str) -> Path:
    return model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def poke(model: Path, tensor: str, at: int, data: bytes) -> None:
    """Overwrite bytes ``at`` of ``tensor``'s data in its shard."""
    shard = shard_of(model, tensor)
    header, start = st_header(shard)
    begin = start + header[tensor]["data_offsets"][0]
    with open(shard, "r+b") as f:
        f.seek(begin + at)
        f.write(data)


def overlap(model: Path, a: str, b: str) -> None:
    """Rewrite the shard header so tensor ``b``'s data starts inside tensor ``a``'s."""
    shard = shard_of(model, a)
    raw = shard.read_bytes()
    header, start = st_header(shard)
    (a0, a1), (b0, b1) = header[a]["data_offsets"], header[b]["data_offsets"]
    assert b1 - b0 <= a1 - a0
    header[b]["data_offsets"] = [a0 + 2, a0 + 2 + (b1 - b0)]
    text = json.dumps(header).encode()
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[start:])


GGUF_NAME = "demo.gguf"


def gguf_copy(good: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(good, dst)
    return dst


def gguf_set(path: Path, key: str, value) -> None:
    """Change a scalar metadata value in place (gguf-py's reader, opened for writing)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader


def gguf_set_type(path: Path, tensor: str, type_id: int) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r+")
    (t,) = [t for t in reader.tensors if t.name == tensor]
    t.field.parts[-2][0] = type_id  # parts: name length, name, n_dims, dims, type, offset
    reader.data.flush()
    del reader


def gguf_poke(path: Path, tensor: str, at: int, data: bytes) -> None:
    from ds4mlx.io.gguf_file import open_gguf

    with open_gguf(path) as g:
        offset = g.info(tensor).offset
    with open(path, "r+b") as f:
        f.seek(offset + at)
        f.write(data)


def gguf_rewrite(good: Path, dst: Path, *, extra_tokens: int = 0, retype: dict[str, str] | None = None) -> Path:
    """``good`` rewritten by the project's GGUF writer: ``extra_tokens`` more tokenizer tokens
    than the model's vocabulary (the embedding and head keep ``vocab_size`` rows), and the
    tensors of ``retype`` re-quantized to another block type (``{name: "Q4_K"}``)."""
    from gguf import quants as gq

    from ds4mlx.convert.gguf_writer import stream_gguf, tensor_entry
    from ds4mlx.io.gguf import hf_config_from_gguf
    from ds4mlx.io.gguf_file import open_gguf
    from ds4mlx.quant import gguf as qgguf

    retype = retype or {}
    with open_gguf(good) as g:
        config = hf_config_from_gguf(g)
        fields = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in g.fields.items()
                  if k.startswith("tokenizer.")}
        assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
        fields["tokenizer.ggml.tokens"] += [f"[EXTRA{i}]" for i in range(extra_tokens)]
        fields["tokenizer.ggml.token_type"] += [1] * extra_tokens
        entries, data = [], []
        for name, info in g.tensors.items():
            array = np.array(g.array(name))
            qtype = info.type_name
            if name in retype:
                values = gq.dequantize(array, info.ggml_type).reshape(info.shape)
                qtype, array = retype[name], qgguf.get(retype[name]).quantize(values)
            entries.append(tensor_entry(name, qtype, info.shape))
            data.append([array])
    stream_gguf(dst, config, entries, data, tokenizer=fields)
    return dst


def wait_for(condition, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
