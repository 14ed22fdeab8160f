"""io/direct.py: the conversion's output file and whole-file scans, direct and buffered.

References are independent of the code under test: the bytes joined in memory, ``zlib.crc32``
of slices, and the file read back with plain Python I/O.
"""

from __future__ import annotations

import errno
import os
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from ds4mlx.io import direct, mlx_dir


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    monkeypatch.setattr(direct, "BUFFER_BYTES", 64 << 10)  # many buffers for a small file
    if request.param == "buffered":  # as on macOS (no O_DIRECT, and no preadv before macOS 11)
        monkeypatch.setattr(direct, "_O_DIRECT", 0)
        monkeypatch.setattr(direct, "_PREADV", False)
    return request.param


def _pieces(seed: int, total: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out, n = [], 0
    while n < total:
        k = int(rng.choice([0, 1, 7, 4096, 5000, 65536, 65537, 200_000]))
        out.append(rng.integers(0, 256, k, dtype=np.uint8).tobytes())
        n += k
    return out


@pytest.mark.parametrize("total", [0, 1, 4095, 65536, 1_000_003])
def test_writer_writes_exactly_the_bytes(tmp_path, mode, total):
    pieces = _pieces(total, total)
    path = tmp_path / "out.bin"
    w = direct.DirectWriter(path)
    for p in pieces:
        assert w.write(memoryview(p)) == len(p)
    assert w.tell() == sum(map(len, pieces))
    w.close()
    assert w.finished
    assert path.read_bytes() == b"".join(pieces)  # size cut back after the padded direct tail
    with pytest.raises(ValueError, match="after the file was completed"):
        w.write(b"x")


@pytest.mark.parametrize("total", [1, 65536, 1_000_003])
def test_writer_compares_each_piece_with_the_callers_arrays(tmp_path, mode, total, monkeypatch):
    """compare=True: the file is the same, and a byte that is not the caller's is caught at its
    offset, whatever the cause: altered on the way in, a chunk lost, or the caller's array
    changed after ``write`` but before its bytes reached the disk (a buffer taken again early)."""
    pieces = [np.frombuffer(p, np.uint8).copy() for p in _pieces(total, total)]
    path = tmp_path / "out.bin"
    w = direct.DirectWriter(path, compare=True)
    for p in pieces:
        w.expect(p)
        w.write(p)
    w.close()
    joined = b"".join(p.tobytes() for p in pieces)
    assert path.read_bytes() == joined

    big = [p for p in pieces if len(p) > 10]
    if not big:
        return
    at = next(i for i, p in enumerate(pieces) if len(p) > 10)
    where = sum(len(p) for p in pieces[:at])

    def run(change) -> direct.ReadBackError:
        w = direct.DirectWriter(path, compare=True)
        with pytest.raises(direct.ReadBackError) as e:
            for i, p in enumerate(pieces):
                w.expect(p)
                change(w, i, p)
            w.close()
        w.discard()
        return e.value

    def altered(w, i, p):  # one byte flipped on its way in
        q = p.copy()
        if i == at:
            q[5] ^= 0x10
        w.write(q)

    assert run(altered).offset == where + 5

    def lost(w, i, p):  # a chunk that never arrives: the next ones are one chunk early
        if i != at:
            w.write(p)

    assert run(lost).offset >= where

    def reused(w, i, p):  # the caller's array changed once handed over, before the disk had it
        w.write(p)
        if i == at:
            p[7] ^= 0x01

    monkeypatch.setattr(direct, "BUFFER_BYTES", 2 << 20)  # staged until close: no race with the thread
    e = run(reused)
    pieces[at][7] ^= 0x01
    assert e.offset == where + 7 and "differ from the caller's" in str(e)


def test_writer_falls_back_where_direct_io_is_refused(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses the transfer (EINVAL): buffered."""
    monkeypatch.setattr(direct, "BUFFER_BYTES", 64 << 10)
    real, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct._O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    pieces = _pieces(3, 300_000)
    w = direct.DirectWriter(tmp_path / "out.bin")
    for p in pieces:
        w.write(p)
    w.close()
    assert (tmp_path / "out.bin").read_bytes() == b"".join(pieces)
    assert refused == ([0] if direct._O_DIRECT else [])


def test_write_error_surfaces_in_the_caller(tmp_path, mode, monkeypatch):
    calls = [0]
    real = os.pwrite

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    w = direct.DirectWriter(tmp_path / "out.bin")
    with pytest.raises(OSError) as e:
        for _ in range(64):
            w.write(bytes(50_000))
        w.flush()
    assert e.value.errno == errno.ENOSPC
    w.discard()
    w.wait_written(1 << 40)  # a reader following the file is released, not left waiting


def test_writers_sharing_a_staging_pool_take_the_buffers_of_the_one_before(tmp_path, mode, monkeypatch):
    """StagingPool: a writer takes its ring (and read-back buffer) from the pool and gives them
    back once complete, also after a failed write; the next writer takes those instead of fresh
    ones, and each file holds exactly its own bytes."""
    made = []
    real = direct.staging_buffer

    def counted(count: int = 1):
        made.append(count)
        return real(count)

    monkeypatch.setattr(direct, "staging_buffer", counted)
    pool = direct.StagingPool()
    files = {"a": _pieces(1, 1_000_003), "b": _pieces(2, 5000), "c": _pieces(3, 700_000)}
    for name, pieces in files.items():
        w = direct.DirectWriter(tmp_path / name, read_back=True, staging=pool)
        for p in pieces:
            w.write(memoryview(p))
        w.close()
        assert sorted(made) == [1, direct.BUFFERS] and len(pool) == 2  # the ring and the read-back's
    for name, pieces in files.items():
        assert (tmp_path / name).read_bytes() == b"".join(pieces)

    real_pwrite = os.pwrite

    def failing(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "pwrite", failing)
    w = direct.DirectWriter(tmp_path / "d", read_back=True, staging=pool)
    with pytest.raises(OSError):
        for p in files["a"]:
            w.write(memoryview(p))
        w.flush()
    w.discard()
    monkeypatch.setattr(direct.os, "pwrite", real_pwrite)
    assert len(pool) == 2 and len(made) == 2


def test_scan_follows_a_file_being_written(tmp_path, mode):
    pieces = _pieces(5, 2_000_000)
    data = b"".join(pieces)
    path = tmp_path / "out.bin"
    w = direct.DirectWriter(path)
    reader = direct.open_read(path)
    seen: list[tuple[int, bytes]] = []
    t = threading.Thread(target=lambda: seen.extend(
        (o, c.tobytes()) for o, c in direct.scan(path, 100 << 10, opened=reader, ready=w.wait_written)))
    t.start()
    for p in pieces:
        w.write(p)
    w.close()
    t.join(30)
    assert not t.is_alive()
    assert [o for o, _ in seen] == list(range(0, len(data), 100 << 10))
    assert b"".join(c for _, c in seen) == data


def test_span_crcs_against_slices(tmp_path, mode):
    data = np.random.default_rng(7).integers(0, 256, 700_001, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    cuts = [0, 8, 8, 100, 65536, 65537, 300_000, 700_001, 700_001]
    spans = [(a, b, f"t{i}") for i, (a, b) in enumerate(zip(cuts, cuts[1:]))]
    crcs = mlx_dir.SpanCRCs(spans)
    for offset, chunk in direct.scan(path, 64 << 10):
        crcs.feed(offset, chunk)
    assert crcs.result(path) == {n: zlib.crc32(data[a:b]) for a, b, n in spans}
    short = mlx_dir.SpanCRCs([(0, len(data) + 1, "long")])
    for offset, chunk in direct.scan(path, 64 << 10):
        short.feed(offset, chunk)
    with pytest.raises(mlx_dir.MLXDirError, match="file ends inside tensor 'long'"):
        short.result(path)


def test_shard_writer_verifies_what_reached_the_disk(tmp_path, mode):
    entries = [("a", "U8", (70_000,)), ("b", "F32", (3, 5000)), ("c", "U8", (0,))]
    w = mlx_dir.ShardWriter(tmp_path / "s.safetensors", entries, verify="disk")
    done: list = []
    t = threading.Thread(target=lambda: done.append(w.verify()))
    t.start()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 70_000, dtype=np.uint8)
    b = rng.standard_normal((3, 5000)).astype(np.float32)
    w.write_tensor("a", [a[:1000], a[1000:]])
    w.write_tensor("b", [b])
    w.write_tensor("c", [])
    crcs = w.finish()
    t.join(30)
    assert done and done[0] == crcs == {"a": zlib.crc32(a.tobytes()), "b": zlib.crc32(b.tobytes()), "c": 0}
    raw = Path(tmp_path / "s.safetensors").read_bytes()
    assert raw.endswith(a.tobytes() + b.tobytes())


def test_shard_writer_written_check_names_the_tensor(tmp_path, mode, monkeypatch):
    """verify="written": the file holds the chunks' bytes; a byte altered between the converter's
    chunk and the disk, or a chunk's buffer changed before it was written, fails the shard naming
    the tensor; a header the disk does not hold fails it too."""
    entries = [("a", "U8", (70_000,)), ("b", "F32", (3, 5000)), ("c", "U8", (0,))]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 70_000, dtype=np.uint8)
    b = rng.standard_normal((3, 5000)).astype(np.float32)
    path = tmp_path / "s.safetensors"

    def write(w, after_a=lambda: None):
        w.write_tensor("a", [a[:1000], a[1000:]])
        after_a()
        w.write_tensor("b", [b])
        w.write_tensor("c", [])
        return w.finish()

    assert write(mlx_dir.ShardWriter(path, entries, verify="written")) == {}
    assert path.read_bytes().endswith(a.tobytes() + b.tobytes())

    real, calls = mlx_dir.write_bytes, [0]

    def flip_third(f, data):  # the header, a[:1000], then a[1000:] altered
        calls[0] += 1
        if calls[0] == 3:
            data = bytearray(data)
            data[100] ^= 0xFF
        real(f, data)

    with monkeypatch.context() as m:
        m.setattr(mlx_dir, "write_bytes", flip_third)
        w = mlx_dir.ShardWriter(path, entries, verify="written")
        with pytest.raises(mlx_dir.MLXDirError, match=r"verification failed: tensor 'a' differs"):
            write(w)
        w.abort()

    monkeypatch.setattr(direct, "BUFFER_BYTES", 1 << 20)  # all staged until finish
    b_before = b.copy()
    w = mlx_dir.ShardWriter(path, entries, verify="written")
    with pytest.raises(mlx_dir.MLXDirError, match=r"verification failed: tensor 'a' differs"):
        write(w, after_a=lambda: a.__setitem__(2000, a[2000] ^ 1))  # reused before written
    w.abort()
    assert np.array_equal(b, b_before) and not path.exists()

    real_pread = os.pread
    monkeypatch.setattr(mlx_dir.os, "pread", lambda fd, n, off: b"x" + real_pread(fd, n, off)[1:])
    with pytest.raises(mlx_dir.MLXDirError, match="the header does not match the plan"):
        write(mlx_dir.ShardWriter(path, entries, verify="written"))


def test_read_pair_matches_separate_reads(tmp_path):
    """A weight and its scale side by side (either order) come from one read; apart, from two;
    either way the same arrays as reading each alone, and a NaN scale is refused by name."""
    from ds4mlx.convert.options import ConvertError
    from ds4mlx.convert.plan import Stored, read_pair, read_stored

    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (6, 8), dtype=np.int8)
    s = rng.integers(100, 130, (6, 1), dtype=np.uint8)
    blob = b"\x01" * 13 + s.tobytes() + w.tobytes() + b"\x02" * 5 + s.tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    sw = Stored(path, 13 + s.nbytes, "I8", w.shape, "x.weight")
    s_before = Stored(path, 13, "F8_E8M0", s.shape, "x.scale")
    s_apart = Stored(path, 13 + s.nbytes + w.nbytes + 5, "F8_E8M0", s.shape, "x.scale")
    for sc in (s_before, s_apart):
        got_w, got_s = read_pair(sw, sc)
        assert got_w.dtype == np.int8 and np.array_equal(got_w, w) and np.array_equal(got_w, read_stored(sw))
        assert got_s.dtype == np.uint8 and np.array_equal(got_s, s) and np.array_equal(got_s, read_stored(sc))
    bad = bytearray(blob)
    bad[13 + 2] = 0xFF  # an E8M0 NaN in the scale
    path.write_bytes(bytes(bad))
    with pytest.raises(ConvertError, match="'x.scale' holds 1 NaN"):
        read_pair(sw, s_before)
    path.write_bytes(blob[: 13 + s.nbytes + 10])  # cut inside the weight
    with pytest.raises(ConvertError, match="'x.weight'.*truncated"):
        read_pair(sw, s_before)


def test_read_into_joins_tensors_and_checks_them(tmp_path, monkeypatch):
    """Scales read side by side into one array (short reads that preadv must continue) give the
    bytes read_stored gives one by one; groups cut at the byte budget; a NaN scale and a cut
    file are refused by name."""
    from ds4mlx.convert import plan
    from ds4mlx.convert.options import ConvertError

    rng = np.random.default_rng(5)
    ss = [rng.integers(100, 130, (4, 3), dtype=np.uint8) for _ in range(5)]
    blob, sst = bytearray(b"\x07" * 3), []
    for e, s in enumerate(ss):
        sst.append(plan.Stored(tmp_path / "e.bin", len(blob), "F8_E8M0", s.shape, f"e{e}.scale"))
        blob += s.tobytes() + b"\x09" * e
    path = tmp_path / "e.bin"
    path.write_bytes(bytes(blob))
    real = plan.os.preadv
    monkeypatch.setattr(plan.os, "preadv", lambda fd, views, off: real(fd, [v[: max(1, len(v) // 2)] for v in views[:1]], off))
    groups = plan.expert_groups(sst, chunk_bytes=2 * ss[0].nbytes)
    assert [(g.start, g.stop) for g in groups] == [(0, 2), (2, 4), (4, 5)]
    out, fds = np.empty(sum(s.nbytes for s in ss), np.uint8), {}
    plan.read_into(sst, out, fds)
    assert out.tobytes() == b"".join(plan.read_stored(s).tobytes() for s in sst) == b"".join(s.tobytes() for s in ss)
    for fd in fds.values():
        plan.os.close(fd)
    bad = bytearray(blob)
    bad[sst[3].offset + 2] = 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ConvertError, match="'e3.scale' holds 1 NaN"):
        plan.read_into(sst, out, {})
    path.write_bytes(bytes(blob[: sst[1].offset + 5]))  # cut inside e1
    with pytest.raises(ConvertError, match="'e1.scale'.*truncated"):
        plan.read_into(sst, out, {})


def test_source_ranges_are_staged_and_compared_with_the_source(tmp_path, monkeypatch):
    """A SourceRange is read straight into the staging buffers (across a buffer's end) and the
    output holds the source's bytes; a staged byte that is not the source's (a read landing
    wrong) is caught by the comparison with the source file, naming the tensor; a cut source
    is refused by name."""
    from ds4mlx.io import direct
    from ds4mlx.io.direct import SourceRange

    monkeypatch.setattr(direct, "BUFFER_BYTES", 1 << 16)
    rng = np.random.default_rng(9)
    src = tmp_path / "src.bin"
    data = rng.integers(0, 256, 300_000, dtype=np.uint8)
    src.write_bytes(data.tobytes())
    a = np.arange(1000, dtype=np.uint8)
    entries = [("a", "U8", (1000,)), ("w", "U8", (150_000,))]
    path = tmp_path / "out.safetensors"

    def write(w):
        w.write_tensor("a", [a])
        w.write_tensor("w", [SourceRange(src, 7, 100_000, "w.0"), SourceRange(src, 200_001, 50_000, "w.1")])
        return w.finish()

    for verify in ("written", "disk", None):
        w = mlx_dir.ShardWriter(path, entries, verify=verify)
        write(w)
        assert path.read_bytes().endswith(a.tobytes() + data[7:100_007].tobytes() + data[200_001:250_001].tobytes())

    real = direct._read_full
    calls = [0]

    def misplaced(fd, view, offset):  # the 3rd staging read lands one byte off
        calls[0] += 1
        n = real(fd, view, offset + (calls[0] == 3))
        return n

    with monkeypatch.context() as m:
        m.setattr(direct, "_read_full", misplaced)
        w = mlx_dir.ShardWriter(path, entries, verify="written")
        with pytest.raises(mlx_dir.MLXDirError, match=r"verification failed: tensor 'w' differs"):
            write(w)
        w.abort()
    src.write_bytes(data[:220_000].tobytes())
    w = mlx_dir.ShardWriter(path, entries, verify="written")
    with pytest.raises(mlx_dir.MLXDirError, match=r"src.bin: file ends inside tensor 'w.1'"):
        write(w)
    w.abort()


def test_read_chunks_joins_to_the_tensor_and_checks_every_piece(tmp_path, monkeypatch):
    """As-stored tensors are read in pieces (memory at a piece, not the tensor): the pieces join
    to the stored bytes, and a NaN in any piece (the block-wise check) or a cut file is refused
    by name; the count of bad values equals numpy's over the whole tensor."""
    from ds4mlx.convert import plan
    from ds4mlx.convert.options import ConvertError

    monkeypatch.setattr(plan, "_CHECK_BLOCK", 1 << 12)  # several blocks per piece
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 0x7F00, (300, 1000), dtype=np.uint16)  # finite BF16 bit patterns
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 24 + bits.tobytes())
    s = plan.Stored(path, 24, "BF16", bits.shape, "x.weight")
    pool = plan.BufferPool()
    pieces = [c.copy() for c in plan.read_chunks(s, pool, chunk_bytes=100_001)]
    assert len(pieces) == 6 and all(c.dtype == np.uint16 and c.nbytes <= 100_001 for c in pieces)
    assert np.concatenate(pieces).tobytes() == bits.tobytes()
    bad = bits.copy().reshape(-1)
    bad[[7, 250_000, 299_999]] = [0x7F80, 0xFFC1, 0x7FFF]  # +Inf, a NaN, a NaN: in the first and last pieces
    path.write_bytes(b"\0" * 24 + bad.tobytes())
    want = int(np.count_nonzero((bad & 0x7F80) == 0x7F80))
    assert want == 3
    with pytest.raises(ConvertError, match=rf"'x.weight' holds {want} NaN") as e:
        for _ in plan.read_chunks(plan.Stored(path, 24, "BF16", (bad.size,), "x.weight"), pool, chunk_bytes=bad.nbytes):
            pass
    assert "holds 3" in str(e.value)
    with pytest.raises(ConvertError, match="'x.weight' holds 2 NaN"):  # in later pieces only
        for _ in plan.read_chunks(plan.Stored(path, 24 + 2 * 100_000, "BF16", (200_000,), "x.weight"), pool,
                                  chunk_bytes=100_000):
            pass
    path.write_bytes(b"\0" * 24 + bits.tobytes()[:150_000])
    with pytest.raises(ConvertError, match="'x.weight'.*truncated"):
        list(plan.read_chunks(s, pool, chunk_bytes=100_000))


def test_buffer_pool_reuses_only_buffers_nothing_refers_to():
    import gc
    import sys

    from ds4mlx.convert.plan import BufferPool

    if not hasattr(sys, "getrefcount"):
        pytest.skip("the pool needs reference counts")
    pool = BufferPool(limit=2)
    a = pool.take(1000)
    part = a[10:20].view(np.uint16)  # a view of a view still holds the buffer
    del a
    b = pool.take(1000)
    assert not np.shares_memory(b, part)
    del b
    c = pool.take(500)  # the second buffer is free again
    assert not np.shares_memory(c, part)
    del part
    gc.collect()
    d = pool.take(2000)  # both free: the first fits
    assert np.shares_memory(d, pool.bufs[0]) or np.shares_memory(d, pool.bufs[1])
    e, f = pool.take(10), pool.take(10)  # over the limit: fresh memory, not a buffer in use
    assert not any(np.shares_memory(x, y) for x, y in ((d, e), (d, f), (e, f), (c, e), (c, f)))


def _flip_disk_writes(monkeypatch, at: int) -> None:
    """Flip one byte of the ``at``-th piece on its way from the staging buffer to the disk."""
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, offset):
        calls[0] += 1
        if calls[0] == at:
            import mmap

            b = mmap.mmap(-1, len(data))  # page aligned, as a direct write needs
            b[:] = bytes(data)
            b[len(b) // 2] ^= 0xFF
            return real(fd, b, offset)
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)


