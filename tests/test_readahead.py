"""The source is read into the page cache ahead of the conversion (readahead.py), from before torch's import on
the command line: the package imports its entry points when first used."""
import ctypes
import importlib
import json
import mmap
import os
import subprocess
import sys
import threading
import time

import pytest

from converter import readahead


def _resident(path) -> int:
    """Bytes of `path` in the page cache (mincore over a map of the file)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size, page = os.path.getsize(path), mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        try:
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return sum(v & 1 for v in vec) * page
    finally:
        os.close(fd)


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


MIB = 1 << 20


def _until(cond, seconds=20):
    end = time.time() + seconds
    while not cond() and time.time() < end:
        time.sleep(0.02)
    return cond()


def _shards(d):
    for name, n in [("model-00002-of-00002.safetensors", 64), ("model-00001-of-00002.safetensors", 6),
                    ("notes.txt", 1)]:
        (d / name).write_bytes(os.urandom(n * MIB))
    (d / "sub").mkdir()
    (d / "sub" / "a.safetensors").write_bytes(b"x" * MIB)  # not the model's: not read
    os.mkfifo(d / "fifo.safetensors")  # would block a plain open: left out
    return d / "model-00001-of-00002.safetensors", d / "model-00002-of-00002.safetensors"


def test_reads_the_shards_in_order_and_stays_within_its_budget_of_what_was_consumed(tmp_path):
    first, second = _shards(tmp_path)
    assert readahead.plan(tmp_path) == [(first, 6 * MIB), (second, 64 * MIB)]
    for f in (first, second):
        _evict(f)
    if _resident(first) > MIB:
        pytest.skip("this file system keeps the pages of a clean file it was asked to drop (tmpfs?)")
    ahead = readahead.ReadAhead(tmp_path, budget=8 * MIB)
    try:
        assert _until(lambda: _resident(first) == 6 * MIB and _resident(second) >= 2 * MIB)
        time.sleep(0.5)
        # the budget's 2 MiB of the second shard (and the kernel's own readahead window), not all 64
        assert _resident(second) <= 32 * MIB
        ahead.consumed(40 * MIB)
        assert _until(lambda: _resident(second) >= 42 * MIB)
    finally:
        stopping = threading.Thread(target=ahead.stop)
        stopping.start()
        stopping.join(10)
    assert not stopping.is_alive() and not ahead._thread.is_alive()


def test_forked_ranks_report_what_they_consumed(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * MIB)
    with readahead.ReadAhead(tmp_path, budget=0) as ahead:  # reads nothing: only the counting is tested
        ahead.consumed(3)  # the reader's own process
        for rank in (0, 1):
            pid = os.fork()
            if pid == 0:
                ahead.consumed(1000 + rank, rank=rank)
                os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
        assert ahead.total_consumed() == 3 + 1000 + 1001


def test_only_the_shards_the_index_names_and_nothing_under_torchrun(tmp_path, monkeypatch):
    for name in ("consolidated.safetensors", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"x" * MIB)  # (Mistral's repositories ship both layouts)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors"}}))
    assert [f.name for f, _ in readahead.plan(tmp_path)] == ["model-00001-of-00002.safetensors",
                                                             "model-00002-of-00002.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../elsewhere.safetensors"}}')
    assert readahead.plan(tmp_path) == []  # refused by the conversion itself, with its message
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "16")
    (tmp_path / "model.safetensors.index.json").unlink()
    assert readahead.plan(tmp_path) == []


def test_a_fifo_does_not_hang_it(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    ahead = readahead.ReadAhead(tmp_path, budget=MIB)  # plan() leaves the FIFO out
    ahead._thread.join(10)
    assert not ahead._thread.is_alive()
    t = threading.Thread(target=ahead._read, args=([(fifo, MIB)],), daemon=True)  # a file that became a FIFO
    t.start()
    t.join(10)
    assert not t.is_alive()


def test_the_command_line_starts_without_torch():
    code = ("import sys, converter, converter.cli\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "converter.cli.parser().parse_args(['convert', 'a', 'b', '--workers', '2'])\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_entry_points_are_the_functions_after_their_modules_are_imported():
    import converter

    for name, module in converter._API.items():
        importlib.import_module(f"converter.{module}")
        obj = getattr(converter, name)
        assert not isinstance(obj, type(converter)) and obj.__name__ == name, name
    from converter import convert, derive

    assert convert.__module__ == "converter.convert" and derive.__module__ == "converter.derive"
    assert set(converter.__all__) <= set(dir(converter))
