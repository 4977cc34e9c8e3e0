"""HF sources with quantized weights, read as floats. Supported: block-wise FP8 (DeepSeek-V3/Kimi-K2 releases:
`<w>` in float8 e4m3 and `<w>_scale_inv`, one fp32 scale per weight_block_size block, w = w8 * scale) and MXFP4
(gpt-oss releases: `<w>_blocks` with two E2M1 values per byte, low nibble first, and `<w>_scales`, one power-of-two
exponent + 127 per 32 values, stored [..., out, in]; read as the [..., in, out] `<w>` of the unquantized model).
Other quantization methods and stray non-float tensors are refused by name.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConversionError
from .hf_io import HFCheckpoint

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE = "_scale_inv"


def open_source(hf_dir: str | Path, spec) -> HFCheckpoint:
    """The checkpoint reader for `hf_dir`: plain, or dequantizing what its quantization_config describes."""
    from mappings import FAMILIES

    from .packed import PackedExperts

    cfg = spec.hf_config
    q = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config")
    if not q:
        hf = HFCheckpoint(hf_dir)
        odd = [n for n in hf.names() if hf.dtype(n) not in FLOATS]
        if odd:
            raise ConversionError(f"tensors of non-float dtype (quantized weights?): {odd[:5]}")
    elif q.get("quant_method") == "fp8" and q.get("weight_block_size"):
        hf = FP8BlockCheckpoint(hf_dir, tuple(q["weight_block_size"]))
    elif q.get("quant_method") == "mxfp4":
        hf = MXFP4Checkpoint(hf_dir)
    else:
        raise ConversionError(f"source checkpoint is quantized (quantization_config.quant_method="
                              f"{q.get('quant_method')!r}); hf2mcore dequantizes block-wise fp8 and mxfp4")
    packed = FAMILIES[spec.family].packed
    return PackedExperts(hf, packed) if packed else hf


class FP8BlockCheckpoint(HFCheckpoint):
    """Lists each fp8 weight as an fp32 tensor (its `_scale_inv` companion is consumed, not listed) and
    dequantizes on read, also for a box of rows and columns."""

    def __init__(self, path: str | Path, block: tuple[int, int]):
        super().__init__(path)
        self.block = block
        names = set(self.file_of)
        stored = super().dtype
        if not any(stored(n) in FP8 for n in names):
            raise ConversionError(f"quantization_config.quant_method='fp8' but {path} has no fp8 tensors")
        for n in names:
            if stored(n) in FP8 and n + SCALE not in names:
                raise ConversionError(f"fp8 tensor {n} has no {n + SCALE}")
            if n.endswith(SCALE) and (n[: -len(SCALE)] not in names or stored(n[: -len(SCALE)]) not in FP8):
                raise ConversionError(f"{n} scales no fp8 tensor")
            if stored(n) not in FLOATS + FP8:
                raise ConversionError(f"tensor {n} has dtype {stored(n)}, which block-wise fp8 does not explain")

    def names(self) -> list[str]:
        return [n for n in self.file_of if not n.endswith(SCALE)]

    def dtype(self, name: str) -> torch.dtype:
        dt = super().dtype(name)
        return torch.float32 if dt in FP8 else dt

    def _fp8(self, name: str) -> bool:
        return super().dtype(name) in FP8

    def _stored_as_is(self, name: str) -> bool:
        return not self._fp8(name)

    def get(self, name: str) -> torch.Tensor:
        if not self._fp8(name):
            return super().get(name)
        return self._dequant(super().get(name), super().get(name + SCALE), 0)

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if not self._fp8(name):
            return super().get_slice(name, index)
        rows = range(self.shape(name)[0])[index[0]]
        b0 = self.block[0]
        scale = super().get_slice(name + SCALE, (slice(rows.start // b0, (rows.stop - 1) // b0 + 1),))
        w = super().get_slice(name, (index[0],))
        return self._dequant(w, scale, rows.start)[(slice(None), *index[1:])]

    def _dequant(self, w: torch.Tensor, scale: torch.Tensor, row0: int) -> torch.Tensor:
        """w rows row0.. of the weight; scale rows from the block holding row0."""
        b0, b1 = self.block
        r = torch.arange(row0, row0 + w.shape[0]) // b0 - row0 // b0
        c = torch.arange(w.shape[1]) // b1
        return w.float() * scale[r][:, c]


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class MXFP4Checkpoint(HFCheckpoint):
    """Lists `<w>` for each `<w>_blocks` + `<w>_scales` pair and dequantizes on read (any box whose first index
    selects rows of the leading axis, e.g. experts)."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        names = set(self.file_of)
        self.quantized = {n.removesuffix("_blocks") for n in names if n.endswith("_blocks")}
        if not self.quantized:
            raise ConversionError(f"quantization_config.quant_method='mxfp4' but {path} has no *_blocks tensors")
        for w in self.quantized:
            if w + "_scales" not in names:
                raise ConversionError(f"mxfp4 tensor {w}_blocks has no {w}_scales")
        stray = [n for n in names if n.endswith("_scales") and n.removesuffix("_scales") not in self.quantized]
        if stray:
            raise ConversionError(f"{stray[0]} scales no mxfp4 tensor")

    def names(self) -> list[str]:
        out = []
        for n in self.file_of:
            if n.endswith("_blocks"):
                out.append(n.removesuffix("_blocks"))
            elif not (n.endswith("_scales") and n.removesuffix("_scales") in self.quantized):
                out.append(n)
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.quantized:
            return super().shape(name)
        *lead, out, groups, half = super().shape(name + "_blocks")
        return (*lead, groups * half * 2, out)

    def dtype(self, name: str) -> torch.dtype:
        return torch.float32 if name in self.quantized else super().dtype(name)

    def _stored_as_is(self, name: str) -> bool:
        return name not in self.quantized

    def get(self, name: str) -> torch.Tensor:
        if name not in self.quantized:
            return super().get(name)
        return _mxfp4(super().get(name + "_blocks"), super().get(name + "_scales"))

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        if name not in self.quantized:
            return super().get_slice(name, index)
        lead = (index[0],)
        w = _mxfp4(super().get_slice(name + "_blocks", lead), super().get_slice(name + "_scales", lead))
        return w[(slice(None), *index[1:])]


def _mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., out, G, 16] bytes + [..., out, G] exponents -> float32 [..., G * 32 (in), out]."""
    lut = torch.tensor(FP4_VALUES)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    vals = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return vals.flatten(-2).transpose(-1, -2)
