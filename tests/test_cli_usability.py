"""CLI spellings people bring from mlx-lm and llama.cpp: each alias must behave exactly like our own name."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

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