def test_convert_verify_disk_same_bytes_and_catches_a_bad_disk_write(tiny_ckpt, tmp_path, monkeypatch):
    from ds4mlx.convert import ConvertError, convert

    monkeypatch.setattr(direct, "BUFFER_BYTES", 1 << 20)
    a = convert(tiny_ckpt, tmp_path / "a", progress=False)
    b = convert(tiny_ckpt, tmp_path / "b", progress=False, verify_disk=True)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        if n != "config.json":  # records the options
            assert (a / n).read_bytes() == (b / n).read_bytes(), n
    _flip_disk_writes(monkeypatch, 3)
    with pytest.raises(ConvertError, match="verification failed: tensor"):
        convert(tiny_ckpt, tmp_path / "c", progress=False, verify_disk=True)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConvertError, match="--verify-disk checks MLX output"):
        convert(tiny_ckpt, tmp_path / "d.gguf", to="gguf", preset="mxfp4", verify_disk=True, progress=False)


def test_gguf_writer_syncs_behind_the_writer(tmp_path, monkeypatch):
    """The written part is synced while the file is written (every SYNC_BYTES), not only by
    the final fsync; the bytes are those of a write without it."""
    from ds4mlx.convert import gguf_writer
    from ds4mlx.convert.gguf_writer import stream_gguf, tensor_entry
    from ds4mlx.synthetic import tiny_config

    # 48 MiB: more than the writer's ring (32 MiB) ahead of the first piece's checks
    arrays = [np.random.default_rng(7).standard_normal((1024, 1024)).astype(np.float32) for _ in range(12)]
    entries = [tensor_entry(f"t{i}", "F32", a.shape) for i, a in enumerate(arrays)]
    stream_gguf(tmp_path / "plain.gguf", tiny_config(), entries, [[a] for a in arrays])
    synced, real = [], os.fdatasync

    def counting(fd):
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(gguf_writer, "SYNC_BYTES", 8 << 20)
    monkeypatch.setattr(gguf_writer.os, "fdatasync", counting)
    stream_gguf(tmp_path / "synced.gguf", tiny_config(), entries, [[a] for a in arrays])
    assert len(synced) >= 2 and min(synced) < 40 << 20  # while 8 MiB or more were still to come
    assert (tmp_path / "synced.gguf").read_bytes() == (tmp_path / "plain.gguf").read_bytes()


