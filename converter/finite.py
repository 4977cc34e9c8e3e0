"""NaN and Inf in stored floating-point bytes, counted through a memory map of the file, without torch.

A float is NaN or Inf exactly when its exponent bits are all ones: with the sign bit cleared, its bits read as an
unsigned integer are at least the +Inf pattern (float8 e4m3fn has no Inf; its NaN is the top pattern). Read as
integers by numpy, every stored float format is checked the same way, by the conversion through torch and by a
replayed one (replay.py), with no copy and no cast.
"""
from __future__ import annotations

import mmap
import os

import numpy as np

# safetensors dtype -> (unsigned integer of its width, the bits without the sign, the smallest NaN/Inf pattern)
FLOATS = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
          "F32": (np.uint32, 0x7FFF_FFFF, 0x7F80_0000),
          "F64": (np.uint64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000),
          "F8_E4M3": (np.uint8, 0x7F, 0x7F), "F8_E5M2": (np.uint8, 0x7F, 0x7C)}

_MAPPED = 64 << 20  # bytes mapped at once (mapped pages count in the process's RSS while mapped)
_BLOCK = 512 << 10  # bytes masked at once: they stay in the core's cache between the mask and the comparison


def nonfinite(fd: int, offset: int, nbytes: int, dtype: str) -> int:
    """How many NaN/Inf values the `nbytes` bytes at `offset` of open file `fd` hold as safetensors dtype `dtype`
    (0 for the integer dtypes)."""
    if dtype not in FLOATS or nbytes <= 0:
        return 0
    kind, mask, bad = FLOATS[dtype]
    width = np.dtype(kind).itemsize
    if nbytes <= _BLOCK:  # read, not mapped: a map and unmap per tensor cost more than the copy (many small experts)
        values = np.empty(nbytes // width, kind)
        if os.preadv(fd, [values], offset) != values.nbytes:
            raise OSError(f"short read of {nbytes} bytes at {offset}")
        return _count(values, mask, bad, out=values)
    scratch = np.empty(_BLOCK // width, kind)
    step = _MAPPED - _MAPPED % width
    count = 0
    for start in range(offset, offset + nbytes, step):
        n = min(step, offset + nbytes - start)
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, start - base + n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base) as m:
            values = np.frombuffer(m, kind, n // width, start - base)
            for i in range(0, values.size, scratch.size):
                part = scratch[:min(scratch.size, values.size - i)]
                count += _count(values[i:i + part.size], mask, bad, out=part)
            del values  # the map cannot close while an array exports it
    return count


def _count(values: np.ndarray, mask: int, bad: int, out: np.ndarray) -> int:
    """NaN/Inf among `values` (their bits), masked into `out`; counted only where the maximum says there is one."""
    np.bitwise_and(values, mask, out=out)
    return int(np.count_nonzero(out >= bad)) if out.max(initial=0) >= bad else 0


def message(sources, count: int, dtype: str, target: str) -> str:
    return (f"{', '.join(sources)} holds {count} non-finite values (NaN/Inf) as {dtype} (for {target}); pass "
            "--allow-nonfinite to convert it anyway")
