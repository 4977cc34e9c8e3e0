"""torch.save run for real twice per tensor layout, then repeated as the bytes it wrote.

DCP writes each checkpoint item with a torch.save of its own: a zip archive in about 39 small writes, 0.2 ms of
Python per call. Without the per-record CRC32 (mcore_io turns it off for its saves) every byte of a tensor's archive
but the tensor's own is a function of its layout: dtype, storage size, offset, shape and strides. A model with 48
layers x 128 experts has 31,156 items in a handful of layouts (RESULTS.md, session 16). For each layout the first
two saves run torch.save and record its writes; if the two agree, later tensors of that layout are written as the
recorded bytes around one write of their own storage: the stream sees what torch.save would have written, byte
for byte (tests/test_byte_copy.py compares the files). The same for small plain values by their pickle (megatron-core
serializes each expert's empty `_extra_state` as `[None]`; their CRC32s are those of the pickle). Anything else (other
objects, a tensor with attributes, hooks, conjugate or negative bits or saved with CRC32s) goes to torch.save.
"""
from __future__ import annotations

import ctypes
import pickle
from typing import Callable

import numpy as np
import torch
from torch.serialization import _get_storage_alignment, get_crc32_options

_DATA = None  # in a recorded archive: where the tensor's storage bytes go


def _key(obj) -> tuple | None:
    """What torch.save's archive of `obj` depends on, besides a tensor storage's bytes; None if it may depend on
    more. A tensor: its layout. A value made of None, numbers, strings, bytes, lists, tuples and dicts (megatron-core
    serializes every expert's empty `_extra_state` as `[None]`): its pickle."""
    if not isinstance(obj, torch.Tensor):  # (its CRC32s are those of its pickle)
        return ("value", pickle.dumps(obj, protocol=2), get_crc32_options(), _get_storage_alignment()) \
            if _plain(obj) else None
    t = obj
    if (type(t) is not torch.Tensor or t.device.type != "cpu" or t.layout != torch.strided or t.requires_grad
            or t.is_quantized or t.is_conj() or t.is_neg() or any(getattr(t, "names", ())) or t.__dict__
            or t._backward_hooks or get_crc32_options()):  # (a CRC32 of the tensor's bytes)
        return None
    st = t.untyped_storage()
    if st.nbytes() == 0:
        return None
    return t.dtype, st.nbytes(), t.storage_offset(), tuple(t.shape), t.stride(), _get_storage_alignment()


_PLAIN = (type(None), bool, int, float, str, bytes)


def _plain(v, depth: int = 0) -> bool:
    if type(v) in _PLAIN:
        return True
    if depth > 4 or type(v) not in (list, tuple, dict):
        return False
    items = [*v.keys(), *v.values()] if type(v) is dict else v
    return len(items) <= 16 and all(_plain(x, depth + 1) for x in items)


def _storage_bytes(t: torch.Tensor) -> memoryview:
    st = t.untyped_storage()
    return memoryview((ctypes.c_char * st.nbytes()).from_address(st.data_ptr())).cast("B")


class _Recording:
    """A stream in front of the real one that keeps a copy of every write but the tensor storage's."""

    def __init__(self, f, storage: torch.UntypedStorage | None):
        self._f = f
        self._addr, self._n = (storage.data_ptr(), storage.nbytes()) if storage is not None else (None, None)
        self.parts: list[bytes | None] = []

    def write(self, data):
        m = memoryview(data)
        if m.nbytes == self._n and np.frombuffer(m, np.uint8).ctypes.data == self._addr:
            self.parts.append(_DATA)
        elif self.parts and self.parts[-1] is not _DATA:
            self.parts[-1] += bytes(m)
        else:
            self.parts.append(bytes(m))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


class SaveMemo:
    """torch.save's stand-in during our saves (mcore_io): megatron-core serializes its objects with it, DCP each
    checkpoint item."""

    def __init__(self, save: Callable = torch.save):
        self._save = save
        self._first: dict[tuple, list | None] = {}  # layout -> the parts of its first save (None: not one write)
        self._parts: dict[tuple, list | None] = {}  # layout -> the parts two saves agreed on (None: they did not)
        self.repeated = 0

    def __call__(self, obj, f, *args, **kw):
        key = _key(obj) if not args and not kw and hasattr(f, "write") else None
        parts = self._parts.get(key)
        if parts is not None:
            for part in parts:
                f.write(_storage_bytes(obj) if part is _DATA else part)
            f.flush()  # as torch.save ends
            self.repeated += 1
            return None
        if key is None or key in self._parts:
            return self._save(obj, f, *args, **kw)
        tensor = isinstance(obj, torch.Tensor)
        rec = _Recording(f, obj.untyped_storage() if tensor else None)
        self._save(obj, rec)
        mine = rec.parts if rec.parts.count(_DATA) == tensor else None  # its storage written in one piece
        if key not in self._first:
            self._first[key] = mine
        else:
            first = self._first.pop(key)
            self._parts[key] = mine if mine is not None and mine == first else None
        return None
