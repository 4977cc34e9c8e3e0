"""Lazy reading of HF safetensors checkpoints (single file or index + shards) and streaming sharded writing."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConversionError

INDEX = "model.safetensors.index.json"


class HFCheckpoint:
    """Tensor names and shapes up front; each tensor is read from disk only when asked for."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path} is not a directory")
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConversionError(f"{index} is not a safetensors index: {exc}") from exc
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(self.path.glob("*.safetensors"))]
            if not files:
                raise ConversionError(f"no *.safetensors weights in {self.path} (only safetensors are read)")
            weight_map = None
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise ConversionError(f"missing shard {fp} named in {INDEX}")
            try:
                h = safe_open(str(fp), framework="pt")
            except (SafetensorError, OSError, Exception) as exc:  # safetensors raises several types on bad headers
                raise ConversionError(f"cannot read {fp}: {exc}") from exc
            self._handles[f] = h
            for k in h.keys():
                if k in self.file_of:
                    raise ConversionError(f"tensor {k} is stored twice ({self.file_of[k]} and {f})")
                self.file_of[k] = f
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.file_of))
            if missing:
                raise ConversionError(f"{len(missing)} tensors named in {INDEX} are absent from their shards, "
                                      f"e.g. {missing[:3]}")
        self._sizes = {f: fp.stat().st_size for f in files if (fp := self.path / f)}

    def names(self) -> list[str]:
        return list(self.file_of)

    def _slice(self, name: str):
        return self._handles[self.file_of[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._slice(name).get_dtype()]

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.file_of[name]].get_tensor(name)
        except KeyError:
            raise ConversionError(f"HF tensor {name} is missing") from None
        except Exception as exc:  # truncated file: safetensors raises on the short read
            raise ConversionError(f"cannot read tensor {name} from {self.file_of[name]}: {exc}") from exc

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """A box of a tensor, reading only its bytes."""
        try:
            return self._slice(name)[index]
        except Exception as exc:
            raise ConversionError(f"cannot read {index} of tensor {name} from {self.file_of[name]}: {exc}") from exc

    def total_bytes(self) -> int:
        return sum(self._sizes.values())


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path, shard_bytes: int,
                  metadata: dict | None = None) -> dict[str, str]:
    """Write (name, tensor) pairs as hub-style shards plus an index; holds at most one shard in memory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    written: list[tuple[str, list[str]]] = []
    total = 0

    def flush():
        nonlocal size
        if shards[-1]:
            tmp = f"part-{len(written):05d}.safetensors"
            save_file(shards[-1], str(out_dir / tmp), metadata={"format": "pt"})
            written.append((tmp, list(shards[-1])))
        shards[-1] = {}
        size = 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = t.contiguous()
        size += nbytes
        total += nbytes
    flush()
    weight_map: dict[str, str] = {}
    n = len(written)
    for i, (tmp, names) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out_dir / tmp).rename(out_dir / final)
        weight_map.update({k: final for k in names})
    if n > 1:
        (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total, **(metadata or {})},
                                                 "weight_map": weight_map}, indent=2))
    return weight_map
