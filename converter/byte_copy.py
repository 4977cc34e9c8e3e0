"""Megatron tensors whose bytes are runs of the source files' bytes, copied file to file inside the kernel.

At the stored dtype, a tensor that rows.py reads by rows (a copy, the q/k/v interleave, gate and up concatenated,
vocabulary padding) is a list of byte runs of the safetensors files. Such a tensor is never read into memory: the
writer gets a placeholder of its size whose pages are never touched, and where torch.save (inside DCP's writer)
writes the placeholder's bytes, the output stream copies the runs instead with os.copy_file_range: page cache to
page cache inside the kernel, as `cat` does. Every other byte of the file (zip records, pickles, .metadata) is
DCP's and torch.save's own, so the file is the one a write from memory gives, byte for byte. Where the source's
tensors were copied into the checkpoint early (preplace.py), an item that is one of them is the same archive, around
that copy instead (`_Stream.item`, `DirectWrites.place`); an item of other runs of the source (the q/k/v interleave)
goes to the end of one of those files, its runs written there directly.
"""
from __future__ import annotations

import bisect
import collections
import contextlib
import math
import os
import threading

import numpy as np
import torch

from .errors import ConversionError
from . import preplace
from .kernel_copy import Run, copy_runs, window
from .rows import readable_by_rows, source_runs


def byte_runs(job, hf, dtype: torch.dtype) -> list[Run] | None:
    """The source byte runs that make Megatron tensor `job.mcore` at `dtype`, in order; None when making it takes
    more than moving rows (a cast, a transpose, dequantization)."""
    if not readable_by_rows(job, hf) or any(hf.dtype(s) != dtype for s in job.sources):
        return None
    ranges = [hf.byte_range(s) for s in job.sources]
    if any(r is None for r in ranges):
        return None
    row = math.prod(job.ctx.shape[1:]) * dtype.itemsize
    runs: list[Run] = []
    for src, first, n in source_runs(job, hf):
        fd, offset, _ = ranges[src]
        run = (-1, 0, n * row) if first < 0 else (fd, offset + first * row, n * row)
        last = runs[-1] if runs else None
        if last and last[0] == run[0] and (run[0] < 0 or last[1] + last[2] == run[1]):
            runs[-1] = (last[0], last[1], last[2] + run[2])
        else:
            runs.append(run)
    if sum(r[2] for r in runs) != math.prod(job.ctx.shape) * dtype.itemsize:
        raise ConversionError(f"internal: the source runs of {job.mcore} do not add up to its size")
    return runs


class DirectWrites:
    """Placeholders handed to the writer, the runs each stands for, and the pieces of them the writer must write.

    `file_system` wraps DCP's file system so that its write of a piece's bytes becomes copies of the runs;
    `check` then says whether every expected piece was written that way (a piece the writer copied first, and so
    would have written as zeros, stops the conversion)."""

    def __init__(self, recorder=None, placement=None):
        self.recorder = recorder  # replay.Recorder: what the streams wrote, to convert this shape again without torch
        self._lock = threading.Lock()  # placeholders are made in the resolver's thread, written in DCP's
        self._starts: list[int] = []
        self._held: dict[int, tuple[torch.Tensor, list[Run]]] = {}  # address -> placeholder, runs
        self._pieces: dict[int, dict[int, int]] = {}  # placeholder address -> piece address -> byte count
        # byte count -> pieces of that size still to be written: most of the writer's writes (zip headers, pickles;
        # about 24 per tensor) are told apart by their size alone, without finding their address
        self._sizes: collections.Counter[int] = collections.Counter()
        self.copied = 0
        self.error: ConversionError | None = None  # the first write that stopped the writer
        self.placement = placement  # preplace.Placement: source tensors copied into a file of their own early
        # the items in its files (Placement.finish): the tensor each goes around (-1: runs placed as it was written),
        # the file, where its bytes start there, their count, its records before and after them
        self.placed: list[tuple[int, int, int, int, bytes, bytes]] = []

    def placeholder(self, shape: tuple[int, ...], dtype: torch.dtype, runs: list[Run]) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype)  # never read nor written: its pages are never touched
        if t.numel():
            with self._lock:
                bisect.insort(self._starts, t.data_ptr())
                self._held[t.data_ptr()] = (t, runs)
        return t

    def expect(self, base: torch.Tensor, pieces) -> None:
        """The writer will write these pieces (tensors over `base`'s memory) of `base`, if it is a placeholder."""
        with self._lock:
            if base.data_ptr() not in self._held:
                return
            want = self._pieces.setdefault(base.data_ptr(), {})
            for p in pieces:
                if self._owner(p.data_ptr(), p.nbytes) != base.data_ptr():
                    raise ConversionError("internal: a checkpoint piece of a directly copied tensor is not a view "
                                          "of it")
                if (before := want.get(p.data_ptr())) is not None:
                    self._sizes[before] -= 1
                want[p.data_ptr()] = p.nbytes
                self._sizes[p.nbytes] += 1

    def _owner(self, addr: int, n: int) -> int | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        end = start + self._held[start][0].nbytes
        if addr >= end:
            return None
        if addr + n > end:
            raise ConversionError("internal: the writer wrote past the end of a directly copied tensor")
        return start

    def take(self, data) -> tuple[list[Run], int, int] | None:
        """The runs behind `data` (a buffer being written), the offset into them and the byte count, if `data` is
        a placeholder's piece; it is then no longer expected."""
        n = memoryview(data).nbytes
        if not self._sizes[n]:  # (a placeholder's piece written otherwise leaves it unwritten: `check` stops then)
            return None
        addr = np.frombuffer(data, np.uint8).ctypes.data
        with self._lock:
            start = self._owner(addr, n)
            if start is None:
                return None
            want = self._pieces.get(start, {})
            if want.get(addr) != n:
                raise ConversionError("internal: the writer wrote an unexpected part of a directly copied tensor")
            runs = self._held[start][1]
            del want[addr]
            self._sizes[n] -= 1
            if not want:  # all its pieces are written: the placeholder may go
                del self._pieces[start], self._held[start]
                self._starts.remove(start)
        return runs, addr - start, n

    def copy(self, raw, piece: tuple[list[Run], int, int], name: str) -> None:
        """A piece (`take`) copied from its runs into `raw` (file `name`) at its position."""
        runs, skip, n = piece
        raw.flush()
        pos = raw.tell()
        copy_runs(runs, skip, n, raw.fileno(), pos)
        raw.seek(pos + n)
        if self.recorder is not None:
            self.recorder.runs(name, pos, runs, skip, n)
        self.copied += n

    def place(self, held: list) -> tuple[str, int, int] | None:
        """An item's writes (`_Stream.item`) around one piece of source bytes, between records that fit the room of
        a placed file (preplace.py): where that piece is one source tensor the early copying has, the item goes
        around it; where it is other runs of the source files (the q/k/v interleave, a tensor-parallel slice) of at
        least preplace.MIN_BYTES, they are copied now to the end of a placed file that takes direct writes. Then
        (file, offset, length) says where the item lies, and its records are kept for `Placement.finish` to write
        (nothing else writes into that file while its copying runs); else None."""
        p = self.placement
        pieces = [i for i, w in enumerate(held) if not isinstance(w, bytes)]
        if p is None or len(pieces) != 1:
            return None
        k = pieces[0]
        before, after = b"".join(held[:k]), b"".join(held[k + 1:])
        runs, skip, n = held[k]
        run = list(window(runs, skip, n))
        if max(len(before), len(after)) > preplace.ROOM or not any(r[0] >= 0 for r in run):
            return None
        i = p.find(*run[0]) if len(run) == 1 else None
        if i is not None and p.copied_early(i):
            _, _, _, k, at = p.tensors[i]
        elif i is None and n >= preplace.MIN_BYTES and (room := p.place_runs(run)) is not None:
            k, at = room
        else:
            return None
        self.placed.append((-1 if i is None else i, k, at, n, before, after))
        if self.recorder is not None:
            self.recorder.placed(preplace.name(k), at - len(before), before, run, after)
        self.copied += n
        return preplace.name(k), at - len(before), len(before) + n + len(after)

    def check(self) -> None:
        if self._held:
            raise ConversionError(f"internal: {len(self._held)} directly copied tensors were not written in full")

    def file_system(self, fs):
        return _FileSystem(fs, self)


