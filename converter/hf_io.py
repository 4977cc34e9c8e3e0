"""Lazy reading of HF safetensors checkpoints (single file or index + shards) and streaming sharded writing."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConversionError
from .shards import INDEX, read_header, shard_files



class HFCheckpoint:
    """Tensor names and shapes up front; each tensor is read from disk only when asked for.

    Data is read with positioned reads into the destination tensor rather than through safetensors' memory
    map: mapped pages that were read count in the process's RSS until it ends, which would make memory grow
    with the model. safetensors still parses and validates every header.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"{self.path} is not a directory")
        files, weight_map = shard_files(self.path)
        if weight_map is None and not files:
            raise ConversionError(f"no *.safetensors weights in {self.path} (only safetensors are read)")
        self.file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}  # name -> dtype, shape, byte offset
        self._fds: dict[str, int] = {}
        for f in files:
            fp = self.path / f
            if not fp.is_file():
                raise ConversionError(f"missing shard {fp} named in {INDEX}")
            try:
                with safe_open(str(fp), framework="pt") as h:  # validates the header against the file size
                    keys = list(h.keys())
                header, data_start = read_header(fp)
            except (SafetensorError, OSError, Exception) as exc:  # safetensors raises several types on bad headers
                raise ConversionError(f"cannot read {fp}: {exc}") from exc
            self._fds[f] = os.open(fp, os.O_RDONLY)
            for k in keys:
                if k in self.file_of:
                    raise ConversionError(f"tensor {k} is stored twice ({self.file_of[k]} and {f})")
                self.file_of[k] = f
                info = header[k]
                if info["dtype"] not in _DTYPES:
                    raise ConversionError(f"tensor {k} in {fp} has dtype {info['dtype']}, which hf2mcore cannot read")
                self._meta[k] = (_DTYPES[info["dtype"]], tuple(info["shape"]), data_start + info["data_offsets"][0])
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.file_of))
            if missing:
                raise ConversionError(f"{len(missing)} tensors named in {INDEX} are absent from their shards, "
                                      f"e.g. {missing[:3]}")

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def names(self) -> list[str]:
        return list(self.file_of)

    def _info(self, name: str):
        try:
            return self._meta[name]
        except KeyError:
            raise ConversionError(f"HF tensor {name} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[0]

    def spans(self) -> dict[int, list[tuple[int, int, str]]]:
        """Each shard's descriptor (the one this reader reads through) -> (byte offset, byte count, tensor name)
        of every tensor stored in it, by offset."""
        out: dict[int, list[tuple[int, int, str]]] = {fd: [] for fd in self._fds.values()}
        for name, f in self.file_of.items():
            dtype, shape, offset = self._meta[name]
            out[self._fds[f]].append((offset, dtype.itemsize * math.prod(shape), name))
        return {fd: sorted(s) for fd, s in out.items()}

    def _read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows [start, stop) of `name`, into `out` (contiguous, on the CPU, of the stored dtype) if given."""
        dtype, shape, offset = self._info(name)
        row = dtype.itemsize * math.prod(shape[1:])
        if out is None:
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        elif tuple(out.shape) != (stop - start, *shape[1:]) or out.dtype != dtype:
            raise ConversionError(f"internal: rows {start}:{stop} of {name} do not fit {tuple(out.shape)} {out.dtype}")
        buf = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        pos, fd = offset + start * row, self._fds[self.file_of[name]]
        while buf:
            n = os.preadv(fd, [buf], pos)
            if n == 0:
                raise ConversionError(f"cannot read tensor {name} from {self.file_of[name]}: file is truncated")
            buf, pos = buf[n:], pos + n
        return out

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Rows start.. of tensor `name`, as many as `out` has, into `out`: straight from the file when `out` takes
        the stored bytes as they are (no intermediate tensor), else read and converted."""
        if (self._stored_as_is(name) and out.device.type == "cpu" and out.is_contiguous()
                and out.dtype == self._info(name)[0]):
            self._read_rows(name, start, start + out.shape[0], out)
        else:
            out.copy_(self.get_slice(name, (slice(start, start + out.shape[0]),)))

    def byte_range(self, name: str) -> tuple[int, int, int] | None:
        """(open file descriptor, offset, length) of tensor `name`'s bytes as stored; None when this reader rebuilds
        the tensor (dequantizes it) rather than reading it as stored."""
        if not self._stored_as_is(name):
            return None
        dtype, shape, offset = self._info(name)
        return self._fds[self.file_of[name]], offset, dtype.itemsize * math.prod(shape)

    def _stored_as_is(self, name: str) -> bool:
        """Whether `name` is read as stored; readers that dequantize say which tensors they rebuild."""
        return True

    def get(self, name: str) -> torch.Tensor:
        shape = self.shape(name)
        return self._read_rows(name, 0, shape[0]) if shape else self._read_rows(name, 0, 1).reshape(())

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """A box of a tensor: reads only its rows (dim 0), then takes the columns."""
        rows = range(self.shape(name)[0])[index[0]]
        if rows.step != 1:
            raise ConversionError(f"internal: strided read of {name}")
        return self._read_rows(name, rows.start, rows.stop)[(slice(None), *index[1:])]


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}  # as safetensors names them


def has_weights(d: Path) -> bool:
    """Whether directory d holds safetensors weights (an index or shards), not only a config."""
    return (d / INDEX).is_file() or any(d.glob("*.safetensors"))


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


LIKE_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|vocab\.json|merges\.txt|"
                        r"chat_template.*)")


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", s.upper())
    if not m:
        raise ConversionError(f"cannot read size {s!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def write_side_files(out: Path, cfg: dict, dt: torch.dtype | None, like: Path | None) -> None:
    """config.json (with the weights' dtype) and, from `like`, the tokenizer and generation files."""
    out_cfg = dict(cfg)
    if dt is not None:
        out_cfg["torch_dtype"] = str(dt).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(out_cfg, indent=2))
    if like is not None:
        for f in like.iterdir():
            if f.is_file() and LIKE_FILES.fullmatch(f.name):
                shutil.copy2(f, out / f.name)
