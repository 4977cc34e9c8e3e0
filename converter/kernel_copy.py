"""Byte runs of open files copied into a file at a position, inside the kernel (os.copy_file_range) where it can.

Without torch: the conversion through megatron-core (byte_copy.py) and a replayed one (replay.py) copy the same way.
"""
from __future__ import annotations

import errno
import os
from typing import Iterator

from .errors import ConversionError

Run = tuple[int, int, int]  # (file descriptor, offset, byte count); descriptor -1: that many zero bytes

_CHUNK = 256 << 20  # bytes read at once where the kernel cannot copy
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


def copy_range(src: int, offset: int, n: int, out: int, pos: int) -> None:
    global _kernel_copy
    while n:
        done = None
        if _kernel_copy:
            try:
                done = os.copy_file_range(src, out, n, offset, pos)
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY:
                    raise
                _kernel_copy = False
        if done is None:
            done = os.pwrite(out, os.pread(src, min(n, _CHUNK), offset), pos)
        if done == 0:
            raise ConversionError("a source file ended early while being copied (changed during the conversion?)")
        offset, pos, n = offset + done, pos + done, n - done


def zeros(out: int, pos: int, n: int) -> None:
    block = bytes(min(n, 1 << 20))
    while n:
        done = os.pwrite(out, block[:n], pos)
        pos, n = pos + done, n - done
