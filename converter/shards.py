"""Which files of a Hugging Face directory hold its weights (the shards its index names, else every *.safetensors),
and what each file's header says.

Without torch: the command line reads them before its imports (readahead.py, replay.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ConversionError

INDEX = "model.safetensors.index.json"


def shard_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The shard file names (sorted) and the index's weight_map (None without an index)."""
    index = path / INDEX
    if not index.is_file():
        return [p.name for p in sorted(path.glob("*.safetensors"))], None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(f"{index} is not a safetensors index: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConversionError(f"{index}: weight_map must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    for f in files:  # a shard named by the index is a file of this directory, never one elsewhere
        if Path(f).is_absolute() or ".." in Path(f).parts or not Path(f).parts:
            raise ConversionError(f"{index} names the shard {f!r}, outside {path}: refused")
    return files, weight_map


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (tensor name -> dtype, shape, data offsets) and where the data starts."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n
