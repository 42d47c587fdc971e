"""The compiled int4 kernel against the torch path, bit for bit; its read calibration and fallbacks."""
from __future__ import annotations


import numpy as np
import pytest

from soup_export.quantize import Rep, quantize_nbits



def _dyadic(rng, size, scale):
    """Small multiples of powers of two: every product and partial sum below is exact in fp32, so
    the fused values are the same in any order of summation."""
    return (rng.integers(-64, 65, size=size) * scale).astype(np.float32)


def _native_kernel_or_skip():
    """The kernel; a compiler that is present but fails to build it fails the test (only a machine
    without one, or a run with SOUP_NATIVE=0, skips: CI has one, so the kernel is tested there)."""
    import os
    import shutil

    from soup_export.engine import native

    if os.environ.get("SOUP_NATIVE") == "0":
        pytest.skip("SOUP_NATIVE=0 disables the kernel")
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler: batch export uses the torch path")
    native._build(cc)  # raises with the compiler's error
    native._load.cache_clear()
    assert native.kernel() is not None
    return native


@pytest.mark.parametrize("mixes,n,rows,cols,threads", [(13, 5, 7, 96, 3), (2, 5, 7, 96, 3), (5, 4, 7, "chunk", 1),
                                                       (5, 4, 7, "chunk", 2), (1, 5, 7, 96, 3), (1, 4, 7, 8192, 2)])
def test_native_kernel_quantizes_exactly_like_the_torch_path(mixes, n, rows, cols, threads):
    """The compiled fuse-and-quantize kernel against the reference, S + A @ E then quantize_nbits,
    bit for bit: on exact sums its levels (round half to even, clamped), scales (signed extreme,
    all-zero blocks) and nibble order must all be the same. 13 mixes are full tiles and a narrower
    one on every build (tiles of 8 with AVX-512, 6 with AVX2); rows are split over threads
    unevenly. "chunk" columns make a batch's pieces 4 rows of every expert whatever this CPU's L2
    (the chunk size), so 7 rows end in a shorter piece, and each piece prefetches the next.
    One mix takes the kernel's other path (four experts at a time, then the rest, over spans of 512 values that
    cross rows). A batch is checked both ways its tiles can read the bank: from copies of each
    chunk, and in place (which of the two a batch uses is measured per machine)."""
    native = _native_kernel_or_skip()
    if cols == "chunk":
        cols = native.chunk_size() // (4 * n)
        assert cols % 32 == 0 and native.chunk_size() // (n * cols) == 4
    _check_exact_fusion(native, mixes, n, rows, cols, threads)


def test_native_kernel_writes_nothing_for_an_empty_matrix():
    native = _native_kernel_or_skip()
    for rows, cols in ((4, 0), (0, 64)):
        q, scales = native.quantize(np.zeros((rows, cols), np.float32), threads=2)
        assert q.size == scales.size == 0
        q, scales = native.fuse_quantize(np.zeros((rows, cols), np.float32), np.zeros((3, rows, cols), np.float32),
                                         np.ones((2, 3), np.float32), threads=2)
        assert q.shape[:2] == (2, rows) and q.size == scales.size == 0


def test_native_kernel_is_exact_at_every_tile_width():
    """A batch's mixes go through tiles of the kernel's widest width and its last ones through one
    tile of their own width: every width from 1 to the widest (and two full tiles) must be exact."""
    native = _native_kernel_or_skip()
    widest = native.tile_width()
    assert widest in (2, 6, 8)  # the widths the source defines (generic, AVX2 and NEON, AVX-512)
    for mixes in range(1, 2 * widest + 2):
        _check_exact_fusion(native, mixes, 3, 5, 64, 2)


def _check_exact_fusion(native, mixes, n, rows, cols, threads):
    rng = np.random.default_rng(mixes + cols)
    shared, bank = _dyadic(rng, (rows, cols), 2.0 ** -6), _dyadic(rng, (n, rows, cols), 2.0 ** -6)
    alphas = (rng.integers(-8, 9, size=(mixes, n)) * 2.0 ** -3).astype(np.float32)
    shared[2, :32], bank[:, 2, :32] = 0, 0  # an all-zero block: scale 1
    shared[4, :32], bank[:, 4, :32] = -0.0, -0.0  # negative zeros too
    shared[3, 32:64] = (np.arange(32) - 16) * 2.0 ** -5  # scale 1/16: levels at every half, ties both ways
    bank[:, 3, 32:64] = 0
    rep = Rep("nbits", bits=4, block=32)
    for in_place in (False, True):
        q, scales = native.fuse_quantize(shared, bank, alphas, threads=threads, in_place=in_place)
        for m in range(mixes):
            fused = shared + np.tensordot(alphas[m], bank, axes=1)
            ref = quantize_nbits(fused, rep)
            assert np.array_equal(q[m], ref["q"]) and np.array_equal(scales[m], ref["scales"]), (mixes, m, in_place)
        assert scales[0, 2, 0] == scales[0, 4, 0] == 1.0 and scales[0, 3, 1] == 2.0 ** -4


