"""Megatron-Core torch_dist checkpoint -> HF safetensors: the import plan run backwards, one tensor at a time."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from . import layout, megatron_fields
from .atomic import atomic_dir, refuse_existing
from .convert import parse_dtype
from .derive import derive, read_config
from .errors import ConversionError
from .from_args import hf_config_from_args
from .hf_io import write_sharded
from .mcore_io import ChunkReader, params_from_checkpoint
from .packed import repack
from .plan import Plan, build_plan, mcore_shapes
from .progress import Progress
from .model import build_gpt
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


def source_config(root: Path, ns: dict, like: Path | None) -> dict:
    """--like's config, else the one hf2mcore recorded, else one re-derived from the Megatron-LM arguments."""
    if like is not None:
        return read_config(like)
    return layout.recorded_hf_config(root) or hf_config_from_args(ns)


def single_process(ns: dict) -> dict:
    """The namespace at TP=PP=EP=1: torch_dist reshards, so one process reads a checkpoint saved at any size."""
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
             "expert_tensor_parallel_size")
    return {k: v for k, v in ns.items() if k not in sizes}


def mcore_tensors(model, ckpt: Path, plan: Plan, dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, one at a time, from a torch_dist checkpoint saved at any TP/PP/EP."""
    reader = ChunkReader(ckpt)
    for name, t in params_from_checkpoint(model, reader, names=list(plan.jobs)):
        yield name, t if dtype is None else t.to(dtype)


def _recorded_dtype(root: Path, cfg: dict) -> torch.dtype | None:
    """The dtype the weights were converted in (megatron-core keeps norms in fp32 whatever params_dtype is)."""
    name = layout.manifest(root).get("dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
    return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) else None


def export(mcore_dir: str | Path, out_dir: str | Path, *, like: str | Path | None = None,
           dtype: str | torch.dtype | None = None, shard_size: str | int = "5GB", overwrite: bool = False,
           family: str | None = None, progress: bool = True) -> Path:
    root, out_dir = Path(mcore_dir), Path(out_dir)
    like = Path(like) if like else None
    ckpt = layout.find_checkpoint(root)
    root = layout.root_of(ckpt)
    refuse_existing(out_dir, overwrite)
    ns, _ = layout.megatron_view(root, ckpt)
    cfg = source_config(root, ns, like)
    spec = derive(cfg, family=family)
    dt = parse_dtype(dtype) if dtype else _recorded_dtype(root, cfg)
    odd = megatron_fields.shape_differences(single_process(spec.megatron_namespace()), single_process(ns))
    if odd:
        raise ConversionError(f"the HF config ({'--like ' + str(like) if like else 'recorded'}) and the checkpoint's "
                              f"Megatron-LM arguments describe different weights: {'; '.join(odd[:4])}")
    ensure_distributed(cpu=True)
    # the checkpoint's own layout (e.g. MoE layers stacked or per layer), as Megatron-LM would load it
    model = build_gpt(single_process(ns), spec.hook_settings(), device="meta")
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
