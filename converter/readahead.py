"""Reading the source files into the page cache ahead of the conversion, in large sequential reads, on a thread.

The conversion reads each tensor where the writer needs it: copy_file_range of row runs, scattered over the shards
(safetensors orders a shard's tensors by name, not by layer). From a source not in the page cache (on a network
file system, downloaded on another node) those small scattered reads made an 8 GiB MoE conversion 2.5x as slow as
`cat` of the same files. Read here first, in the shards' name order (the hub's order, which follows the layers as
the writer does), the same bytes come at the disk's sequential speed; the command line starts this before it
imports torch and megatron-core, so that seconds of one core overlap the reading too.

It stays at most `budget` bytes ahead of what the conversion has consumed (half the memory available at the start),
so that what it read is still cached when the writer gets there (on a 15 GiB input, larger than that, following the
conversion measured no gain over reading during the start-up only: RESULTS.md session 9). Ranks forked from this
process (--workers) report what they consume through a shared page. os.sendfile to /dev/null reads inside the kernel (no user-space copy) and
releases the GIL. Only a hint: an error stops the reading silently, since the conversion's own reads meet and
report it.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
import threading
from pathlib import Path

from .errors import ConversionError
from .launch import launched_by_torchrun
from .shards import shard_files

_STEP = 64 << 20  # bytes per sendfile call
_SLOTS = 64  # forked ranks that can report (--workers allows at most 8)
_POLL_S = 0.02  # how often a reader that is far enough ahead looks at the ranks' progress again


def plan(hf_dir: Path) -> list[tuple[Path, int]]:
    """(file, size) of the shards the conversion reads (shards.shard_files: the index's, else every *.safetensors),
    in name order; regular files only (a FIFO would block). Nothing under torchrun: its ranks, often on many nodes,
    each need only their share, and reading every shard on every node would multiply the reading."""
    if launched_by_torchrun():
        return []
    try:
        names, _ = shard_files(hf_dir)
    except (ConversionError, OSError):  # the conversion's own reading reports it
        return []
    out = []
    for f in map(hf_dir.joinpath, names):
        try:
            st = f.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size:
            out.append((f, st.st_size))
    return out


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


class ReadAhead:
    def __init__(self, hf_dir: Path, budget: int | None = None):
        self.hf_dir = hf_dir.resolve()
        self.budget = available_memory() // 2 if budget is None else budget
        self._owner = os.getpid()
        self._counts = mmap.mmap(-1, 8 * _SLOTS)  # shared with forked ranks: slot i is what rank i consumed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(plan(self.hf_dir),), name="hf2mcore-readahead",
                                        daemon=True)
        self._thread.start()

    def consumed(self, nbytes: int, rank: int = 0) -> None:
        """This process (forked rank `rank`, or the reader's own process as rank 0) consumed `nbytes` more."""
        if rank < _SLOTS:
            slot = 8 * rank
            struct.pack_into("q", self._counts, slot, struct.unpack_from("q", self._counts, slot)[0] + nbytes)

    def total_consumed(self) -> int:
        return sum(struct.unpack_from(f"{_SLOTS}q", self._counts))

    def stop(self) -> None:
        if os.getpid() == self._owner:
            self._stop.set()
            self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _read(self, files: list[tuple[Path, int]]) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:
            return
        ahead = 0  # bytes read so far
        try:
            for f, size in files:
                try:
                    # O_NONBLOCK: a file that became a FIFO since plan() looked must not hang the process
                    fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    pos = 0
                    while pos < size:
                        room = self.budget - (ahead - self.total_consumed())
                        if self._stop.wait(_POLL_S if room <= 0 else 0):
                            return
                        if room <= 0:
                            continue
                        done = os.sendfile(null, fd, pos, min(_STEP, size - pos, room))
                        if not done:
                            break
                        pos, ahead = pos + done, ahead + done
                except OSError:
                    return
                finally:
                    os.close(fd)
        finally:
            os.close(null)


_started: ReadAhead | None = None


def start(hf_dir: Path) -> ReadAhead:
    """Start reading `hf_dir` ahead (the command line, before its imports)."""
    global _started
    _started = ReadAhead(hf_dir)
    return _started


def following(hf_dir: Path) -> ReadAhead:
    """The reader started for `hf_dir` in this process or the one it was forked from, else a new one."""
    if _started is not None and _started.hf_dir == hf_dir.resolve() and not _started._stop.is_set():
        return _started
    return start(hf_dir)
