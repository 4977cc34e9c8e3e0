"""Reading the source files into the page cache while the command line imports torch and megatron-core.

Those imports take seconds of one core, and a conversion cannot place a byte before them (the layout is DCP's and
torch.save's). A source not yet in the page cache (just downloaded elsewhere, a network file system) would then be
read from disk after them; read here, on a thread, during them, that time overlaps. os.sendfile to /dev/null reads
inside the kernel (no user-space copy) and releases the GIL. Only a hint: an error stops the reading silently, since
the conversion's own reads meet and report it.
"""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

_STEP = 64 << 20


def plan(hf_dir: Path, budget: int) -> list[tuple[Path, int]]:
    """(file, bytes to read from its start) for the safetensors files directly in `hf_dir`, in name order (the
    hub's shard order, which follows the layers, as the writer does), until `budget` bytes."""
    out = []
    for f in sorted(hf_dir.glob("*.safetensors")):
        if budget <= 0:
            break
        try:
            st = f.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size:
            out.append((f, min(st.st_size, budget)))
            budget -= out[-1][1]
    return out


def available_memory() -> int:
    import psutil

    return psutil.virtual_memory().available


def start(hf_dir: Path) -> threading.Thread:
    """Read ahead up to half the memory available now (what the page cache can keep until the writer reaches it,
    beside the output's own pages), on a daemon thread."""
    t = threading.Thread(target=read, args=(plan(hf_dir, available_memory() // 2),), name="hf2mcore-readahead",
                         daemon=True)
    t.start()
    return t


def read(files: list[tuple[Path, int]]) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for f, n in files:
            try:
                # O_NONBLOCK: a file that became a FIFO since plan() looked must not hang the process
                fd = os.open(f, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                pos = 0
                while pos < n and (done := os.sendfile(null, fd, pos, min(_STEP, n - pos))):
                    pos += done
            except OSError:
                return
            finally:
                os.close(fd)
    finally:
        os.close(null)
