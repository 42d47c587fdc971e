"""Data files: written in staged chunks, hashed as written, direct I/O where the system has it."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


from stages import sha


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_hashed_while_written_has_the_files_sha256(tmp_path, direct):
    """Holes between tensors are zeros in the file and in the hash, the file ends where finish()
    says (also before the end of a direct write's padding); a write behind the previous one drops
    the hash, and the manifest then reads the file; a known hash whose size no longer matches the
    file is not used."""
    from soup_export.engine.datafile import HashedDataFile
    from soup_export.layout import file_table

    fh = HashedDataFile(tmp_path / "a.data", direct=direct)
    fh.write_at(0, np.arange(5, dtype=np.float32))
    fh.write_at(64, b"xyz")
    fh.write_at(200_000, np.ones((3, 4), np.uint8))  # a hole longer than the zero buffer
    digest = fh.finish(300_000)
    assert (tmp_path / "a.data").stat().st_size == 300_000 and digest == sha(tmp_path / "a.data")
    short = HashedDataFile(tmp_path / "c.data", direct=direct)
    short.write_at(10, b"abc")
    assert short.finish(20) == hashlib.sha256(bytes(10) + b"abc" + bytes(7)).hexdigest()
    assert (tmp_path / "c.data").read_bytes() == bytes(10) + b"abc" + bytes(7)
    back = HashedDataFile(tmp_path / "b.data", direct=direct)
    back.write_at(64, b"xyz")
    back.write_at(0, b"ab")
    assert back.finish(67) is None
    assert (tmp_path / "b.data").read_bytes() == b"ab" + bytes(62) + b"xyz"
    table = file_table(tmp_path, {"a.data": ("0" * 64, 300_000), "b.data": ("0" * 64, 1)})
    assert table["a.data"]["sha256"] == "0" * 64  # trusted: the size matches
    assert table["b.data"] == {"sha256": sha(tmp_path / "b.data"), "bytes": 67}  # size differs: read


def _takes_direct_io(directory: Path) -> bool:
    """Whether this directory's file system takes an aligned O_DIRECT write."""
    import errno
    import os

    from soup_export.engine.datafile import ALIGN

    if not hasattr(os, "O_DIRECT"):
        return False
    raw = np.zeros(2 * ALIGN, np.uint8)
    block = raw[-raw.ctypes.data % ALIGN:][:ALIGN]
    try:
        fd = os.open(directory / "probe.direct", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    try:
        return os.pwrite(fd, memoryview(block), 0) == ALIGN
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(directory / "probe.direct")


def _data_file_writes(seed: int = 3):
    """(offset, bytes) writes of many sizes with alignment holes, and the file they make."""
    rng = np.random.default_rng(seed)
    writes, offset = [], 0
    for size in [100, 3000, 70_000, 9000, 17, 1024, 8191, 8, 20_000, 5]:
        writes.append((offset, rng.integers(0, 256, size, dtype=np.uint8)))
        offset += size + int(rng.integers(0, 100))
    expected = bytearray(offset + 50)
    for at, data in writes:
        expected[at:at + data.size] = data.tobytes()
    return writes, bytes(expected)


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_stages_its_writes_in_whole_chunks(tmp_path, monkeypatch, direct):
    """Every write goes through the chunk buffer: few system calls, made by the I/O threads while
    the next chunk is staged, each (with direct I/O) at an offset and of a length that are
    multiples of ALIGN, from an aligned address, except the file's unaligned end, written without
    O_DIRECT, so that the file needs no truncation; the bytes, the file's length and its SHA-256
    are those of the same writes made one by one."""
    import fcntl
    import os
    import threading

    from soup_export.engine import datafile

    monkeypatch.setattr(datafile, "CHUNK", 16384)
    writes, expected = _data_file_writes()
    calls, real, opened, truncated = [], os.pwrite, {}, []

    def spy_write(fd, b, at):
        calls.append((at, memoryview(b), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)),
                      threading.current_thread().name))
        return real(fd, b, at)

    monkeypatch.setattr(datafile.os, "pwrite", spy_write)
    real_open, real_truncate = os.open, os.ftruncate

    def spy_open(path, flags, mode=0o777):
        opened["flags"] = flags
        return real_open(path, flags, mode)

    monkeypatch.setattr(datafile.os, "open", spy_open)
    monkeypatch.setattr(datafile.os, "ftruncate", lambda fd, n: truncated.append(n) or real_truncate(fd, n))
    fh = datafile.HashedDataFile(tmp_path / "d.data", direct=direct)
    for at, data in writes:
        fh.write_at(at, data)
    digest = fh.finish(len(expected))
    assert (tmp_path / "d.data").read_bytes() == expected
    assert digest == hashlib.sha256(expected).hexdigest()
    assert bool(opened["flags"] & getattr(os, "O_DIRECT", 0)) == (direct and hasattr(os, "O_DIRECT"))
    chunks = -(-len(expected) // 16384)  # the zeros after the last write (to finish's size) are staged too
    tail = fh.direct and len(expected) % datafile.ALIGN != 0
    assert len(calls) == chunks + tail < len(writes)  # whole chunks, the last one partial (and its end apart)
    assert [at for at, *_ in calls] == sorted(at for at, *_ in calls) and not truncated
    assert all(name.startswith("soup-export-io") for *_, name in calls[:chunks])  # the chunks: the I/O threads
    if fh.direct:
        *whole, (end, rest, end_direct, _) = calls
        assert all(d and at % datafile.ALIGN == 0 and view.nbytes % datafile.ALIGN == 0
                   and np.frombuffer(view, np.uint8).ctypes.data % datafile.ALIGN == 0 for at, view, d, _ in whole)
        assert not end_direct and end + rest.nbytes == len(expected) and rest.nbytes < datafile.ALIGN
    assert fh.direct == (direct and _takes_direct_io(tmp_path))  # kept to the end where the file system has it (its probe writes too)


@pytest.mark.parametrize("direct", [True, False])
def test_a_data_file_raises_a_failed_background_write_and_closes_only_after_it(tmp_path, monkeypatch, direct):
    """A chunk's write runs in an I/O thread: its failure (a full disk) is raised by the writer's
    next wait, at the latest by finish, never lost; and close (an export that failed elsewhere)
    returns only once the chunk being written is done, so no write outlives its descriptor."""
    import errno
    import os
    import threading
    import time

    from soup_export.engine import datafile

    monkeypatch.setattr(datafile, "CHUNK", 8192)
    real, done = os.pwrite, []

    def full_disk(fd, b, at):
        if at >= 8192:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, b, at)

    monkeypatch.setattr(datafile.os, "pwrite", full_disk)
    fh = datafile.HashedDataFile(tmp_path / "full.data", direct=direct)
    with pytest.raises(OSError, match="No space left"):
        fh.write_at(0, np.ones(3 * 8192, np.uint8))  # the third chunk waits for the second's write
        fh.finish(3 * 8192)
    fh.close()
    assert fh.fd is None

    def slow(fd, b, at):
        time.sleep(0.2)  # still writing when close() is called
        n = real(fd, b, at)
        done.append(threading.current_thread().name)
        return n

    monkeypatch.setattr(datafile.os, "pwrite", slow)
    fh = datafile.HashedDataFile(tmp_path / "slow.data", direct=direct)
    fh.write_at(0, np.ones(8192, np.uint8))  # one whole chunk: handed to an I/O thread at once
    fh.close()
    assert done and done[0].startswith("soup-export-io") and fh.fd is None
    assert (tmp_path / "slow.data").read_bytes() == bytes([1]) * 8192


