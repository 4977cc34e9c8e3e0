"""HF sources with quantized weights, read as floats. Supported: block-wise FP8 (DeepSeek-V3/Kimi-K2 releases:
`<w>` in float8 e4m3 and `<w>_scale_inv`, one fp32 scale per weight_block_size block, w = w8 * scale).
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
    cfg = spec.hf_config
    q = cfg.get("quantization_config") or cfg.get("text_config", {}).get("quantization_config")
    if q:
        if q.get("quant_method") == "fp8" and q.get("weight_block_size"):
            return FP8BlockCheckpoint(hf_dir, tuple(q["weight_block_size"]))
        raise ConversionError(f"source checkpoint is quantized (quantization_config.quant_method="
                              f"{q.get('quant_method')!r}); hf2mcore dequantizes only block-wise fp8")
    hf = HFCheckpoint(hf_dir)
    odd = [n for n in hf.names() if hf.dtype(n) not in FLOATS]
    if odd:
        raise ConversionError(f"tensors of non-float dtype (quantized weights?): {odd[:5]}")
    return hf


class FP8BlockCheckpoint(HFCheckpoint):
    """Lists each fp8 weight as an fp32 tensor (its `_scale_inv` companion is consumed, not listed) and
    dequantizes on read, also for a box of rows and columns."""

    def __init__(self, path: str | Path, block: tuple[int, int]):
        super().__init__(path)
        self.block = block
        names = set(self.file_of)
        stored = super().dtype
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