def test_gguf_writer_same_bytes_both_ways_and_catches_a_bad_disk_write(tmp_path, mode, monkeypatch):
    """The GGUF writer's file equals gguf-py's own (header, table, padded data) written direct
    or buffered, and a byte changed between the staging buffer and the disk is caught."""
    from gguf import GGMLQuantizationType, GGUFWriter

    from ds4mlx.convert.gguf_writer import DEFAULT_NAME, GGUFError, stream_gguf, tensor_entry
    from ds4mlx.io.gguf import ARCH, gguf_metadata
    from ds4mlx.synthetic import tiny_config

    config = tiny_config()
    rng = np.random.default_rng(5)
    arrays = {"a": rng.standard_normal((3, 50)).astype(np.float32),  # 600 bytes: padded
              "b": rng.standard_normal((300, 256)).astype(np.float32),  # several staging buffers
              "c": rng.standard_normal(7).astype(np.float32)}
    ref = GGUFWriter(str(tmp_path / "ref.gguf"), ARCH)
    ref.add_name(DEFAULT_NAME)
    for key, value, vtype in gguf_metadata(config):
        ref.add_array(key, list(value)) if vtype.name == "ARRAY" else ref.add_key_value(key, value, vtype)
    for n, a in arrays.items():
        ref.add_tensor(n, a, raw_dtype=GGMLQuantizationType.F32)
    ref.write_header_to_file()
    ref.write_kv_data_to_file()
    ref.write_tensors_to_file()
    ref.close()
    entries = [tensor_entry(n, "F32", a.shape) for n, a in arrays.items()]
    chunks = lambda: [[a[: len(a) // 2], a[len(a) // 2:]] for a in arrays.values()]  # noqa: E731
    stream_gguf(tmp_path / "x.gguf", config, entries, chunks())
    assert (tmp_path / "x.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()
    _flip_disk_writes(monkeypatch, 3)
    with pytest.raises(GGUFError, match="verification failed: tensor 'b' differs on disk"):
        stream_gguf(tmp_path / "y.gguf", config, entries, chunks())
