"""The memory check before loading (ds4mlx/memory.py), with fake device limits."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from ds4mlx import loader, memory
from ds4mlx.cli import main

GB = 10**9


def test_estimate_matches_the_loaded_model(demo, demo_dir):
    model, _ = demo  # float32
    loaded = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    est = memory.estimate(demo_dir, ctx=4096, dtype=mx.float32)
    assert abs(est.weights - loaded) <= 0.01 * loaded, (est.weights, loaded)
    assert est.state > 0 and est.ctx == 4096
    # bfloat16 (a Mac's default): float tensors halve unless the model keeps them float32
    half_model = loader.load(demo_dir, dtype=mx.bfloat16)[0]
    half_loaded = sum(v.nbytes for _, v in tree_flatten(half_model.parameters()))
    half = memory.estimate(demo_dir, ctx=4096, dtype=mx.bfloat16)
    assert abs(half.weights - half_loaded) <= 0.01 * half_loaded, (half.weights, half_loaded)
    assert half.weights < est.weights


@pytest.fixture
def no_loading(monkeypatch):
    """Record whether the loader was reached; it stops there with a recognisable error."""
    calls = []

    def fake_load(*args, **kwargs):
        calls.append(args)
        raise OSError("stopped at the loader")

    monkeypatch.setattr(loader, "load", fake_load)
    return calls


def fake_device(monkeypatch, physical: int, working_set: int | None):
    monkeypatch.setattr(memory, "device_memory",
                        lambda: memory.DeviceMemory(physical, working_set))


def test_refuses_with_the_sysctl_value_before_reading_weights(demo_dir, monkeypatch, capfd,
                                                              no_loading):
    need = memory.estimate(demo_dir, ctx=4096).total
    fake_device(monkeypatch, physical=need + 64 * GB, working_set=need - 1)
    rc = main(["generate", "--model", str(demo_dir), "--prompt", "hi", "--ctx", "4096"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and not no_loading
    assert len(err) == 1 and err[0].startswith("ds4mlx: error: "), err
    assert "more than the GPU's working set" in err[0] and "--ignore-memory-limit" in err[0]
    mb = int(err[0].split("iogpu.wired_limit_mb=")[1].split("'")[0])
    # the suggested limit makes it fit: the same check then passes without a refusal
    assert mb * memory.MIB >= need
    ok = memory.verdict(memory.estimate(demo_dir, ctx=4096),
                        memory.DeviceMemory(need + 64 * GB, mb * memory.MIB))
    assert ok is None or ok[0] == "warn"


def test_override_flag_loads_anyway_with_a_warning(demo_dir, monkeypatch, capfd, no_loading):
    fake_device(monkeypatch, physical=64 * GB, working_set=memory.GIB // 2)
    rc = main(["generate", "--model", str(demo_dir), "--prompt", "hi", "--ignore-memory-limit"])
    err = capfd.readouterr().err
    assert rc == 1 and len(no_loading) == 1 and "stopped at the loader" in err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "loading anyway" in warning[0]


def test_too_big_for_physical_memory(demo_dir, monkeypatch, capfd, no_loading):
    need = memory.estimate(demo_dir, ctx=1 << 20).total
    fake_device(monkeypatch, physical=need // 2, working_set=None)  # Linux: RAM only
    rc = main(["bench", "--model", str(demo_dir), "--contexts", "1024k"])
    err = capfd.readouterr().err.strip()
    assert rc == 1 and not no_loading
    assert "more than this machine's" in err and "smaller quantization" in err
    assert len(err.splitlines()) == 1 and "decode state at --ctx" in err


def test_close_to_the_limit_warns_and_loads(demo_dir, monkeypatch, capfd, no_loading):
    need = memory.estimate(demo_dir, ctx=32768).total
    fake_device(monkeypatch, physical=need + 64 * GB, working_set=math.ceil(need / 0.95))
    main(["generate", "--model", str(demo_dir), "--prompt", "hi"])
    err = capfd.readouterr().err
    assert len(no_loading) == 1
    assert any(line.startswith("warning:") and "close to the GPU's working set" in line
               for line in err.splitlines())


def test_limits_set_for_the_run_on_metal(monkeypatch):
    calls = {}
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.setdefault("wired", n))
    monkeypatch.setattr(mx, "set_cache_limit", lambda n: calls.setdefault("cache", n))
    est = memory.Estimate(weights=40 * GB, state=2 * GB, ctx=32768)
    memory.set_limits(est, memory.DeviceMemory(64 * GB, 48 * GB))
    assert calls == {"wired": 48 * GB, "cache": 6 * GB}
    calls.clear()
    memory.set_limits(est, memory.DeviceMemory(64 * GB, None))  # no Metal working set: untouched
    assert calls == {}


def test_serve_counts_its_batch_and_prefix_cache_before_reading_weights(demo_dir, monkeypatch, capfd,
                                                                       no_loading):
    one = memory.estimate(demo_dir, ctx=4096)
    served = memory.estimate(demo_dir, ctx=4096, sequences=4, cache=3 * memory.GIB)
    # an independent sum: four of generate's states and the cache bound on top of its total
    assert served.total == one.total + 3 * one.state + 3 * memory.GIB
    # enough for generate, not for the server with its batch and snapshots
    fake_device(monkeypatch, physical=one.total + 64 * GB, working_set=one.total + memory.GIB)
    rc = main(["serve", "--model", str(demo_dir), "--ctx", "4096", "--max-batch", "4", "--cache-gb", "3",
               "--port", "0"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and not no_loading, err
    assert len(err) == 1 and err[0].startswith("ds4mlx: error: "), err
    assert "decode states of 4 requests" in err[0] and "prefix cache" in err[0]
    mb = int(err[0].split("iogpu.wired_limit_mb=")[1].split("'")[0])
    assert mb * memory.MIB >= served.total
    # --ignore-memory-limit: on to the loader, with one warning
    rc = main(["serve", "--model", str(demo_dir), "--ctx", "4096", "--max-batch", "4", "--cache-gb", "3",
               "--port", "0", "--ignore-memory-limit"])
    err = capfd.readouterr().err
    assert rc == 1 and len(no_loading) == 1 and "stopped at the loader" in err
    assert len([line for line in err.splitlines() if "loading anyway" in line]) == 1
