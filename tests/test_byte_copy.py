"""Tensors copied file to file (byte_copy.py): the files are those a write from memory gives, byte for byte, with
the kernel's copy or without it, and a piece the writer would not take from the source stops the conversion."""
import errno
import importlib
import io
import os

import pytest

from converter import ConversionError, byte_copy, finite, kernel_copy, mcore_io, save_memo
from converter.convert import convert

conv = importlib.import_module("converter.convert")  # the module (the package's `convert` is the function)

# a copy with vocabulary padding and tied embeddings, fused q/k/v and gate/up, stacked experts, packed experts
# (partly transposed: those are made in memory), and the Gated DeltaNet regrouping
FAMILIES = ["meta-llama/Llama-3.2-1B", "microsoft/Phi-3-mini-4k-instruct", "Qwen/Qwen3-30B-A3B",
            "openai/gpt-oss-20b", "Qwen/Qwen3-Next-80B-A3B-Thinking"]


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted((d / "release").iterdir()) if p.suffix == ".distcp"}


def _convert(hf, out, monkeypatch, **kw) -> int:
    """Convert and return how many bytes were copied file to file."""
    made = []

    class Counted(byte_copy.DirectWrites):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(conv, "DirectWrites", Counted)
    convert(hf, out, progress=False, **kw)
    return sum(m.copied for m in made)


@pytest.mark.parametrize("name", FAMILIES)
def test_copied_files_are_those_written_from_memory(name, tiny_models, tmp_path, monkeypatch):
    hf = tiny_models(name, "bf16")
    copied = _convert(hf, tmp_path / "direct", monkeypatch, dtype="bf16")
    with monkeypatch.context() as m:
        m.setattr(conv, "byte_runs", lambda *a: None)  # every tensor made in memory
        assert _convert(hf, tmp_path / "memory", monkeypatch, dtype="bf16") == 0
    direct, memory = _files(tmp_path / "direct"), _files(tmp_path / "memory")
    source = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
    # every tensor but gpt-oss's transposed experts never entered memory
    assert copied > (source // 3 if "gpt-oss" in name else source * 0.9)
    assert direct.keys() == memory.keys() and all(direct[k] == memory[k] for k in memory)
    # at another dtype nothing can be copied as stored
    assert _convert(hf, tmp_path / "fp32", monkeypatch, dtype="fp32") == 0


def test_without_the_kernel_copy_the_bytes_are_read_and_written(tiny_models, tmp_path, monkeypatch):
    """Where copy_file_range cannot copy between the two files (another file system, an old kernel)."""
    hf = tiny_models("Qwen/Qwen3-30B-A3B", "bf16")
    convert(hf, tmp_path / "kernel", dtype="bf16", progress=False)

    def refuse(*a):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(kernel_copy, "_kernel_copy", True)
    reads = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda *a: reads.append(a) or pread(*a))
    convert(hf, tmp_path / "read", dtype="bf16", progress=False)
    assert reads and kernel_copy._kernel_copy is False
    assert _files(tmp_path / "kernel") == _files(tmp_path / "read")


def test_a_piece_the_writer_would_not_take_from_the_source_stops(tiny_models, tmp_path, monkeypatch):
    """Were a piece of a placeholder copied in memory before the writer sees it, its bytes would be the
    placeholder's untouched memory: the conversion stops instead, and leaves no output."""
    hf = tiny_models("Qwen/Qwen3-30B-A3B", "bf16")
    own = mcore_io._own_storage
    monkeypatch.setattr(mcore_io, "_own_storage", lambda real, view: own(real, view).clone())
    with pytest.raises(ConversionError, match="not a view"):
        convert(hf, tmp_path / "mc", dtype="bf16", progress=False)
    assert not (tmp_path / "mc").exists()


