#!/usr/bin/env python3
"""Benchmark ``ds4mlx convert`` on a multi-GB synthetic checkpoint in the official format.

    python scripts/bench_convert.py [--size-gb 3] [--to mlx|gguf] [--preset mxfp4] [--jobs N]
                                    [--experts 128] [--flash-widths] [--workdir DIR]

Writes an official-format checkpoint (FP8 dense + 128×128 E8M0 scales, packed FP4 experts +
E8M0 per 32, BF16/F32 rest, sharded with an index) of about ``--size-gb`` GB, streamed shard by
shard, then runs the conversion in a child process and reports its wall time, throughput (source
GB/s and output GB/s) and peak resident memory (the child's ``VmHWM``, and that of its largest
child process: GGUF quantization workers where the quantizers run in processes, else
the compiler building the kernels), next to the size of the largest output tensor.
The page cache is dropped first when the system allows it. A quantization-heavy run that shows
how ``--jobs`` scales: ``--to gguf --preset ds4-q4 --size-gb 0.1 --experts 32 --jobs 1`` (then 2).
``--baseline DIR`` runs the same conversion of the same source with another checkout of ds4mlx
(e.g. main) in each round (the two take turns going first), prints both and their ratio (on a
shared machine, figures taken minutes apart are not comparable) and whether the two outputs are
byte-identical.

The disk is measured in the same run, right before and right after each conversion: a
sequential write past the page cache (``O_DIRECT``, fsync included) of ``--disk-gb`` GB (default:
the source's size, about the output's: a virtual disk takes writes into its host's cache and
drains it at its own pace, so the figure depends on the size), and once a round through the page
cache. The direct write is done several ways (``DIRECT_WAYS``: 8 MiB pieces from one thread as the
converter's writer issues them, the same with an ``fdatasync`` every 64 MiB behind it as the GGUF
writer does, 8 MiB pieces from two threads, 64 MiB pieces; all from a buffer on huge pages, as
the converter's are: on 4 KiB pages a direct write reached a third of the speed), plain loops
that share no code with the converter, and the disk's write speed at that point is the best of
them: the most this disk sustains, not one access pattern's figure (a single 16 MiB loop on
4 KiB pages was slower than the converter itself). Each conversion's output rate is divided by the mean of the two direct writes
around it; the median of those per-round ratios is the figure to quote (the disk's speed moved
by up to 2x between two writes on the shared machine this was tuned on). A conversion reads its source from
the disk it writes, so where reads and writes share the disk's bandwidth the copy speed, not the
write speed, is its ceiling: each round also measures it (an ``O_DIRECT`` read of a file of the
source's size while another of the same size is written, fsync included, bytes per second each
way). ``--source-dir DIR`` writes the source elsewhere (another disk, or ``/dev/shm``): its reads
then cost the output disk nothing, the direct write is the ceiling and the copy is not measured.
``--rounds N`` repeats all of it (the disk is noisy) and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4mlx.io.mlx_dir import ShardWriter  # noqa: E402
from ds4mlx.names import official_layout  # noqa: E402
from ds4mlx.io.safetensors import DTYPES  # noqa: E402
from ds4mlx.quant.codecs import bf16_encode  # noqa: E402
from ds4mlx.quant.mx import official_shapes  # noqa: E402
from ds4mlx.synthetic import INDEX_FILE, tiny_config  # noqa: E402

SHARD_BYTES = 1 << 30


def bench_config(num_layers: int, n_experts: int = 128, flash_widths: bool = False) -> dict:
    """Flash's structure at reduced width: 1024 hidden, ``n_experts`` experts of 1024, 32k vocab;
    ``flash_widths``: Flash's own widths (4096 hidden, 64 heads of 512, experts of 2048: a
    tensor's size, so the per-tensor costs weigh per byte as in the real model; 32k vocab still,
    so the layers are most of the bytes, as there)."""
    if flash_widths:
        return tiny_config(num_layers=num_layers, vocab_size=32768, hidden_size=4096, num_attention_heads=64,
                           head_dim=512, qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
                           index_n_heads=64, index_head_dim=128, n_routed_experts=n_experts,
                           moe_intermediate_size=2048, sliding_window=128)
    return tiny_config(num_layers=num_layers, vocab_size=32768, hidden_size=1024, num_attention_heads=8,
                       q_lora_rank=512, o_groups=4, o_lora_rank=256, index_n_heads=16,
                       n_routed_experts=n_experts, moe_intermediate_size=1024, sliding_window=128)


def entries(config: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, stored shape) of every tensor, in file order."""
    out = []
    for name, spec in official_layout(config).items():
        stored_shape, scale_shape = official_shapes(spec.storage, spec.shape)
        if spec.storage in ("fp8", "fp4"):
            out += [(name, "F8_E4M3" if spec.storage == "fp8" else "I8", stored_shape),
                    (spec.scale_name, "F8_E8M0", scale_shape)]
        elif spec.storage == "i64":
            out.append((name, "I64", spec.shape))
        else:
            out.append((name, "BF16" if spec.storage == "bf16" else "F32", spec.shape))
    return out


