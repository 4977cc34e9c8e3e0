"""Source tensors copied into the checkpoint while torch and megatron-core are still being imported.

A first conversion spent its first 2.5 s importing torch and megatron-core on one core while the other idled, and
only then began to copy (RESULTS.md, session 17): on Llama-3.2-1B that start-up alone was 1.08x a plain copy of
the files. Which Megatron tensor ends up where in DCP's files is known only after those imports, but most
checkpoint items are one whole source tensor as stored (a norm, an output projection, the gate or the up half of
one expert's linear_fc1). So, before the imports, every source tensor of the output's dtype gets a place of its
own in one of a few extra files (`name(k)`, one per core), with room around it, and one thread per file copies
the tensors there: at the source's offset modulo a page, so that the pages between a tensor's ends go to disk as
O_DIRECT writes from a map of the source (kernel_copy.direct_copy), with no copy of the bytes in the kernel. (Through
the page cache, a file's copy is one core's memcpy and two threads writing one file spin on its lock; with direct
writes into two files the 8 GiB MoE input was copied in 0.3-0.5x the time of `cat`, RESULTS.md session 19.) A
forked process counts the tensors' NaN/Inf values meanwhile, for the writer's check. When DCP writes an item whose
bytes are exactly one such tensor, byte_copy.py keeps torch.save's records of it (704 and 873 bytes in torch 2.14)
for the room around the tensor, and the item's storage entry names that place; an item of other runs of the source
files (the q/k/v interleave, a tensor-parallel slice) is copied by its rank to new room at the end of a placed file,
with the same direct writes (`place_runs`); items made in memory are written as before, into their rank's own file.
DCP's reader finds every item by its file, offset and length, so Megatron-LM reads these files as any other.

The copying runs in the process that imports, and after a fork (--workers) beside the ranks, until the end. A
tensor it has not reached when the writer needs it the writer copies into its place itself (`copied_early`), or,
where the file takes no direct writes, into its rank's own file. At the end, rank 0 stops the copying, writes every
item's records, completes any tensor an item relies on that the copying left half-done, gives back the space of
tensors no item used (the q/k/v projections interleaved into linear_qkv, for one), and syncs the files (`finish`).

Without torch: the command line starts this before its imports. Only a head start: where it cannot run (no space,
an error) the writer copies every tensor itself.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import multiprocessing
import os
import shutil
import signal
import stat
import struct
import threading
import time
from pathlib import Path

from . import readahead
from .errors import ConversionError
from .finite import nonfinite
from .kernel_copy import ALIGN, copy_runs, direct_copy, open_direct, write_at
from .launch import cores, launched_by_torchrun
from .shards import read_header
from .stopping import die_with_parent

PREFIX = "__placed_"  # the placed files: PREFIX + k + ".distcp"
ROOM = 4096  # bytes left free before and after each tensor for torch.save's records
MIN_BYTES = 1 << 20  # smaller tensors are not worth two pages of room each (and are few bytes in all)
_STEP = 64 << 20  # bytes copied between two looks at the stop flag
FILE_BYTES = 256 << 20  # a file (and its thread) for every this many bytes to place, one per core at most
MAX_FILES = 8
FREE, COPYING, COPIED, TAKEN = 0, 1, 2, 3  # per tensor: nobody's yet; the thread's; the thread's, done; not here
_DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_STOP = 0  # flags: the threads (and the checking process) are to stop; flag 1 + k: copying thread k has stopped


def name(k: int) -> str:
    """The k-th placed file's name."""
    return f"{PREFIX}{k}.distcp"


