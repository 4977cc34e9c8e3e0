"""Live models for training code: HF weights straight into a megatron-core GPTModel at any TP/PP/EP, and back.

Each rank fills only what it owns. megatron-core's sharded state dict tells, for every local parameter (or view
of one), which global tensor it is a piece of and where (key, offsets); the import plan says which HF rows make
that global tensor. For the transforms that move whole rows, a rank reads only its rows and columns from
safetensors, into the parameter itself where it can (rows.py). The others transpose one expert's matrix of a
packed tensor; that matrix is read whole.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from .atomic import atomic_dir, refuse_existing
from .dequant import open_source
from .derive import derive, read_config
from .errors import ConversionError
from .hf_io import parse_size, write_sharded, write_side_files
from .mcore_io import sharded_views
from .model import parse_dtype
from .packed import repack
from .plan import Plan, build_plan
from .rows import read_rows, readable_by_rows, row_sources
from .runtime import ensure_distributed


def _chunks(model) -> list:
    """Model chunks without Megatron-LM's DDP / Float16Module wrappers (their state-dict names carry `module.`)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(list(model) if isinstance(model, (list, tuple)) else [model])


def _global_name(local: str, sh) -> str:
    """The name of this piece's tensor in the single-process model: the layer number comes from megatron-core's
    checkpoint key (global under PP), the expert number from the prepended expert axis (global under EP)."""
    parts = local.split(".")
    key_nums = [p for p in sh.key.split(".") if p.isdigit()]
    nums = key_nums + [str(o) for o in sh.global_offset[: sh.prepend_axis_num]]
    at = [i for i, p in enumerate(parts) if p.isdigit()]
    if len(at) != len(nums):
        raise ConversionError(f"internal: cannot place {local} (checkpoint key {sh.key}) in the global model")
    for i, n in zip(at, nums):
        parts[i] = n
    return ".".join(parts)


def _pieces(model) -> list[tuple[str, str, torch.Tensor, object]]:
    """(local name, plan name, parameter, ShardedTensor) for every piece of every tensor on this rank."""
    out = []
    for chunk in _chunks(model):
        params = {n: t for n, t in chunk.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.Tensor) and not n.endswith("_extra_state")}
        views = sharded_views(chunk)
        lost = [n for n in params if n not in views]
        if lost:
            raise ConversionError(f"model tensors with no place in the checkpoint layout: {lost[:5]}")
        out += [(local, _plan_name(local, sh), params[local], sh) for local in params for sh in _joined(views[local])]
    return out


def _joined(views: list) -> list:
    """A parameter megatron-core saves as several tensors (Mamba's in_proj as `.z .x .B .C .dt`, its conv1d as
    `.x .B .C`, each split by TP on its own) as pieces of the one parameter: its parts laid end to end along their
    first axis, in the order megatron-core splits them."""
    keys = list(dict.fromkeys(sh.key for sh in views))
    base = keys[0].rpartition(".")[0]
    if len(keys) == 1 or any(k.rpartition(".")[0] != base for k in keys):
        return views
    axis = views[0].prepend_axis_num
    size = {sh.key: sh.global_shape[axis] for sh in views}
    start = dict(zip(keys, [sum(size[k] for k in keys[:i]) for i in range(len(keys))]))
    total = sum(size.values())
    out = []
    for sh in views:
        at, shape = list(sh.global_offset), list(sh.global_shape)
        at[axis], shape[axis] = start[sh.key] + at[axis], total
        out.append(dataclasses.replace(sh, key=base, global_offset=tuple(at), global_shape=tuple(shape)))
    return out


def _plan_name(local: str, sh) -> str:
    """The plan's name for this piece; a tied output layer on the last pipeline stage is a piece of the word
    embeddings, and megatron-core keys it so (an untied one is keyed by its own name)."""
    return sh.key if local.startswith("output_layer.") else _global_name(local, sh)


