"""Megatron-Core torch_dist checkpoint -> HF safetensors: the import plan run backwards, one tensor at a time."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from .convert import parse_dtype
from .derive import derive, read_config
from .atomic import atomic_dir, refuse_existing
from .errors import ConversionError
from .hf_io import write_sharded
from .packed import repack
from .from_args import hf_config_from_args
from .mcore_io import ChunkReader, find_checkpoint, load_common, params_from_checkpoint
from .plan import Plan, build_plan, mcore_shapes
from .progress import Progress
from .runtime import ensure_distributed

LIKE_FILES = re.compile(r"(tokenizer.*|special_tokens_map\.json|generation_config\.json|vocab\.json|merges\.txt|"
                        r"chat_template.*)")


def parse_size(s: str | int) -> int:
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", s.upper())
    if not m:
        raise ConversionError(f"cannot read size {s!r} (e.g. 5GB, 500MB)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index(m.group(2) or "_"))


def source_config(root: Path, ckpt: Path, like: Path | None) -> dict:
    """--like's config, else the one hf2mcore recorded, else one re-derived from Megatron-LM's saved arguments."""
    if like is not None:
        return read_config(like)
    recorded = root / "hf_config.json"
    if recorded.is_file():
        return read_config(recorded)
    args = load_common(ckpt).get("args")
    if args is None:
        raise ConversionError(f"{ckpt} records neither an HF config nor Megatron-LM arguments; pass --like HF_DIR")
    return hf_config_from_args(args)


def mcore_tensors(model, ckpt: Path, plan: Plan, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, one at a time, from a torch_dist checkpoint saved at any TP/PP/EP."""
    reader = ChunkReader(ckpt)
    for name, t in params_from_checkpoint(model, reader, names=list(plan.jobs)):
        yield name, t if dtype is None else t.to(dtype)


def _recorded_dtype(root: Path, cfg: dict) -> torch.dtype | None:
    """The dtype the weights were converted in (megatron-core keeps norms in fp32 whatever params_dtype is)."""
    manifest = root / "hf2mcore.json"
    name = json.loads(manifest.read_text()).get("dtype") if manifest.is_file() else None
    name = name or cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else None


def export(mcore_dir: str | Path, out_dir: str | Path, *, like: str | Path | None = None,
           dtype: str | torch.dtype | None = None, shard_size: str | int = "5GB", overwrite: bool = False,
           family: str | None = None, progress: bool = True) -> Path:
    root, out_dir = Path(mcore_dir), Path(out_dir)
    like = Path(like) if like else None
    ckpt = find_checkpoint(root)
    refuse_existing(out_dir, overwrite)
    cfg = source_config(root if root != ckpt else ckpt.parent, ckpt, like)
    spec = derive(cfg, family=family)
    dt = parse_dtype(dtype) if dtype else _recorded_dtype(ckpt.parent, cfg)
    ensure_distributed(cpu=True)
    model = spec.build_model(device="meta")
    plan = build_plan(spec, mcore_shapes(model))
    bar = Progress(len(plan.jobs), 0, "export", enabled=progress)

    def hf_tensors():
        for name, t in mcore_tensors(model, ckpt, plan, dt):
            bar.update(t.numel() * t.element_size(), name)
            yield from plan.jobs[name].to_hf(t)

    with atomic_dir(out_dir) as tmp:
        # HF checkpoints list tensors in name order; keep that so files compare cleanly.
        write_sharded(repack(hf_tensors(), spec.moe.num_experts if spec.moe else 0), tmp, parse_size(shard_size))
        bar.close()
        write_side_files(tmp, cfg, dt, like)
    return out_dir


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
