"""Content-defined chunking: FastCDC (gear hash) boundaries, streamed from a file.

A boundary is cut where a rolling gear hash of the last bytes matches a mask, so it
depends on the content near it, not on its offset: inserting bytes near the start of a
large file moves the boundaries around the insertion only, and every later chunk keeps
its bytes and its sha256 (restic and borg chunk the same way, with a Rabin hash).

The hash loop is the ``fastcdc`` package's compiled one (Cython, ~500 MB/s here; a
Python loop would be ~50x slower). Its boundaries are a pure function of the bytes and
the three sizes, which a manifest records (``spec``), so a change of parameters only
costs dedup, never correctness.

Files are read with ``readv`` into one reused buffer, never mmapped: a data file truncated
while we read it must give a short read, not a SIGBUS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

KIB = 1024
MIB = 1024 * KIB


def spec(avg: int) -> tuple[int, int, int]:
    """(min, avg, max) chunk sizes for an average ``avg``: 1/4x .. 4x. A cut forced by the
    maximum depends on the offset, not the content, and does not survive an insertion:
    at 2x that happened often enough to cost dedup (measured); restic allows 16x."""
    return max(avg // 4, 64), avg, avg * 4


def spec_name(avg: int) -> str:
    lo, mid, hi = spec(avg)
    return f"fastcdc-{lo}-{mid}-{hi}"


def _cutter() -> object:
    # fastcdc/__init__.py imports click only to warn about its pure-Python fallback;
    # the compiled module is what we want, and its result is the same either way.
    try:
        from fastcdc.fastcdc_cy import fastcdc_cy as cut
    except ImportError:  # pragma: no cover - no wheel for this platform: slow but correct
        from fastcdc.fastcdc_py import fastcdc_py as cut
    return cut


_CUT = None


def boundaries(buf: memoryview | bytes, avg: int) -> list[int]:
    """The lengths of the chunks of ``buf`` (as if ``buf`` were a whole file)."""
    global _CUT
    if not len(buf):
        return []
    if _CUT is None:
        _CUT = _cutter()
    lo, mid, hi = spec(avg)
    return [c.length for c in _CUT(buf, min_size=lo, avg_size=mid, max_size=hi)]  # type: ignore[operator]


def chunks(fd: int, avg: int, block: int = 4 * MIB) -> Iterator[memoryview]:
    """The content-defined chunks of the open file ``fd``, read sequentially.

    Reads into one reused buffer of ``block`` bytes (at least 2 max chunks): all chunks but
    the last of a block are final, the last one is moved to the front and cut again with
    the next read, so the result equals ``boundaries`` of the whole file. Each chunk is a
    view into that buffer, valid until the next one is asked for. Memory: one block.
    """
    lo, _, hi = spec(avg)
    block = max(block, 2 * hi)
    buf = _take(block)
    view = memoryview(buf)
    try:
        have = 0  # bytes of buf in use (the carried-over tail first)
        eof = False
        while True:
            while not eof and have < block:
                n = os.readv(fd, [view[have:]])
                eof = n == 0
                have += n
            if not have:
                return
            if eof and have <= lo:  # a small file is one chunk: no need to ask the cutter
                yield view[:have]
                return
            lengths = boundaries(view[:have], avg)
            keep = lengths if eof else lengths[:-1]  # the last may end only because buf does
            pos = 0
            for n in keep:
                yield view[pos:pos + n]
                pos += n
            if eof:
                return
            buf[:have - pos] = buf[pos:have]  # same length: the buffer is never reallocated
            have -= pos
    finally:
        view.release()
        _give(buf)


# Read buffers are reused from file to file: allocating (and the kernel zeroing) a fresh
# block per file costs more than reading a small file.
_free: list[bytearray] = []


def _take(size: int) -> bytearray:
    try:
        buf = _free.pop()
    except IndexError:
        return bytearray(size)
    return buf if len(buf) == size else bytearray(size)


def _give(buf: bytearray) -> None:
    if len(_free) < 2:
        _free.append(buf)
