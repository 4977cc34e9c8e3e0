"""Byte runs of open files copied into a file at a position, inside the kernel (os.copy_file_range) where it can.

Without torch: the conversion through megatron-core (byte_copy.py) and a replayed one (replay.py) copy the same way.
What is copied is handed to the disk every _STEP bytes (sync_file_range, which does not wait): otherwise the kernel
holds the dirty pages until the final fsync, and writes the whole file to disk only after the copying has stopped
(RESULTS.md session 12: the copy and fsync of the Llama-3.2-1B shape in 0.78x the time, paired), and each copy of
_AT_ONCE or more at once. Smaller copies go together: for the 16 KiB experts of a many-expert model a writeback per
copy made each copy 4x slower (RESULTS.md, session 16).
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys
from typing import Iterator

from .errors import ConversionError

Run = tuple[int, int, int]  # (file descriptor, offset, byte count); descriptor -1: that many zero bytes

_CHUNK = 256 << 20  # bytes read at once where the kernel cannot copy
_STEP = 64 << 20  # bytes copied before their writeback starts
_AT_ONCE = 1 << 20  # a copy of at least this many bytes starts its writeback at once (as up to session 15)
_kernel_copy = hasattr(os, "copy_file_range")
# what copy_file_range answers where it cannot copy between these two files (another file system, old kernels)
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def window(runs: list[Run], skip: int, n: int) -> Iterator[Run]:
    """The runs that make bytes [skip, skip + n) of the runs put end to end."""
    for fd, offset, length in runs:
        if skip >= length:
            skip -= length
            continue
        take = min(length - skip, n)
        yield fd, offset + skip, take
        n, skip = n - take, 0
        if not n:
            return


def copy_runs(runs: list[Run], skip: int, n: int, out: int, pos: int) -> None:
    """Bytes [skip, skip + n) of the runs, end to end, into file `out` at `pos`."""
    for fd, offset, take in window(runs, skip, n):
        if fd < 0:
            zeros(out, pos, take)
        else:
            copy_range(fd, offset, take, out, pos)
        pos += take


def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_range = _sync_file_range()
_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start the writeback of the range's dirty pages, without waiting for it
# output descriptor -> the range copied into it since its writeback last started (what is left at the end, under
# _STEP, goes to disk with the file's fsync; a descriptor number reused for another file only starts a writeback)
_unstarted: dict[int, tuple[int, int]] = {}


def start_writeback(out: int, pos: int, n: int) -> None:
    """Start writing bytes [pos, pos + n) of `out` to disk (best effort: an error only leaves it to fsync)."""
    if _sync_range is not None:
        _sync_range(out, pos, n, _WRITE)


def _copied(out: int, pos: int, n: int) -> None:
    lo, hi = _unstarted.pop(out, (pos, pos))
    lo, hi = min(lo, pos), max(hi, pos + n)
    if hi - lo >= _STEP or n >= _AT_ONCE:
        start_writeback(out, lo, hi - lo)
    else:
        _unstarted[out] = lo, hi


def copy_range(src: int, offset: int, n: int, out: int, pos: int) -> None:
    global _kernel_copy
    while n:
        done = None
        if _kernel_copy:
            try:
                done = os.copy_file_range(src, out, min(n, _STEP), offset, pos)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                _kernel_copy = False
        if done is None:
            done = os.pwrite(out, os.pread(src, min(n, _CHUNK), offset), pos)
        if done == 0:
            raise ConversionError("a source file ended early while being copied (changed during the conversion?)")
        _copied(out, pos, done)
        offset, pos, n = offset + done, pos + done, n - done


def zeros(out: int, pos: int, n: int) -> None:
    block = bytes(min(n, 1 << 20))
    while n:
        done = os.pwrite(out, block[:n], pos)
        pos, n = pos + done, n - done


def write_at(fd: int, data, pos: int) -> None:
    """All of `data` into file `fd` at `pos`."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n