class Placement:
    """Where each eligible source tensor goes in the placed files (inside `scratch`), and the threads copying them
    there."""

    def __init__(self, hf_dir: Path, out_dir: Path, dtype: str, scratch: Path, lock: int, check: bool = True):
        self.hf_dir, self.out_dir, self.scratch = hf_dir.resolve(), out_dir.resolve(), scratch
        self._lock_fd = lock  # holds the scratch directory's lock (atomic.scratch_dir)
        self.dtype = dtype
        self._fds: list[int] = []
        found: list[tuple[int, int, int, tuple]] = []  # (source fd, offset, byte count, its key in _index)
        try:
            for path, _ in readahead.plan(hf_dir):  # the shards, regular files only (a FIFO would block)
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
                self._fds.append(fd)
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    continue
                header, start = read_header(path)
                mine = [(v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
                        for k, v in header.items() if k != "__metadata__" and v.get("dtype") == _DTYPES[dtype]]
                for begin, n in sorted(mine):
                    if n >= MIN_BYTES and start + begin + n <= st.st_size:  # (a truncated file: the reader says)
                        found.append((fd, start + begin, n, (st.st_dev, st.st_ino, start + begin, n)))
            files = max(1, min(cores(), MAX_FILES, sum(t[2] for t in found) // FILE_BYTES))
            # each tensor, in the source's order, into the file with the fewest bytes so far: the threads finish
            # together
            ends = [0] * files
            self.tensors: list[tuple[int, int, int, int, int]] = []  # (source fd, offset, bytes, file, place there)
            self._index: dict[tuple[int, int, int, int], int] = {}  # (device, inode, offset, bytes) -> tensor
            for fd, offset, n, key in found:
                k = min(range(files), key=ends.__getitem__)
                place = _room_after(ends[k], offset)
                self._index[key] = len(self.tensors)
                self.tensors.append((fd, offset, n, k, place))
                ends[k] = place + n + ROOM
            self.size = sum(ends)
            self.paths = [scratch / name(k) for k in range(files)]
            self.out: list[int] = []  # the placed files, open
            self._direct: list[int] = []  # the same, opened for writing with O_DIRECT (or -1)
            for path in self.paths:
                self.out.append(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666))
                self._direct.append(open_direct(path))
            for fd, end in zip(self.out, ends):
                os.ftruncate(fd, end)  # its full size at once: no direct write extends it
            self._ends = mmap.mmap(-1, 8 * files)  # shared with ranks forked later: where place_runs adds room
            self._ends.write(struct.pack(f"{files}q", *ends))
        except BaseException:
            for fd in (*self._fds, *getattr(self, "out", ()), *getattr(self, "_direct", ())):
                if fd >= 0:
                    os.close(fd)
            raise
        # shared with ranks forked later: each tensor's state and NaN/Inf count (-1: not counted yet), the flags
        self._state = mmap.mmap(-1, max(1, len(self.tensors)))
        self._counts = mmap.mmap(-1, 8 * max(1, len(self.tensors)))
        self._counts.write(struct.pack("q", -1) * len(self.tensors))
        self._flags = mmap.mmap(-1, 1 + files)
        self._lock = multiprocessing.Lock()
        self._owner = os.getpid()
        self._checker = self._fork_checker() if check else -1
        self._threads = [threading.Thread(target=self._copy_all, args=(k,), name=f"hf2mcore-preplace-{k}",
                                          daemon=True) for k in range(files)]
        for t in self._threads:
            t.start()

    def find(self, fd: int, offset: int, n: int) -> int | None:
        """The tensor whose bytes are bytes [offset, offset + n) of open file `fd`, if it has a place."""
        st = os.fstat(fd)
        return self._index.get((st.st_dev, st.st_ino, offset, n))

    def only_within(self, runs) -> None:
        """Leave uncopied every tensor that lies whole within none of `runs` (the byte runs of all Megatron tensors,
        kernel_copy.Run): no item can be exactly it (the q/k/v projections interleaved per query group, say)."""
        by_file: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for (dev, ino, offset, n), i in self._index.items():
            by_file.setdefault((dev, ino), []).append((offset, offset + n, i))
        for spans in by_file.values():
            spans.sort()
        files: dict[int, list] = {}
        keep = set()
        for fd, offset, n in runs:
            if fd < 0:
                continue
            if fd not in files:
                st = os.fstat(fd)
                files[fd] = by_file.get((st.st_dev, st.st_ino), [])
            spans = files[fd]
            j = bisect.bisect_left(spans, (offset,))
            while j < len(spans) and spans[j][0] < offset + n:
                if spans[j][1] <= offset + n:
                    keep.add(spans[j][2])
                j += 1
        with self._lock:
            for i in range(len(self.tensors)):
                if i not in keep and self._state[i] == FREE:
                    self._state[i] = TAKEN

    def nonfinite(self, fd: int, offset: int, n: int) -> int | None:
        """How many NaN/Inf values bytes [offset, offset + n) of open file `fd` hold, if they are a tensor that the
        checking process has counted (finite.nonfinite, as the writer would)."""
        i = self.find(fd, offset, n)
        count = -1 if i is None else struct.unpack_from("q", self._counts, 8 * i)[0]
        return None if count < 0 else count

    def place_runs(self, runs) -> tuple[int, int] | None:
        """Copy the bytes of `runs` (kernel_copy.Run, of the source files or zeros) to new room at the end of a
        placed file that takes direct writes, at the first run's offset modulo a page: (file, place there), or None
        where no file takes direct writes. For items that are no one source tensor (the q/k/v interleave, a
        tensor-parallel slice): the rank's own file would take them through the page cache, at the kernel's
        memcpy (the 16 linear_qkv of Llama-3.2-1B, 192 MiB: 0.5 s of the rank's time after the imports, RESULTS.md
        session 20)."""
        direct = [k for k, fd in enumerate(self._direct) if fd >= 0]
        if not direct:
            return None
        n = sum(r[2] for r in runs)
        with self._lock:  # (ranks forked later share the files' ends)
            ends = struct.unpack_from(f"{len(self.out)}q", self._ends)
            k = min(direct, key=ends.__getitem__)
            place = _room_after(ends[k], runs[0][1])
            struct.pack_into("q", self._ends, 8 * k, place + n + ROOM)
            os.ftruncate(self.out[k], place + n + ROOM)  # (larger each time: under the lock)
        copy_runs(runs, 0, n, self.out[k], place, self._direct[k])
        return k, place

    def copied(self) -> int:
        """Bytes of the tensors the threads have copied so far."""
        return sum(t[2] for i, t in enumerate(self.tensors) if self._state[i] == COPIED)

    def allocated(self) -> int:
        """Bytes of disk the placed files take now."""
        return sum(os.fstat(fd).st_blocks * 512 for fd in self.out)

    def copied_early(self, i: int) -> bool:
        """Whether tensor i is (being) copied here, by the time this returns. One the copying has not reached yet
        the writer copies here itself, where the file takes direct writes; elsewhere it is left to the writer's own
        file, as any other item: two processes writing one file through the page cache each spin on its lock while
        the other copies (4 s more of kernel time on the MoE input, RESULTS.md session 18), where a direct write
        waits for the disk without holding a core."""
        fd, offset, n, k, place = self.tensors[i]
        with self._lock:
            state = self._state[i]
            if state == FREE:
                self._state[i] = COPYING if self._direct[k] >= 0 else TAKEN
        if state != FREE:
            return state in (COPYING, COPIED)
        if self._direct[k] < 0:
            return False
        direct_copy(fd, offset, n, self.out[k], self._direct[k], place)
        self._state[i] = COPIED
        return True

    def _copy_all(self, k: int) -> None:
        """Thread k: copy file k's tensors, in order."""
        try:
            for i, (fd, offset, n, file, place) in enumerate(self.tensors):
                if file != k:
                    continue
                with self._lock:
                    if self._flags[_STOP] or self._state[i] != FREE:
                        continue
                    self._state[i] = COPYING
                done = 0
                while done < n:
                    if self._flags[_STOP]:
                        return
                    # (a step ends on a page of the source: only the tensor's own two ends are partial pages)
                    step = min(_STEP - (offset + done) % ALIGN, n - done)
                    direct_copy(fd, offset + done, step, self.out[k], self._direct[k], place + done)
                    done += step
                self._state[i] = COPIED
        except (OSError, ConversionError):  # only a head start: `finish` copies what this left half-done, and the
            pass  # writer meets the error itself (a full disk, a source cut short) where it matters
        finally:
            self._flags[1 + k] = 1

    def _fork_checker(self) -> int:
        """The checking process (its pid; -1 where none could start: the writer counts): it counts every tensor's
        NaN/Inf values, in order, while the imports run, for the writer's check (`nonfinite`). A process, not a
        thread: a thread's numpy calls, two per 512 KiB, each took the interpreter lock back from the imports, which
        then took 0.4-0.9 s longer on Llama-3.2-1B (RESULTS.md, session 20)."""
        try:
            pid = os.fork()
        except OSError:
            return -1
        if pid:
            return pid
        code = 1
        try:  # (a terminal's Ctrl-C is the parent's to handle: it ends this with `counted`, or by dying)
            for fd in (*self.out, *self._direct, self._lock_fd):  # only the sources' are read here: never hold the
                if fd >= 0:  # output's files nor the scratch directory's lock past the parent
                    os.close(fd)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            die_with_parent(self._owner)
            self._count_all()
            code = 0
        finally:
            os._exit(code)

    def _count_all(self) -> None:
        try:
            for i, (fd, offset, n, _, _) in enumerate(self.tensors):
                if self._flags[_STOP]:
                    return
                struct.pack_into("q", self._counts, 8 * i, nonfinite(fd, offset, n, _DTYPES[self.dtype]))
        except (OSError, ValueError):  # only a head start: the writer counts what this has not
            pass

    def counted(self, stop: bool = False) -> None:
        """The owner: wait for the checking process to end (ending it first if `stop`)."""
        if self._checker > 0:
            if stop:
                os.kill(self._checker, signal.SIGKILL)
            os.waitpid(self._checker, 0)
            self._checker = -1

    def stop(self) -> None:
        """Stop the copying and wait for it (from any process that shares the state)."""
        self._flags[_STOP] = 1
        while not all(self._flags[1:]):
            time.sleep(0.002)

    def move_into(self, release_dir: Path) -> None:
        """Rank 0, once the conversion's temporary directory exists: the placed files move into it (`release_dir`),
        and with it into the conversion's own cleanup; the scratch directory goes."""
        release_dir.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(self.paths):
            path.rename(release_dir / path.name)
            self.paths[k] = release_dir / path.name
        shutil.rmtree(self.scratch, ignore_errors=True)

    def finish(self, placed: list[tuple[int, int, int, int, bytes, bytes]]) -> None:
        """Rank 0, after every rank has written: stop the copying, complete the tensors the copying left half-done
        that items go around, give back the space of those no item uses, write the items' records (`placed`:
        byte_copy.DirectWrites.placed of every rank) and sync the files; a file no item uses goes."""
        self.stop()
        used = {i for i, *_ in placed}
        for i, (fd, offset, n, k, place) in enumerate(self.tensors):
            if i in used:
                if self._state[i] == COPYING:  # stopped (or failed) midway: the rest is copied now
                    direct_copy(fd, offset, n, self.out[k], self._direct[k], place)
            elif self._state[i] in (COPYING, COPIED):
                _punch(self.out[k], place, n)
        ends = [0] * len(self.out)
        for _, k, place, n, before, after in placed:
            write_at(self.out[k], before, place - len(before))
            write_at(self.out[k], after, place + n)
            ends[k] = max(ends[k], place + n + ROOM)
        for k, end in enumerate(ends):
            if not end:
                self.paths[k].unlink()
                continue
            os.ftruncate(self.out[k], end)
            os.fsync(self.out[k])

    def close(self) -> None:
        """The owner, at the end of the run: stop copying and close."""
        if os.getpid() != self._owner:
            return
        self.stop()
        self.counted(stop=True)
        for fd in (*self._fds, *self.out, *self._direct, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fds, self.out, self._direct, self._lock_fd = [], [], [], -1


def _room_after(end: int, offset: int) -> int:
    """Where bytes from source offset `offset` go in a placed file whose bytes end at `end`: past ROOM, at that
    offset modulo ALIGN, so that all of them but their two end pages are written directly (direct_copy)."""
    return -(-(end + ROOM) // ALIGN) * ALIGN + offset % ALIGN


_FALLOC_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _punch(fd: int, pos: int, n: int) -> None:
    """Give back the disk space of bytes [pos, pos + n) of `fd`: they read as zeros (best effort)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn(fd, _FALLOC_PUNCH, pos, n)


_started: Placement | None = None


def start(hf_dir: Path, out_dir: Path, dtype: str, overwrite: bool, check: bool = True) -> Placement | None:
    """Begin copying `hf_dir`'s tensors of `dtype` (bf16, fp16, fp32) for a conversion into `out_dir`, in a
    scratch directory beside it (atomic.scratch_dir), and counting their NaN/Inf values if `check` (a conversion
    that allows them need not); None where it should not (torchrun, an output it would refuse, no tensor to place,
    too little space): the conversion then says what is wrong, if anything."""
    from . import atomic

    global _started
    if launched_by_torchrun() or dtype not in _DTYPES:
        return None
    try:
        atomic.refuse_existing(out_dir, overwrite, (hf_dir,))
        scratch, lock = atomic.scratch_dir(out_dir, (hf_dir,))
    except (ConversionError, OSError):
        return None
    try:
        place = Placement(hf_dir, out_dir, dtype, scratch, lock, check)
    except (ConversionError, OSError, ValueError, KeyError, TypeError, AttributeError):
        os.close(lock)
        shutil.rmtree(scratch, ignore_errors=True)
        return None
    _started = place
    if not place.tensors or shutil.disk_usage(scratch).free < place.size + (64 << 20):
        end()
        return None
    return place


def following(hf_dir: Path, out_dir: Path, dtype: str) -> Placement | None:
    """The placement started for this conversion by this process (or the one it was forked from), if any."""
    p = _started
    if p is not None and p.hf_dir == hf_dir.resolve() and p.out_dir == out_dir.resolve() and p.dtype == dtype:
        return p
    return None


def end() -> None:
    """The owner, after the conversion (whatever its outcome): stop, close, remove the scratch directory."""
    global _started
    p, _started = _started, None
    if p is not None and os.getpid() == p._owner:
        p.close()
        shutil.rmtree(p.scratch, ignore_errors=True)
