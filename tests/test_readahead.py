"""The command line reads the source into the page cache while it imports torch (readahead.py), and the package
imports its entry points when first used, so that reading can start before torch's import."""
import ctypes
import importlib
import mmap
import os
import subprocess
import sys
import threading

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


def test_reads_the_shards_in_order_into_the_page_cache_up_to_the_budget(tmp_path):
    mib = 1 << 20
    for name, n in [("model-00002-of-00002.safetensors", 64), ("model-00001-of-00002.safetensors", 6),
                    ("notes.txt", 1)]:
        (tmp_path / name).write_bytes(os.urandom(n * mib))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.safetensors").write_bytes(b"x" * mib)  # not the model's: not read
    os.mkfifo(tmp_path / "fifo.safetensors")  # would block a plain open: left out
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"

    files = readahead.plan(tmp_path, 8 * mib)
    assert files == [(first, 6 * mib), (second, 2 * mib)]
    for f in (first, second):
        _evict(f)
    if _resident(first) > mib:
        pytest.skip("this file system keeps the pages of a clean file it was asked to drop (tmpfs?)")
    readahead.read(files)
    assert _resident(first) == 6 * mib
    assert 2 * mib <= _resident(second) <= 32 * mib  # the budget's share (and the kernel's own readahead window)


def test_a_fifo_does_not_hang_it(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    t = threading.Thread(target=readahead.read, args=([(fifo, 1 << 20)],), daemon=True)
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