class _Stream:
    """DCP's output stream, with writes of placeholder pieces turned into copies of their runs.

    While DCP writes one item (`item`), its writes are held back, so that an item whose data is one placed source
    tensor (preplace.py) can go around that tensor instead, in its placed file; any other item follows here as
    it would have. A large write that is not a piece (a tensor made in memory) ends the holding back."""

    def __init__(self, raw, direct: DirectWrites, name: str):
        self._raw, self._direct, self._name = raw, direct, name
        self._held: list | None = None  # the current item's writes: bytes, or a piece (DirectWrites.take)
        self._held_bytes = 0

    def write(self, data) -> int:
        try:
            piece = self._direct.take(data)
        except ConversionError as exc:  # torch.save's zip writer loses it (its exit fails on the position)
            self._direct.error = self._direct.error or exc
            raise
        n = piece[2] if piece is not None else memoryview(data).nbytes
        if self._held is not None and (piece is not None or n <= _HOLD):
            self._held.append(piece if piece is not None else bytes(memoryview(data).cast("B")))
            self._held_bytes += n
            return n
        self._release()
        self._put(data, piece)
        return n

    def _put(self, data, piece) -> None:
        if piece is not None:
            self._direct.copy(self._raw, piece, self._name)
            return
        if self._direct.recorder is not None:
            self._direct.recorder.literal(self._name, self._raw.tell(), data)
        self._raw.write(data)

    def _release(self) -> None:
        """Write what was held back, here."""
        held, self._held, self._held_bytes = self._held, None, 0
        for w in held or ():
            if isinstance(w, bytes):
                self._put(w, None)
            else:
                self._put(None, w)

    def tell(self) -> int:
        return self._raw.tell() + self._held_bytes

    @contextlib.contextmanager
    def item(self):
        """Hold back one item's writes; yields a list that then holds (file, offset, length) if the item went to
        a placed file instead of this one."""
        where: list = []
        self._held, self._held_bytes = [], 0
        try:
            yield where
            placed = self._direct.place(self._held) if self._held is not None else None
        except BaseException:  # the conversion stops: nothing more is written
            self._held, self._held_bytes = None, 0
            raise
        if placed is not None:
            where.append(placed)
            self._held, self._held_bytes = None, 0
        self._release()

    def __getattr__(self, name):
        return getattr(self._raw, name)


_HOLD = 16 << 10  # a write larger than this, not a piece, is no part of torch.save's records around a placed tensor


class _FileSystem:
    def __init__(self, fs, direct: DirectWrites):
        self._fs, self._direct = fs, direct

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with self._fs.create_stream(path, mode) as raw:
            yield _Stream(raw, self._direct, os.path.basename(path)) if "w" in mode else raw

    def __getattr__(self, name):
        return getattr(self._fs, name)