def _global_plan(spec, pieces, hf_shapes=None) -> Plan:
    """The plan of the whole model, from every rank's pieces."""
    mine = {name: tuple(sh.global_shape[sh.prepend_axis_num:]) for _, name, _, sh in pieces}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    shapes: dict[str, tuple[int, ...]] = {}
    for d in gathered:
        for k, v in d.items():
            if shapes.setdefault(k, v) != v:
                raise ConversionError(f"internal: ranks disagree on the shape of {k}")
    return build_plan(spec, shapes, hf_shapes)


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | Path, *, family: str | None = None) -> None:
    """Fill `model` (a GPTModel, or a list of virtual-pipeline chunks) on this rank from HF safetensors.

    Call on every rank of the job after the model is built (it gathers every rank's tensor list once, to check
    that the whole model is covered). Works on CPU and CUDA parameters."""
    hf_dir = Path(hf_dir)
    pieces = _pieces(model)
    # the model's own MTP depth: the weights must then hold those layers
    spec = derive(hf_dir, family=family).replace(mtp_layers=_chunks(model)[0].config.mtp_num_layers or 0)
    hf = open_source(hf_dir, spec)
    plan = _global_plan(spec, pieces, {n: hf.shape(n) for n in hf.names()})
    filled: dict[int, int] = {}
    cached, rows = None, None
    for local, name, param, sh in pieces:
        job = plan.jobs[name]
        offset, size = tuple(sh.global_offset[sh.prepend_axis_num:]), tuple(sh.data.shape)
        by_rows = readable_by_rows(job, hf)
        if job.mcore != cached:  # the pieces of one tensor are adjacent
            # a transform that is not row-wise (a transpose) needs its whole sources: one expert's matrix
            cached, rows = job.mcore, (row_sources(job, hf) if by_rows
                                       else job.to_mcore([hf.get(s) for s in job.sources]))
        piece = param.data.as_strided(sh.data.size(), sh.data.stride(), sh.data.storage_offset())
        if by_rows:  # only this piece's rows and columns are read, into the parameter itself where it can be
            whole_rows = all(o == 0 for o in offset[1:]) and size[1:] == job.ctx.shape[1:]
            read_rows(hf, job, rows, offset[0], piece,
                      () if whole_rows else tuple(slice(o, o + n) for o, n in zip(offset[1:], size[1:])))
        else:
            piece.copy_(rows[tuple(slice(o, o + n) for o, n in zip(offset, size))])
        filled[id(param)] = filled.get(id(param), 0) + piece.numel()
    short = sorted({local for local, _, p, _ in pieces if filled[id(p)] != p.numel()})
    if short:
        raise ConversionError(f"parameters not completely filled from {hf_dir}: {short[:5]}")


def megatron_model(hf_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                   device: str = "cpu", dtype: str | torch.dtype = "bf16", family: str | None = None):
    """Derive, build and load in one call: this rank's GPTModel with the HF weights (single process by default;
    under torchrun the sizes must fit the world)."""
    spec = derive(hf_dir, family=family)
    spec.check_parallel(tp, pp, ep, etp)
    ensure_distributed(tp, pp, ep, etp)
    model = spec.build_model(device=device, dtype=parse_dtype(dtype))
    load_hf_weights(model, hf_dir, family=family)
    return model


def _gathered(plan: Plan, pieces, dtype: torch.dtype):
    """Every global Megatron tensor in plan order, whole on rank 0 (None elsewhere); a collective per tensor."""
    by_name: dict[str, list] = {}
    for _, name, _, sh in pieces:
        by_name.setdefault(name, []).append(sh)
    rank = dist.get_rank()
    for name, job in plan.jobs.items():
        mine = [(tuple(sh.global_offset[sh.prepend_axis_num:]), sh.data.detach().to("cpu", dtype))
                for sh in by_name.get(name, [])]
        got = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if rank != 0:
            continue
        full = torch.empty(job.ctx.shape, dtype=dtype)
        seen = torch.zeros(job.ctx.shape, dtype=torch.bool)
        for offset, t in (p for ps in got for p in ps):
            box = tuple(slice(o, o + n) for o, n in zip(offset, t.shape))
            full[box] = t
            seen[box] = True
        if not seen.all():
            raise ConversionError(f"{name}: no rank holds part of it ({(~seen).sum().item()} values missing)")
        yield name, full


@torch.no_grad()
def save_hf_weights(model, out_dir: str | Path, *, like: str | Path, dtype: str | torch.dtype | None = None,
                    shard_size: str | int = "5GB", overwrite: bool = False, family: str | None = None) -> Path | None:
    """Gather this job's model and write HF safetensors (+ config and tokenizer files of `like`) on rank 0.

    Call on every rank. Returns out_dir on rank 0, None elsewhere."""
    out_dir, like = Path(out_dir), Path(like)
    first = _chunks(model)[0]
    spec = derive(like, family=family).replace(mtp_layers=first.config.mtp_num_layers or 0)
    dt = parse_dtype(dtype) if dtype else first.config.params_dtype
    rank = dist.get_rank()
    if rank == 0:
        refuse_existing(out_dir, overwrite, (like,))
    pieces = _pieces(model)
    plan = _global_plan(spec, pieces)
    tensors = repack(((hf_name, t) for name, full in _gathered(plan, pieces, dt)
                      for hf_name, t in plan.to_hf(name, full)), spec.moe.num_experts if spec.moe else 0)
    if rank != 0:
        for _ in tensors:
            pass
        return None
    with atomic_dir(out_dir, overwrite, inputs=(like,)) as tmp:
        write_sharded(tensors, tmp, parse_size(shard_size))
        write_side_files(tmp, read_config(like), dt, like)
    return out_dir