def test_a_data_file_falls_back_to_ordinary_writes_where_direct_io_is_refused(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT when the file is opened, or only at its first write (both
    EINVAL), gets ordinary writes with the same bytes and hash; SOUP_DIRECT_IO=0 turns it off."""
    import errno
    import os

    from soup_export.engine import datafile

    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    writes, expected = _data_file_writes(4)
    real_open, real_pwrite, refused = os.open, os.pwrite, []

    def refuse_open(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            refused.append("open")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    def refuse_write(fd, data, at):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append("write")
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, at)

    for name, fake in (("open", refuse_open), ("pwrite", refuse_write)):
        with monkeypatch.context() as m:
            m.setattr(datafile.os, name, fake)
            fh = datafile.HashedDataFile(tmp_path / f"{name}.data", direct=True)
            for at, data in writes:
                fh.write_at(at, data)
            assert fh.finish(len(expected)) == hashlib.sha256(expected).hexdigest()
        assert (tmp_path / f"{name}.data").read_bytes() == expected and not fh.direct
    assert refused == ["open", "write"]  # each refused once, then ordinary writes
    assert not datafile.HashedDataFile(tmp_path / "x", direct=False).direct  # the settings' choice (SOUP_DIRECT_IO=0)


def test_files_written_from_memory_go_direct_when_large(tmp_path, monkeypatch):
    """write_file: a file of DIRECT_MIN bytes or more is written as a data file is (O_DIRECT where
    the system has it), a smaller one as usual; both hold exactly the bytes given."""
    import os

    from soup_export.engine import datafile

    opened, real_open = [], os.open

    def spy_open(path, flags, mode=0o777):
        opened.append((Path(path).name, bool(flags & getattr(os, "O_DIRECT", 0))))
        return real_open(path, flags, mode)

    monkeypatch.setattr(datafile.os, "open", spy_open)
    big, small = os.urandom(datafile.DIRECT_MIN + 4097), b'{"a": 1}\n'
    datafile.write_file(tmp_path / "big.json", big, direct=True)
    datafile.write_file(tmp_path / "small.json", small, direct=True)
    assert (tmp_path / "big.json").read_bytes() == big and (tmp_path / "small.json").read_bytes() == small
    assert opened == [("big.json", hasattr(os, "O_DIRECT"))]  # the small one by Path.write_bytes
    opened.clear()
    datafile.write_file(tmp_path / "big2.json", big, direct=False)  # the settings' choice (SOUP_DIRECT_IO=0)
    assert (tmp_path / "big2.json").read_bytes() == big and opened == []