def test_a_piece_written_in_other_parts_than_expected_stops(tiny_models, tmp_path, monkeypatch):
    """Writes are matched to the pieces the writer should write by their size first: were a piece written in
    other parts (a writer that splits large writes), its bytes would be the placeholder's untouched memory; the
    conversion stops instead, and leaves no output."""
    hf = tiny_models("Qwen/Qwen3-30B-A3B", "bf16")
    write = byte_copy._Stream.write

    def halves(self, data):
        m = memoryview(data).cast("B")
        if m.nbytes < 4096:
            return write(self, data)
        return write(self, m[:m.nbytes // 2]) + write(self, m[m.nbytes // 2:])

    monkeypatch.setattr(byte_copy._Stream, "write", halves)
    with pytest.raises(ConversionError, match="not written in full|unexpected part"):
        convert(hf, tmp_path / "mc", dtype="bf16", progress=False)
    assert not (tmp_path / "mc").exists()


def test_nonfinite_values_are_found_in_the_copied_bytes(tiny_models, tmp_path, monkeypatch):
    """The NaN/Inf check of copied tensors reads the source through a memory map, a window at a time: a NaN past
    the first windows (at offsets that are not page-aligned) still stops the conversion by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    hf = tiny_models("meta-llama/Llama-3.2-1B", "bf16")
    bad = shutil.copytree(hf, tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    w = t["model.layers.1.mlp.up_proj.weight"]
    w.view(-1)[w.numel() - 3] = float("inf")
    save_file(t, str(bad / "model.safetensors"))
    monkeypatch.setattr(finite, "_MAPPED", 4096)  # many windows per tensor
    monkeypatch.setattr(finite, "_BLOCK", 1024)  # many blocks per window
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight holds 1 non-finite"):
        convert(bad, tmp_path / "out", dtype="bf16", progress=False)
    assert not (tmp_path / "out").exists()
    # the same check on the source as stored, window by window
    from converter.hf_io import HFCheckpoint

    src = HFCheckpoint(bad)
    assert finite.nonfinite(*src.byte_range("model.layers.1.mlp.up_proj.weight"), "BF16") == 1
    assert finite.nonfinite(*src.byte_range("model.layers.1.mlp.down_proj.weight"), "BF16") == 0


@pytest.mark.parametrize("block", [512 << 10, 1024], ids=["read", "mapped"])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"])
def test_nonfinite_counts_what_torch_counts_in_every_float_format(tmp_path, monkeypatch, dtype, block):
    """The bit patterns finite.py takes for NaN/Inf, against torch's isfinite, with the largest finite values of
    either sign, zeros of either sign and the smallest subnormals beside them; a tensor up to a block is read into
    memory, a larger one mapped."""
    import torch
    from safetensors.torch import save_file

    from converter.hf_io import HFCheckpoint, _DTYPES

    dt = _DTYPES[dtype]
    info = torch.finfo(dt)
    special = torch.tensor([info.max, -info.max, 0.0, -0.0, info.smallest_normal / 4, float("nan"), float("inf"),
                            float("-inf"), 1.0], dtype=torch.float64)
    values = torch.cat([special, torch.randn(5000, dtype=torch.float64)]).to(dt)
    values[4000] = float("nan")
    save_file({"t": values}, str(tmp_path / "t.safetensors"))
    want = int((~values.double().isfinite()).sum())
    assert want >= (2 if dtype == "F8_E4M3" else 4)  # e4m3fn has no Inf: it becomes NaN
    monkeypatch.setattr(finite, "_BLOCK", block)
    read, preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: read.append(a) or preadv(*a))
    assert finite.nonfinite(*HFCheckpoint(tmp_path).byte_range("t"), dtype) == want
    assert bool(read) == (values.numel() * values.element_size() <= block)


def _archive(save, t) -> bytes:
    f = io.BytesIO()
    save(t, f)
    return f.getvalue()


def test_a_repeated_save_writes_torch_saves_archive_byte_for_byte(crc32):
    """save_memo repeats torch.save's archive for a tensor layout saved twice alike, with the tensor's own bytes;
    whatever its archive might depend on beyond the layout goes to torch.save every time."""
    import torch

    crc32(False)  # as mcore_io saves
    memo = save_memo.SaveMemo(torch.save)
    alike = [torch.randn(64, 32)[8:16] for _ in range(3)]  # one layout (storage, offset, shape, strides) thrice
    own = [torch.randn(8, 32).bfloat16() for _ in range(3)]  # another, each its own storage
    for t in alike + own + alike[:1]:
        assert _archive(memo, t) == _archive(torch.save, t)
    assert memo.repeated == 1 + 1 + 1  # the third of each, and the first again
    grad, named = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
    named.note = "kept by torch.save"
    conj = torch.randn(8, 32, dtype=torch.complex64).conj()
    for t in [grad, named, conj] * 3:
        assert _archive(memo, t) == _archive(torch.save, t)
    assert memo.repeated == 3
    crc32(True)  # the archive holds the data's CRC
    for t in own:
        assert _archive(memo, t) == _archive(torch.save, t)
    assert memo.repeated == 3


def test_a_save_whose_archive_changes_is_never_repeated(crc32):
    import torch

    crc32(False)
    calls = []

    def counting(t, f):  # an archive that also holds how many saves came before
        calls.append(1)
        f.write(str(len(calls)).encode())
        f.write(memoryview(t.numpy()).cast("B"))

    memo, t = save_memo.SaveMemo(counting), torch.randn(4, 4)
    assert [_archive(memo, t)[:1] for _ in range(4)] == [b"1", b"2", b"3", b"4"]
    assert memo.repeated == 0


def test_repeated_saves_convert_to_the_same_files(tiny_models, tmp_path, monkeypatch):
    """A conversion with torch.save's archives repeated writes the files torch.save writes (stacked experts: many
    items of one layout), and repeats most of them."""
    hf = tiny_models("Qwen/Qwen3-30B-A3B", "bf16")
    made, real = [], []

    def memo(save):
        made.append(save_memo.SaveMemo(lambda *a: real.append(1) or save(*a)))
        return made[-1]

    monkeypatch.setattr(mcore_io, "SaveMemo", memo)
    convert(hf, tmp_path / "memo", dtype="bf16", progress=False)
    monkeypatch.setattr(mcore_io, "SaveMemo", lambda save: save)
    convert(hf, tmp_path / "torch", dtype="bf16", progress=False)
    memo, plain = _files(tmp_path / "memo"), _files(tmp_path / "torch")
    assert memo.keys() == plain.keys() and all(memo[k] == plain[k] for k in plain)
    assert (tmp_path / "memo/release/.metadata").read_bytes() == (tmp_path / "torch/release/.metadata").read_bytes()
    assert len(made) == 1 and made[0].repeated > len(real), (made[0].repeated, len(real))


@pytest.fixture
def crc32():
    """Sets torch.save's per-record CRC32 on or off for a test (mcore_io saves with it off)."""
    import torch

    before = torch.serialization.get_crc32_options()
    yield torch.serialization.set_crc32_options
    torch.serialization.set_crc32_options(before)


def test_the_writeback_starts_once_a_step_of_bytes_is_copied(tmp_path, monkeypatch):
    """Small copies are handed to the disk together, a step of bytes at a time; a long one every step; one of
    _AT_ONCE or more at once; what is left under a step waits for the file's fsync; the file holds the bytes."""
    monkeypatch.setattr(kernel_copy, "_STEP", 64 << 10)
    monkeypatch.setattr(kernel_copy, "_unstarted", {})  # (nothing left from another test's descriptor)
    started = []
    monkeypatch.setattr(kernel_copy, "_sync_range", lambda fd, pos, n, flags: started.append((pos, n)))
    data = os.urandom(1 << 20)
    (tmp_path / "src").write_bytes(data)
    src, out = os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        for i in range(40):  # 40 x 4 KiB: two steps' writebacks, 32 KiB left
            kernel_copy.copy_range(src, i * 4096, 4096, out, i * 4096)
        assert started == [(0, 64 << 10), (64 << 10, 64 << 10)]
        kernel_copy.copy_range(src, 40 * 4096, (1 << 20) - 40 * 4096, out, 40 * 4096)  # in steps of 64 KiB
        # the 32 KiB left joined the first step; 13 steps more, and the last 32 KiB wait for the fsync
        assert started[2] == (128 << 10, 96 << 10) and len(started) == 15
        assert all(a + n == b for (a, n), (b, _) in zip(started, started[1:]))
        assert sum(n for _, n in started) == 992 << 10
        monkeypatch.setattr(kernel_copy, "_AT_ONCE", 8192)
        started.clear(), kernel_copy._unstarted.clear()  # (as for a new file)
        kernel_copy.copy_range(src, 0, 4096, out, 0)  # small: waits
        kernel_copy.copy_range(src, 4096, 8192, out, 4096)  # large enough: at once, with what waited
        assert started == [(0, 12288)]
    finally:
        os.close(src), os.close(out)
    assert (tmp_path / "out").read_bytes() == data


def _direct_writes(monkeypatch, direct_fds, fail=None):
    """os.pwrite, counting the bytes written through the descriptors in `direct_fds` (or failing there with errno
    `fail`)."""
    written, pwrite = [0], os.pwrite

    def counted(fd, data, pos):
        if fd in direct_fds:
            if fail:
                raise OSError(fail, os.strerror(fail))
            written[0] += len(data)
        return pwrite(fd, data, pos)

    monkeypatch.setattr(os, "pwrite", counted)
    return written


def test_a_direct_copy_writes_the_whole_pages_directly_and_the_ends_through_the_page_cache(tmp_path, monkeypatch):
    """Source offsets off any page boundary, copies over several map windows, and copies of less than a page: the
    file holds the source's bytes; every whole page between a copy's ends went through the O_DIRECT descriptor.
    Where the disk refuses that (EINVAL), the copy and every one after go through copy_range; a source cut short
    under the copy stops it."""
    monkeypatch.setattr(kernel_copy, "_STEP", 3 * kernel_copy.ALIGN)  # several windows per copy
    a = kernel_copy.ALIGN
    data = os.urandom(64 * a)
    (tmp_path / "src").write_bytes(data)
    path = tmp_path / "out"
    src, out = os.open(tmp_path / "src", os.O_RDONLY), os.open(path, os.O_RDWR | os.O_CREAT)
    direct = kernel_copy.open_direct(path)
    if direct < 0:
        pytest.skip(f"{tmp_path} takes no O_DIRECT writes")
    copies = [(5, 20 * a + 17), (30 * a + 100, 50), (40 * a + 3, a - 3), (44 * a, 10 * a)]  # (offset, bytes)
    try:
        written = _direct_writes(monkeypatch, {direct})
        for offset, n in copies:
            kernel_copy.direct_copy(src, offset, n, out, direct, offset + 3 * a)  # at the offset modulo a page
        whole = sum(max(0, (o + n) // a - -(-o // a)) * a for o, n in copies)
        assert written[0] == whole == 29 * a
        os.fsync(out)
        got = path.read_bytes()
        for offset, n in copies:
            assert got[offset + 3 * a:offset + 3 * a + n] == data[offset:offset + n]
        with pytest.raises(ConversionError, match="ended early"):  # a map past the source's end
            kernel_copy.direct_copy(src, 60 * a, 8 * a, out, direct, 60 * a)

        monkeypatch.setattr(kernel_copy, "_direct", True)
        os.ftruncate(out, 0)
        refused = _direct_writes(monkeypatch, {direct}, fail=errno.EINVAL)
        kernel_copy.direct_copy(src, 1, 30 * a, out, direct, 1)
        assert kernel_copy._direct is False
        kernel_copy.direct_copy(src, 40 * a, 10 * a, out, direct, 40 * a)
        assert path.read_bytes()[1:30 * a + 1] == data[1:30 * a + 1]
        assert path.read_bytes()[40 * a:50 * a] == data[40 * a:50 * a] and refused == [0]
    finally:
        os.close(src), os.close(out), os.close(direct)


def test_a_repeated_value_is_torch_saves_archive_byte_for_byte(crc32):
    """Plain values by their pickle (megatron-core's `[None]` of each expert's `_extra_state`); other objects to
    torch.save."""
    import torch

    crc32(False)
    memo = save_memo.SaveMemo(torch.save)
    for v in [[None]] * 3 + [{"a": (1, 2.5, "x")}] * 3 + [[None], [0.0], [-0.0], [0.0]]:
        assert _archive(memo, v) == _archive(torch.save, v)
    assert memo.repeated == 1 + 1 + 1  # the third of the first two; [None] again; ([0.0] and [-0.0] differ)
    for v in [_Custom(), [_Custom()], [torch.zeros(2)]] * 3:  # not plain: torch.save each time
        assert _archive(memo, v) == _archive(torch.save, v)
    assert memo.repeated == 3
    crc32(True)  # (megatron-core serializes them before mcore_io turns the CRC32s off): those of the pickle
    for v in [[None]] * 3:
        assert _archive(memo, v) == _archive(torch.save, v)
    assert memo.repeated == 4


class _Custom:
    pass
