"""Megatron-Core torch_dist checkpoint -> HF safetensors: the import plan run backwards, one tensor at a time."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch

from . import layout, megatron_fields
from .atomic import atomic_dir, refuse_existing
from .errors import ConversionError
from .hf_io import parse_size, write_sharded, write_side_files
from .mcore_io import ChunkReader, params_from_checkpoint
from .packed import repack
from .plan import Plan, build_plan, mcore_shapes
from .model import build, parse_dtype, single_process
from .progress import Progress
from .runtime import ensure_distributed

def mcore_tensors(model, reader: ChunkReader, plan: Plan,
                  dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(Megatron name, full tensor) pairs, one at a time, from a torch_dist checkpoint saved at any TP/PP/EP."""
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
    refuse_existing(out_dir, overwrite, (root, like))
    reader = ChunkReader(ckpt)  # reads .metadata (through the allow-list) before any work is shown
    spec, ns, cfg = layout.checkpoint_spec(root, ckpt, like, family)
    dt = parse_dtype(dtype) if dtype else _recorded_dtype(root, cfg)
    odd = megatron_fields.shape_differences(single_process(spec.megatron_namespace()), single_process(ns))
    if odd:
        raise ConversionError(f"the HF config ({'--like ' + str(like) if like else 'recorded'}) and the checkpoint's "
                              f"Megatron-LM arguments describe different weights: {'; '.join(odd[:4])}")
    ensure_distributed(cpu=True)
    # the checkpoint's own layout (e.g. MoE layers stacked or per layer), as Megatron-LM would load it
    model = build(single_process(ns), spec.hook_settings(), device="meta")
    # repeated tensors (DeepSeek-V3's MTP copies of the embedding and head) as the converted source had them
    plan = build_plan(spec, mcore_shapes(model), copies=layout.manifest(root).get("tensors", {}).get("copies") != {})
    bar = Progress(len(plan.jobs), 0, "export", enabled=progress)

    def hf_tensors():
        for name, t in mcore_tensors(model, reader, plan, dt):
            bar.update(t.numel() * t.element_size(), name)
            yield from plan.to_hf(name, t)

    need = sum(math.prod(j.ctx.shape) for j in plan.jobs.values()) * (dt or torch.bfloat16).itemsize
    with atomic_dir(out_dir, overwrite, need, (root, like)) as tmp:
        # HF checkpoints list tensors in name order; keep that so files compare cleanly.
        write_sharded(repack(hf_tensors(), spec.moe.num_experts if spec.moe else 0), tmp, parse_size(shard_size))
        bar.close()
        write_side_files(tmp, cfg, dt, like)
    return out_dir