def nbytes(dtype: str, shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize


def values(rng: np.random.Generator, name: str, dtype: str, shape, n_experts: int) -> np.ndarray:
    if dtype == "F8_E4M3":
        codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
        return codes
    if dtype == "F8_E8M0":
        return rng.integers(118, 128, size=shape, dtype=np.uint8)
    if dtype == "I8":
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    if dtype == "I64":
        return np.argsort(rng.random((shape[0], n_experts), dtype=np.float32), axis=1)[:, : shape[1]].astype(np.int64)
    x = rng.standard_normal(shape, dtype=np.float32) * (0.1 if name.endswith("_fn") else 0.02)
    if name.endswith("norm.weight") or name.endswith("_scale"):
        x += 1.0
    return bf16_encode(x) if dtype == "BF16" else x


def write_source(path: Path, config: dict, seed: int = 0) -> int:
    """Stream the checkpoint shard by shard; returns its size in bytes."""
    path.mkdir(parents=True)
    items = entries(config)
    shards, size = [[]], 0
    for e in items:
        if shards[-1] and size + nbytes(e[1], e[2]) > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes(e[1], e[2])
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(path / name, shard, {"format": "pt"})
        for t, dtype, shape in shard:
            w.write_tensor(t, [values(rng, t, dtype, shape, config["n_routed_experts"])])
            weight_map[t] = name
        w.finish()
        total += w.nbytes
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def rate(bytes_per_s: float) -> str:
    """GB/s, or MB/s below 0.1 GB/s (quantizing conversions on few cores)."""
    return f"{bytes_per_s / 1e9:.2f} GB/s" if bytes_per_s >= 1e8 else f"{bytes_per_s / 1e6:.2f} MB/s"


# The ways the direct write is measured: name -> (bytes per pwrite, writer threads, fdatasync
# every this many bytes behind the writers or 0). "8M" is the converter's own pattern (8 MiB
# pieces, one transfer at a time from one thread, fsync at the end), "8M+sync" the GGUF writer's
# (a thread fdatasyncs every 64 MiB behind it), "8Mx2" two transfers in flight, "64M" longer ones.
# Restated here, not imported: the ceiling must not depend on the code it measures.
DIRECT_WAYS = {"8M": (8 << 20, 1, 0), "8M+sync": (8 << 20, 1, 64 << 20),
               "8Mx2": (8 << 20, 2, 0), "64M": (64 << 20, 1, 0)}
_UNIT = 64 << 20  # every way writes the same bytes: a multiple of each one's piece
_BLOCKS: dict[int, memoryview] = {}
_HUGE = 2 << 20  # a transparent huge page (x86-64, arm64 with 4 KiB pages)


def _huge_buffer(nbytes: int) -> memoryview:
    """A buffer of ``nbytes`` on transparent huge pages where the system gives them (private
    anonymous memory, 2 MiB aligned, ``madvise``): a direct transfer's request holds a limited
    number of memory segments (254 on this project's virtio disk), so 4 KiB pages cut it to
    ~1 MiB while huge pages let it reach the disk's largest request (4 MiB here). Measured: 8 MiB
    direct writes at 0.3 GB/s from 4 KiB pages, 0.7-1.0 GB/s from huge pages; the converter's
    staging buffers are on huge pages, so a ceiling on small pages was below the converter."""
    import ctypes
    import mmap

    raw = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: no THP
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(raw)) % _HUGE
    if hasattr(raw, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        raw.madvise(mmap.MADV_HUGEPAGE, skip, nbytes)
    return memoryview(raw)[skip: skip + nbytes]


def _random_block(nbytes: int) -> memoryview:
    """``nbytes`` random bytes on huge pages (``_huge_buffer``), made once per size."""
    if nbytes not in _BLOCKS:
        block = _huge_buffer(nbytes)
        block[:] = np.random.default_rng(1).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
        _BLOCKS[nbytes] = block
    return _BLOCKS[nbytes]


def disk_write_speed(directory: Path, size_gb: float, direct: bool = False, piece: int = 8 << 20,
                     threads: int = 1, sync_every: int = 0) -> float:
    """Bytes/s of a sequential write of a fresh file of about ``size_gb`` GB in ``directory``,
    fsync included (what a conversion's output can reach at best): ``piece``-byte ``pwrite``s
    from one reused random buffer, ``threads`` threads taking every ``threads``-th piece (that
    many transfers in flight), and with ``sync_every`` a thread that ``fdatasync``s each time
    that many more bytes are written. ``direct``: past the page cache (``O_DIRECT``), where a
    VM's page-cache costs do not count."""
    import threading

    path = directory / "disk-speed.bin"
    block = _random_block(piece)
    n = max(1, int(size_gb * 1e9) // _UNIT) * _UNIT // piece
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (getattr(os, "O_DIRECT", 0) if direct else 0)
    fd = os.open(path, flags, 0o644)
    progress = threading.Condition()
    state = {"pieces": 0, "writing": threads, "error": None}

    def write(first: int) -> None:
        try:
            for i in range(first, n, threads):
                os.pwrite(fd, block, i * piece)
                with progress:
                    state["pieces"] += 1
                    progress.notify_all()
        except OSError as e:
            state["error"] = e
        finally:
            with progress:
                state["writing"] -= 1
                progress.notify_all()

    def sync() -> None:
        mark = sync_every
        while True:
            with progress:
                progress.wait_for(lambda: state["pieces"] * piece >= mark or not state["writing"])
                if not state["writing"]:
                    return
            try:
                os.fdatasync(fd)
            except OSError:  # the final fsync reports what matters
                return
            mark += sync_every

    t = time.perf_counter()
    try:
        workers = [threading.Thread(target=write, args=(k,)) for k in range(threads)]
        workers += [threading.Thread(target=sync)] if sync_every else []
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if state["error"] is not None:
            raise state["error"]
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t
    path.unlink()
    return n * piece / seconds


def disk_direct_speeds(directory: Path, size_gb: float, turn: int = 0) -> dict[str, float]:
    """Each of ``DIRECT_WAYS``' direct write speeds, in bytes/s; ``turn`` rotates which goes
    first (the one after a conversion may meet the disk still draining it)."""
    names = list(DIRECT_WAYS)
    names = names[turn % len(names):] + names[: turn % len(names)]
    got = {}
    for name in names:
        piece, threads, sync_every = DIRECT_WAYS[name]
        got[name] = disk_write_speed(directory, size_gb, direct=True, piece=piece, threads=threads,
                                     sync_every=sync_every)
    return {name: got[name] for name in DIRECT_WAYS}


def _direct_fd(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError:  # a file system without O_DIRECT (tmpfs): buffered
        return os.open(path, flags, 0o644)


def disk_copy_speed(directory: Path, nbytes: int) -> tuple[float, float, float]:
    """(bytes/s each way, read bytes/s, write bytes/s) of the disk copying: a file of ``nbytes``
    read sequentially past the page cache on one thread while another of the same size is
    written past it (fsync included) on another, 8 MiB transfers as the converter's writer
    makes, from buffers on huge pages as the converter's are (``_huge_buffer``). The rate each way is the size over the wall time of both together: a conversion
    reads its source and writes its output on the same disk, and this is its ceiling."""
    import threading

    block = 8 << 20
    n = max(1, nbytes // block)
    buf = _random_block(block)
    src, dst = directory / "disk-copy-src.bin", directory / "disk-copy-dst.bin"
    fd = _direct_fd(src, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for i in range(n):
            os.pwrite(fd, buf, i * block)
        os.fsync(fd)
    finally:
        os.close(fd)
    drop_caches()
    took: dict[str, float] = {}

    def read() -> None:
        rbuf = _huge_buffer(block)
        rfd = _direct_fd(src, os.O_RDONLY)
        t = time.perf_counter()
        try:
            for i in range(n):
                os.preadv(rfd, [rbuf], i * block)
        finally:
            os.close(rfd)
        took["read"] = time.perf_counter() - t

    wfd = _direct_fd(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    reader = threading.Thread(target=read)
    t = time.perf_counter()
    reader.start()
    try:
        for i in range(n):
            os.pwrite(wfd, buf, i * block)
        os.fsync(wfd)
        took["write"] = time.perf_counter() - t
    finally:
        os.close(wfd)
        reader.join()
    wall = time.perf_counter() - t
    src.unlink()
    dst.unlink()
    size = n * block
    return size / wall, size / took["read"], size / took["write"]


def same_output(a: Path, b: Path) -> bool:
    """Whether two conversion outputs (a file, or a directory of files) hold the same bytes."""
    import filecmp

    if a.is_file():  # a GGUF, and the MTP file beside it where there is one
        mtp = [(x.with_name(f"{x.stem}-MTP.gguf")) for x in (a, b)]
        return filecmp.cmp(a, b, shallow=False) and (
            mtp[0].exists() == mtp[1].exists() and (not mtp[0].exists() or filecmp.cmp(*mtp, shallow=False)))
    names = sorted(f.name for f in a.iterdir())
    return names == sorted(f.name for f in b.iterdir()) and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def run_convert(root: Path, src: Path, out: Path, args, preset: str | None
                ) -> tuple[float, float, float, float, float]:
    """(seconds inside convert, seconds with start-up, peak RSS, largest worker RSS, CPU seconds
    of the process and its workers, start-up included) of one conversion in a child process
    running the ds4mlx checkout at ``root``."""
    call = ("import time; from ds4mlx.convert import convert; t = time.time(); "
            f"convert({str(src)!r}, {str(out)!r}, to={args.to!r}, preset={preset!r}, "
            f"expert_bits={args.expert_bits!r}, jobs={args.jobs!r}, progress=False); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "import resource; me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)); "
            "cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime; "
            "print(time.time() - t, int(hwm) * 1024, kids.ru_maxrss * 1024, cpu)")
    drop_caches()
    env = dict(os.environ, PYTHONPATH=str(root))
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, cwd=root, env=env)
    total = time.time() - t0
    if run.returncode:  # its own error, not only the exit status
        sys.exit(f"the conversion by {root} failed ({run.returncode}):\n{run.stderr[-4000:]}")
    seconds, rss, worker_rss, cpu = (float(x) for x in run.stdout.split()[-4:])
    return seconds, total, rss, worker_rss, cpu


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=3.0, help="approximate source size")
    p.add_argument("--to", choices=("mlx", "gguf"), default="mlx")
    p.add_argument("--preset", default=None, help="GGUF preset (default mxfp4 for the benchmark)")
    p.add_argument("--expert-bits", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="GGUF quantization workers (default: all cores)")
    p.add_argument("--experts", type=int, default=128, help="routed experts per layer (at least 8)")
    p.add_argument("--flash-widths", action="store_true",
                   help="Flash's own tensor widths (fewer, larger tensors per GB, as in the real model)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--source-dir", type=Path, default=None,
                   help="write the source here (another device: the output disk only writes)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--baseline", type=Path, default=None, help="another ds4mlx checkout to run side by side")
    p.add_argument("--disk-gb", type=float, default=None,
                   help="size of the disk write-speed test file (default: the conversion's output size)")
    p.add_argument("--rounds", type=int, default=1, help="disk figures and conversions, interleaved, this many times")
    args = p.parse_args(argv)

    one = entries(bench_config(1, args.experts, args.flash_widths))
    per_layer = sum(nbytes(d, s) for n, d, s in one if n.startswith("layers.0."))
    fixed = sum(nbytes(d, s) for _, d, s in one) - per_layer
    layers = max(4, math.ceil((args.size_gb * 1e9 - fixed) / (per_layer * 1.0)))
    config = bench_config(layers, args.experts, args.flash_widths)
    work = Path(tempfile.mkdtemp(prefix="ds4mlx-bench-", dir=args.workdir))
    src_home = work if args.source_dir is None else Path(
        tempfile.mkdtemp(prefix="ds4mlx-bench-src-", dir=args.source_dir))
    src = src_home / "src"
    try:
        t0 = time.time()
        src_bytes = write_source(src, config)
        print(f"source: {layers} layers + MTP, {src_bytes / 1e9:.2f} GB in {src_home}, written in "
              f"{time.time() - t0:.1f} s")
        out = work / ("out.gguf" if args.to == "gguf" else "out")
        b_out = out.with_name("baseline-" + out.name)
        preset = args.preset or ("mxfp4" if args.to == "gguf" else None)
        root = Path(__file__).resolve().parents[1]
        cold = drop_caches()
        base = subprocess.run([sys.executable, "-c", "import ds4mlx.convert, mlx.core, gguf; "
                               "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"],
                              check=True, capture_output=True, text=True, cwd=root)
        base_rss = int(base.stdout) * 1024
        largest = max(nbytes(d, s) for n, d, s in entries(config) if ".experts." in n) * config["n_routed_experts"]
        print(f"convert --to {args.to}{f' --preset {preset}' if preset else ''}"
              f"{f' --expert-bits {args.expert_bits}' if args.expert_bits else ''}"
              f"{f' --jobs {args.jobs}' if args.jobs else ''} ({'cold' if cold else 'warm'} page cache); "
              f"imports alone {base_rss / 2**20:.0f} MiB; largest output tensor {largest / 2**20:.0f} MiB")
        same_disk = args.source_dir is None  # the copy speed is the ceiling only where the source shares the disk
        disk_gb = args.disk_gb if args.disk_gb is not None else src_bytes / 1e9  # the disk's speed at the output's size
        runs = [("this", root, out)] + ([("base", args.baseline.resolve(), b_out)] if args.baseline is not None else [])
        figures: dict[str, list[float]] = {k: [] for k in ("buffered", "direct", "copy")}
        ways: dict[str, list[float]] = {k: [] for k in DIRECT_WAYS}  # each way's figure at every point
        best_way: list[str] = []  # the way that was fastest at each point

        def direct_write() -> tuple[float, str]:
            """The disk's direct write speed now: the best of the ways (and which)."""
            got = disk_direct_speeds(work, disk_gb, turn=len(best_way))
            for k, v in got.items():
                ways[k].append(v)
            best_way.append(max(got, key=got.get))
            return got[best_way[-1]], best_way[-1]
        conv = {who: {"seconds": [], "cpu": [], "rss": [], "ratio": []} for who, _, _ in runs}
        speedup: list[float] = []  # baseline seconds / this checkout's, per round
        out_bytes, identical = 0, []

        def remove(path: Path) -> None:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            path.with_name(f"{path.stem}-MTP.gguf").unlink(missing_ok=True)  # a GGUF's MTP file

        for r in range(args.rounds):
            # the disk's write speed right before and right after each conversion (the disk is
            # noisy: a figure taken minutes away says little); the two checkouts take turns first
            figures["buffered"].append(disk_write_speed(work, disk_gb))
            speed, way = direct_write()
            direct, named = [speed], [way]
            line = []
            for who, where, dest in (runs if r % 2 == 0 else runs[::-1]):
                seconds, _, rss, worker_rss, cpu = run_convert(where, src, dest, args, preset)
                out_bytes = sum(f.stat().st_size for f in ([dest] if dest.is_file() else dest.iterdir()))
                speed, way = direct_write()
                direct.append(speed)
                named.append(way)
                near = (direct[-2] + direct[-1]) / 2
                c = conv[who]
                c["seconds"].append(seconds)
                c["cpu"].append(cpu)
                c["rss"].append(rss)
                c["ratio"].append(out_bytes / seconds / near)
                line.append(f"{who}: {seconds:.2f} s, {rate(out_bytes / seconds)} of output = "
                            f"{c['ratio'][-1]:.2f}x the direct write around it ({rate(direct[-2])} {named[-2]}, {rate(direct[-1])} {named[-1]}), "
                            f"CPU {cpu:.1f} s, peak RSS {rss / 2**20:.0f} MiB"
                            + (f" (child processes {worker_rss / 2**20:.0f} MiB each at most)"
                               if worker_rss and args.to == "gguf" and args.jobs != 1 else ""))
            figures["direct"] += direct
            if args.baseline is not None:
                identical.append(same_output(out, b_out))
                speedup.append(conv["base"]["seconds"][-1] / conv["this"]["seconds"][-1])
            last = r + 1 == args.rounds
            if not (args.keep and last):  # the copy test needs twice the source's size free
                remove(out)
                remove(b_out)
            points = len(direct)
            disk = f"disk: direct " + ", ".join(
                f"{k} " + "/".join(f"{v / 1e9:.2f}" for v in ways[k][-points:]) for k in DIRECT_WAYS)
            disk += f" GB/s (each point in turn), {rate(figures['buffered'][-1])} buffered write"
            if same_disk:
                copy, copy_read, copy_write = disk_copy_speed(work, src_bytes)
                figures["copy"].append(copy)
                disk += f", {rate(copy)} copy (read {rate(copy_read)} + write {rate(copy_write)} at once)"
            print(f"[{r + 1}/{args.rounds}] " + " | ".join(line) + " | " + disk, flush=True)

        what = "median of " + str(args.rounds) + " rounds" if args.rounds > 1 else "one round"
        d = {k: median(v) for k, v in figures.items() if v}
        print(f"direct write ways (median over {len(best_way)} points; best at how many): " + ", ".join(
            f"{k} {rate(median(v))} ({best_way.count(k)})" for k, v in ways.items()))
        print(f"disk ({what}, {disk_gb:.2f} GB written each time): {rate(d['buffered'])} buffered write, "
              f"{rate(d['direct'])} direct write, the best way at each point (min {rate(min(figures['direct']))}, "
              f"max {rate(max(figures['direct']))})"
              + (f", {rate(d['copy'])} copy each way ({rate(2 * d['copy'])} read + written); copy / direct write = "
                 f"{d['copy'] / d['direct']:.2f}" if same_disk else
                 f"; source in {args.source_dir} (another device: the direct write is the ceiling)"))
        for who, where, _ in runs:
            c = conv[who]
            seconds, cpu = median(c["seconds"]), median(c["cpu"])
            name = "this checkout" if who == "this" else f"baseline {where}"
            vs = [f"{median(c['ratio']):.2f}x the direct write next to it (median of the rounds' ratios)"]
            vs.append(f"{out_bytes / seconds / d['buffered']:.2f}x buffered write")
            if same_disk:
                vs.append(f"{out_bytes / seconds / d['copy']:.2f}x copy")
            print(f"{name} ({what}): {seconds:.2f} s, {rate(src_bytes / seconds)} of source, "
                  f"{rate(out_bytes / seconds)} of output ({out_bytes / 1e9:.2f} GB, incl. write + verification) = "
                  + ", ".join(vs) + f"; CPU {cpu:.1f} s ({rate(src_bytes / cpu)} of source per CPU-second); "
                  f"peak RSS {max(c['rss']) / 2**20:.0f} MiB")
        if args.to == "mlx":  # source read + output written (its verification reads no more of the disk)
            seconds = median(conv["this"]["seconds"])
            print(f"disk traffic: {(src_bytes + out_bytes) / 1e9:.2f} GB read and written, "
                  f"{rate((src_bytes + out_bytes) / seconds)} together")
        if args.baseline is not None:
            print(f"outputs byte-identical to the baseline's: {all(identical)} (every round compared)")
            b_cpu, cpu = median(conv["base"]["cpu"]), median(conv["this"]["cpu"])
            print(f"this checkout vs baseline: {median(speedup):.2f}x faster (median of the rounds' ratios), "
                  f"{b_cpu / cpu:.2f}x by CPU time")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if src_home != work:
                shutil.rmtree(src_home, ignore_errors=True)
        else:
            print(f"kept {work}")


if __name__ == "__main__":
    main()