def test_batch_reads_are_measured_once_per_machine_kept_and_can_be_forced(monkeypatch, tmp_path):
    """How a batch's tiles read the bank (in place or through copies: the same bytes, see the test
    below) is timed once per thread count, kept beside the library, timed again only if that entry
    is unreadable or for another thread count, and an export's settings (SOUP_NATIVE_READS) decide
    instead when they say. The kernel is called with the answer, for a batch only."""
    import types

    native = _native_kernel_or_skip()
    measured = native.calibrate_reads(2, experts=3, rows=4, cols=64, mixes=9, rounds=2)  # the real timing
    assert set(measured["ms"]) == {"in-place", "copy"} and all(t > 0 for t in measured["ms"].values())
    # the choice, on a clock that each read advances by a set time: the faster by the median of the
    # rounds after the first (a warm-up), each read timed as the kernel is called for it
    for costs, rounds, in_place, ms in ((((1, 2),), 3, True, {"in-place": 1.0, "copy": 2.0}),
                                        (((1, 9), (5, 3)), 2, False, {"in-place": 5.0, "copy": 3.0}),
                                        (((9, 1), (1, 8), (2, 4), (30, 5)), 4, True, {"in-place": 2.0, "copy": 5.0})):
        now, calls = [0.0], []

        def timed_fuse(shared, bank, alphas, threads, in_place):
            calls.append((bank.shape, alphas.shape, threads, in_place))
            cost = costs[min((len(calls) - 1) // 2, len(costs) - 1)]  # this round's (in place, copy) ms
            now[0] += cost[0 if in_place else 1] / 1e3

        with monkeypatch.context() as m:
            m.setattr(native, "fuse_quantize", timed_fuse)
            m.setattr(native, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
            got = native.calibrate_reads(3, experts=5, rows=4, cols=64, mixes=7, rounds=rounds)
        assert got["in_place"] is in_place and got["ms"] == pytest.approx(ms), (costs, got)
        assert calls == [((5, 4, 64), (7, 5), 3, mode) for _ in range(rounds) for mode in (True, False)]
    monkeypatch.delenv("SOUP_NATIVE_READS", raising=False)
    lib, calls, modes = native.kernel(), [], []
    monkeypatch.setattr(lib, "soup_path", tmp_path / "native_q4-test.so")
    monkeypatch.setattr(native, "calibrate_reads", lambda threads: calls.append(threads) or
                        {"in_place": threads == 2, "ms": {"in-place": 1.0, "copy": 2.0}})

    class Spy:  # the kernel, recording the reads each fuse_q4 call was given
        def __getattr__(self, name):
            return getattr(lib, name)

        def fuse_q4(self, *args):
            modes.append(args[-2])  # in_place (the last argument says whether the bank is bf16)
            return lib.fuse_q4(*args)

    monkeypatch.setattr(native, "kernel", Spy)
    native._measured_reads.cache_clear()
    shared, bank, alphas = np.ones((2, 32), np.float32), np.ones((3, 2, 32), np.float32), np.ones((4, 3), np.float32)
    try:
        assert native.reads_in_place(2) is True and calls == [2]  # measured, and kept
        (kept,) = tmp_path.glob("*.reads.json")
        native._measured_reads.cache_clear()  # another process: read back, not measured
        assert native.reads_in_place(2) is True and calls == [2]
        assert native.reads_in_place(1) is False and calls == [2, 1]  # another thread count: its own timing
        native.fuse_quantize(shared, bank, alphas, 2)
        native.fuse_quantize(shared, bank, alphas, 1)
        native.fuse_quantize(shared, bank, alphas[:1], 2)  # one mix: no tiles, nothing asked
        assert modes == [1, 0, 0]
        kept.write_text("{")
        native._measured_reads.cache_clear()
        assert native.reads_in_place(2) is True and calls == [2, 1, 2]  # unreadable: measured again
        native.fuse_quantize(shared, bank, alphas, 2, in_place=False)  # an export's settings decide: not measured
        assert modes[-1] == 0 and calls == [2, 1, 2]
    finally:
        native._measured_reads.cache_clear()


@pytest.mark.parametrize("n,rows,cols", [(32, 200, 352), (7, 30, 160), (3, 25, 4096)])
def test_native_kernel_gives_a_mix_the_same_bytes_alone_and_in_any_batch(n, rows, cols):
    """A shipping-only single build fuses its one mix four experts at a time (then the rest: 32, 7
    and 3 experts take either loop or both); a batch fuses tiles of up to 8 mixes (6 with AVX2).
    Each mix's sum must be the same chain of multiply-adds either way, so that a customer's bytes
    do not depend on the batch it is exported in: checked on values whose sums do round, for a mix
    at every tile position and over uneven thread splits."""
    native = _native_kernel_or_skip()
    rng = np.random.default_rng(n * rows)
    shared = rng.normal(size=(rows, cols)).astype(np.float32)
    bank = rng.normal(size=(n, rows, cols)).astype(np.float32)
    alphas = rng.normal(size=(13, n)).astype(np.float32)
    q, scales = native.fuse_quantize(shared, bank, alphas, threads=2)
    copied = native.fuse_quantize(shared, bank, alphas, threads=3, in_place=False)
    in_place = native.fuse_quantize(shared, bank, alphas, threads=3, in_place=True)
    assert all(np.array_equal(a, b) for a, b in zip((*copied, *in_place), (q, scales, q, scales)))
    widest = native.tile_width()
    starts = list(range(0, 13, widest))  # 13 mixes: full tiles, then one narrower tile
    for m in sorted({i for s in starts for i in (s, min(s + widest, 13) - 1)}):  # each tile's first and last
        for threads in (1, 3):
            q1, s1 = native.fuse_quantize(shared, bank, alphas[m:m + 1], threads=threads)
            assert np.array_equal(q1[0], q[m]) and np.array_equal(s1[0], scales[m]), (m, threads)
    empty = native.fuse_quantize(shared, bank, alphas[:0], threads=2)  # no mix: nothing written, nothing read
    assert empty[0].shape[0] == empty[1].shape[0] == 0
    ref = quantize_nbits(shared + np.tensordot(alphas[12].astype(np.float64), bank, axes=1).astype(np.float32),
                         Rep("nbits", bits=4, block=32))
    np.testing.assert_allclose(scales[12], ref["scales"], rtol=1e-5)  # the sum itself: fp32 rounding


def test_native_quantization_of_fused_values_equals_quantize_nbits_bit_for_bit():
    """Every int4 export (single builds too) encodes through the compiled quantization when there
    is one: on the same fp32 values it must give quantize_nbits' bytes exactly, through encode_mixes
    for both the MatMulNBits and the gather layouts."""
    from soup_export.engine.encode import encode_mixes, encode_one
    from soup_export.graph import Stored

    native = _native_kernel_or_skip()
    rng = np.random.default_rng(7)
    fused = rng.normal(size=(3, 37, 96)).astype(np.float32)
    fused[0, 1, :32] = 0  # an all-zero block
    fused[1, 2, 32:64] = (np.arange(32) - 16) * 2.0 ** -5  # ties at every half
    fused[2, 3, :32] = rng.normal(size=32).astype(np.float32) * 1e-40  # subnormals
    rep = Rep("nbits", bits=4, block=32)
    for w in fused:
        q, scales = native.quantize(w, threads=2)
        ref = quantize_nbits(w, rep)
        assert np.array_equal(q, ref["q"]) and np.array_equal(scales, ref["scales"])
    for how in ("nbits-linear", "nbits-gather"):
        spec = Stored("w", np.dtype(np.uint8), (), "w", how, rep, "q")
        for got, w in zip(encode_mixes(fused, spec, kernel=True), fused):
            ref = encode_one(w, spec)
            assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref), how


def test_native_kernel_falls_back_without_a_compiler(monkeypatch, tmp_path):
    """No compiler, or one that fails to build the kernel (remembered): no kernel, the torch path.
    (SOUP_NATIVE=0 is an export's setting: tests/test_engine.py.)"""
    from soup_export.engine import native

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("SOUP_NATIVE", raising=False)
    try:
        for cc in ("/nonexistent/cc", "false", "false"):  # no compiler; one that fails (a warning), then remembered
            monkeypatch.setenv("CC", cc)
            native._load.cache_clear()
            assert native.kernel() is None and not native.applies(Rep("nbits", bits=4, block=32), (4, 32), (np.zeros((2, 4, 32)),))
            assert not native.quantizes(Rep("nbits", bits=4, block=32), (4, 32))
        assert len(list((tmp_path / "soup" / "native").glob("*.failed"))) == 1
    finally:
        native._load.cache_clear()
