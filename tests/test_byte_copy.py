"""Tensors copied file to file (byte_copy.py): the files are those a write from memory gives, byte for byte, with
the kernel's copy or without it, and a piece the writer would not take from the source stops the conversion."""
import errno
import importlib
import os

import pytest

from converter import ConversionError, byte_copy, finite, kernel_copy, mcore_io
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
        def __init__(self, recorder=None):
            super().__init__(recorder)
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

    import torch
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


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2"])
def test_nonfinite_counts_what_torch_counts_in_every_float_format(tmp_path, dtype):
    """The bit patterns finite.py takes for NaN/Inf, against torch's isfinite, with the largest finite values of
    either sign, zeros of either sign and the smallest subnormals beside them."""
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
    assert finite.nonfinite(*HFCheckpoint(tmp_path).byte_range("t"), dtype) == want
