"""Byte runs of open files copied into a file at a position, inside the kernel (os.copy_file_range) where it can.

Without torch: the conversion through megatron-core (byte_copy.py) and a replayed one (replay.py) copy the same way.
What is copied is handed to the disk every _STEP bytes (sync_file_range, which does not wait): otherwise the kernel
holds the dirty pages until the final fsync, and writes the whole file to disk only after the copying has stopped
(RESULTS.md session 12: the copy and fsync of the Llama-3.2-1B shape in 0.78x the time, paired), and each copy of
_AT_ONCE or more at once. Smaller copies go together: for the 16 KiB experts of a many-expert model a writeback per
copy made each copy 4x slower (RESULTS.md, session 16).

Where the output's bytes can lie at the source's offset modulo ALIGN (the early copy's files, preplace.py),
`direct_copy` writes them with O_DIRECT from a map of the source instead: the disk reads the source's page cache
itself, where copy_file_range has the kernel copy every byte into new page cache first (on the 2-core box that copy
was most of a conversion's kernel time, one core's memcpy; RESULTS.md session 19).
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from typing import Iterator

from .errors import ConversionError

Run = tuple[int, int, int]  # (file descriptor, offset, byte count); descriptor -1: that many zero bytes

_CHUNK = 256 << 20  # bytes read at once where the kernel cannot copy
_STEP = 64 << 20  # bytes copied before their writeback starts
_AT_ONCE = 1 << 20  # a copy of at least this many bytes starts its writeback at once (as up to session 15)
_kernel_copy = hasattr(os, "copy_file_range")
# O_DIRECT's alignment of memory, file offsets and lengths here: a page (a map's offset must be one), which covers
# the logical block of the disks one meets (512 or 4096 bytes)
ALIGN = max(4096, mmap.ALLOCATIONGRANULARITY)
_direct = hasattr(os, "O_DIRECT")
_ENDED = "a source file ended early while being copied (changed during the conversion?)"
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


def copy_runs(runs: list[Run], skip: int, n: int, out: int, pos: int, direct: int = -1) -> None:
    """Bytes [skip, skip + n) of the runs, end to end, into file `out` at `pos` (with `direct_copy` where `direct`
    is `out` opened by open_direct)."""
    for fd, offset, take in window(runs, skip, n):
        if fd < 0:
            zeros(out, pos, take)
        else:
            direct_copy(fd, offset, take, out, direct, pos)
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
            raise ConversionError(_ENDED)
        _copied(out, pos, done)
        offset, pos, n = offset + done, pos + done, n - done


def open_direct(path) -> int:
    """`path` (an existing file) opened again for writing with O_DIRECT, or -1 where that is refused (tmpfs, say)."""
    if not _direct:
        return -1
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return -1


def direct_copy(src: int, offset: int, n: int, out: int, direct: int, pos: int) -> None:
    """copy_range, where `direct` is `out`'s file opened by open_direct and pos == offset modulo ALIGN: the whole
    pages between are written from a map of the source through `direct`, the ends through `out`. (A page the ends
    write through the page cache is never one written directly, so neither write can undo the other.) Where the
    disk refuses a direct write, every copy from then on goes through copy_range."""
    global _direct
    lo, hi = -(-offset // ALIGN) * ALIGN, (offset + n) // ALIGN * ALIGN
    if not _direct or direct < 0 or (pos - offset) % ALIGN or hi <= lo:
        copy_range(src, offset, n, out, pos)
        return
    if lo > offset:
        copy_range(src, offset, lo - offset, out, pos)
    at = lo
    while at < hi:
        take = min(_STEP, hi - at)
        try:
            with mmap.mmap(src, take, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=at) as view:
                done = 0
                while done < take:
                    with memoryview(view)[done:] as rest:
                        done += os.pwrite(direct, rest, pos + at - offset + done)
        except ValueError:  # (mmap's answer for a map past the source file's end)
            raise ConversionError(_ENDED) from None
        except OSError as exc:
            if exc.errno == errno.EFAULT:  # (the kernel's, for a source cut short once mapped)
                raise ConversionError(_ENDED) from None
            if exc.errno != errno.EINVAL:
                raise
            _direct = False  # this disk's alignment is larger, or direct writes from a map are refused here
            copy_range(src, at, offset + n - at, out, pos + at - offset)
            return
        at += take
    if offset + n > hi:
        copy_range(src, hi, offset + n - hi, out, pos + hi - offset)


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
