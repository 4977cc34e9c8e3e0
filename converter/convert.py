"""HF safetensors -> Megatron-LM torch_dist checkpoint, streamed one tensor at a time."""
from __future__ import annotations

import functools
import math
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .derive import derive
from .atomic import atomic_dir_all_ranks, refuse_existing
from .byte_copy import DirectWrites, byte_runs
from .errors import ConversionError
from .dequant import open_source
from .finite import message, nonfinite
from .hf_io import DTYPE_NAMES, HFCheckpoint
from . import layout, preplace, readahead, replay
from .mcore_io import save_streaming
from .model import DTYPES, parse_dtype
from .plan import build_plan, check_source, mcore_shapes, with_source_mtp
from .progress import Progress
from .rows import read_rows, readable_by_rows, row_sources
from .runtime import ensure_distributed, launched_by_torchrun
from .workers import auto_count, forked_rank, run_forked

def convert(hf_dir: str | Path, out_dir: str | Path, *, tp: int = 1, pp: int = 1, ep: int = 1,
            etp: int | None = None, dtype: str | torch.dtype = "bf16", overwrite: bool = False,
            family: str | None = None, progress: bool = True, workers: int | str = 1, exact: bool = False,
            allow_nonfinite: bool = False, mtp: bool = True) -> Path:
    """Convert `hf_dir` into a Megatron-LM checkpoint root `out_dir` (tracker file + release/ torch_dist).

    tp/pp/ep/etp are validated and recorded: torch_dist reshards at load, so the files are the same for all.
    workers > 1: that many processes forked from this one share the reading and writing (converter/workers.py);
    "auto": as many as the size, cores and memory make worthwhile (workers.auto_count). Under torchrun every
    rank calls this with workers=1 instead. exact: also apply, through the --spec hook, what Megatron-LM's flags
    cannot express (ModelSpec.gaps). A NaN or Inf in a tensor (as read, or after the cast to dtype) stops the
    conversion by name unless allow_nonfinite. mtp=False leaves the multi-token-prediction layers out (said in
    the output and in hf2mcore.json; they are converted by default).
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    dt = parse_dtype(dtype)
    dtype_name = next((k for k, v in DTYPES.items() if v == dt), None)
    # started before torch's import by the command line, or here by the one process of the conversion (the ranks
    # it forks share it; the ranks of another launcher would each place the tensors in a file of their own)
    place = preplace.following(hf_dir, out_dir, dtype_name)
    if place is None and forked_rank() is None and (not dist.is_initialized() or dist.get_world_size() == 1):
        place = preplace.start(hf_dir, out_dir, dtype_name, overwrite, check=not allow_nonfinite)
    try:
        return _convert(hf_dir, out_dir, tp=tp, pp=pp, ep=ep, etp=etp, dt=dt, dtype_name=dtype_name,
                        overwrite=overwrite, family=family, progress=progress, workers=workers, exact=exact,
                        allow_nonfinite=allow_nonfinite, mtp=mtp, place=place)
    finally:
        preplace.end()  # (in the process that started it: forked ranks leave it to their parent)


def _convert(hf_dir: Path, out_dir: Path, *, tp, pp, ep, etp, dt, dtype_name, overwrite, family, progress, workers,
             exact, allow_nonfinite, mtp, place) -> Path:
    with readahead.following(hf_dir) as ahead:
        spec = derive(hf_dir, family=family)
        spec.check_parallel(tp, pp, ep, etp)
        refuse_existing(out_dir, overwrite, (hf_dir,))
        hf = open_source(hf_dir, spec)
        hf_shapes = {n: hf.shape(n) for n in hf.names()}  # (the reader may rename: packed experts, dequantized)
        check_source(spec, hf_shapes)
        if not mtp:
            spec = with_source_mtp(spec, hf.names(), keep=False)
        if workers == "auto":
            workers = 1 if launched_by_torchrun() else _auto_workers(hf, dt, place)
        if not isinstance(workers, int) or workers < 1:
            raise ConversionError(f"workers must be a positive number or 'auto', not {workers!r}")
        if workers > 1:
            if launched_by_torchrun():
                raise ConversionError("workers: under torchrun the ranks are the workers; leave --workers out")
            run_forked(workers, functools.partial(convert, hf_dir, out_dir, tp=tp, pp=pp, ep=ep, etp=etp, dtype=dt,
                                                  overwrite=overwrite, family=family, progress=progress, exact=exact,
                                                  allow_nonfinite=allow_nonfinite, mtp=mtp))
            return out_dir
        ensure_distributed(cpu=True)
        ns, settings = spec.megatron_namespace(tp, pp, ep, etp, dt, exact=exact), spec.hook_settings(exact)
        model = spec.build_model(device="meta", dtype=dt, exact=exact)
        shapes = mcore_shapes(model)
        plan = build_plan(spec, shapes, hf_shapes)

        world, rank = dist.get_world_size(), dist.get_rank()
        unequal = [_unequal_copies(hf, plan) if rank == 0 else None]  # read once, the verdict shared
        dist.broadcast_object_list(unequal, src=0)
        if unequal[0]:
            raise ConversionError(unequal[0])
        total = sum(_nbytes(hf, n) for n in plan.hf_names())
        # several processes: each shows and counts its own share (about 1/world of the bytes)
        bar = Progress(len(plan.jobs) // world, total // world, "convert" if world == 1 else f"convert rank {rank}",
                       enabled=progress and rank == 0)
        done: set[str] = set()
        if place is not None and rank == 0:  # what no item can be: not worth copying early
            place.only_within(r for j in plan.jobs.values() for r in byte_runs(j, hf, dt) or ())
        record = None if launched_by_torchrun() or dtype_name is None or replay.records_dir() is None else \
            replay.Recorder(hf.spans())
        if record is not None and plan.copies:
            record.spoil("copies of tensors are compared at conversion")
        direct = DirectWrites(record, place)

        def make(name: str) -> torch.Tensor:
            job = plan.jobs[name]
            if name in done:
                raise ConversionError(f"internal: {name} was requested twice")
            runs = byte_runs(job, hf, dt)
            if runs is not None:  # the stored bytes as they are: copied file to file when written
                for s in job.sources if not allow_nonfinite else ():
                    where = hf.byte_range(s)
                    counted = place.nonfinite(*where) if place is not None else None  # (counted early)
                    if bad := nonfinite(*where, DTYPE_NAMES[dt]) if counted is None else counted:
                        raise ConversionError(message([s], bad, str(dt).removeprefix("torch."), job.mcore))
                out = direct.placeholder(job.ctx.shape, dt, runs)
            else:
                if record is not None:  # its bytes would be recorded as the checkpoint's own
                    record.spoil(f"{name} is made in memory")
                if readable_by_rows(job, hf):  # read straight into place
                    out = torch.empty(job.ctx.shape, dtype=dt)
                    read_rows(hf, job, row_sources(job, hf), 0, out)
                else:
                    out = job.to_mcore([hf.get(s).to(dt) for s in job.sources])
            if tuple(out.shape) != job.ctx.shape:
                raise ConversionError(f"{name}: made shape {tuple(out.shape)}, the model needs {job.ctx.shape}")
            if not allow_nonfinite and runs is None:
                _check_finite(job, out)
            done.add(name)
            read = sum(_nbytes(hf, s) for s in job.sources)
            bar.update(read, name)
            ahead.consumed(read, rank)
            return out

        need = sum(math.prod(s) for s in shapes.values()) * dt.itemsize - (place.allocated() if place else 0)
        with atomic_dir_all_ranks(out_dir, overwrite, need, (hf_dir,)) as tmp:
            if place is not None and rank == 0:  # from here on removed with tmp, however this run ends
                place.move_into(layout.release_dir(tmp))
            t0 = time.time()
            mine = save_streaming(model, make, layout.release_dir(tmp), layout.common_state(ns), direct)
            bar.close()
            left = [n for n in mine if n not in done]
            everyone = [None] * world
            dist.all_gather_object(everyone, sorted(done))
            left += sorted(set(plan.jobs) - {n for d in everyone for n in d})
            if left:
                raise ConversionError(f"{len(left)} Megatron tensors were never written, e.g. {left[:5]}")
            if place is not None:
                placed = [None] * world if rank == 0 else None
                dist.gather_object(direct.placed, placed, dst=0)
                if rank == 0:
                    place.finish([item for p in placed for item in p])
            recordings = [None] * world if rank == 0 else None
            if record is not None:
                dist.gather_object(record.result(), recordings, dst=0)
            if rank == 0:
                cfg = (hf_dir / "config.json").read_bytes()
                manifest = _manifest(hf_dir, cfg, hf, spec, plan, dt, time.time() - t0, (tp, pp, ep, etp), world,
                                     settings, not allow_nonfinite)
                layout.write_root(tmp, out_dir, spec, ns, settings, cfg, manifest)
                if record is not None:
                    replay.store(hf_dir, replay.options(tp=tp, pp=pp, ep=ep, etp=etp, dtype=dtype_name, family=family,
                                                        exact=exact, allow_nonfinite=allow_nonfinite, mtp=mtp),
                                 tmp, recordings, manifest, layout.training_script(ns), out_dir)
        return out_dir


def _unequal_copies(hf: HFCheckpoint, plan, chunk: int = 64 << 20) -> str | None:
    """Why a tensor that should repeat another (plan.copies) cannot be dropped: Megatron shares the original."""
    for copy, source in plan.copies.items():
        rows = hf.shape(source)[0]
        step = max(1, chunk // max(1, _nbytes(hf, source) // max(rows, 1)))
        for start in range(0, rows, step):
            box = (slice(start, min(rows, start + step)),)
            if not torch.equal(hf.get_slice(copy, box), hf.get_slice(source, box)):
                return (f"{copy} differs from {source} (rows from {start}): megatron-core's MTP layers share the "
                        "main model's embedding and output head, so a different copy cannot be represented")
    return None


def _check_finite(job, t: torch.Tensor) -> None:
    """NaN or Inf stops the conversion: a model with them trains to NaN, and nothing else would say why.
    aminmax propagates both, at memory speed (a tenth of isfinite().all())."""
    if t.numel() == 0 or all(math.isfinite(v) for v in torch.aminmax(t)):
        return
    bad = t.numel() - int(t.isfinite().sum())
    raise ConversionError(message(job.sources, bad, str(t.dtype).removeprefix("torch."), job.mcore))


def _auto_workers(hf: HFCheckpoint, dt: torch.dtype, place) -> int:
    """By the bytes still to copy: what the early copying (preplace.py) has done needs no rank (on the 2-core box it
    had done nearly all of Llama-3.2-1B by the end of the imports)."""
    sizes = [math.prod(hf.shape(n)) * dt.itemsize for n in hf.names()]  # as written
    return auto_count(sum(sizes) - (place.copied() if place else 0), max(sizes, default=0))


def _nbytes(hf: HFCheckpoint, name: str) -> int:
    return math.prod(hf.shape(name)) * hf.dtype(name).itemsize


def _manifest(hf_dir: Path, cfg: bytes, hf: HFCheckpoint, spec, plan, dt, seconds, par, workers, settings,
              finite_checked: bool) -> dict:
    from importlib.metadata import version

    return {
        "tool": "hf2mcore", "source": str(hf_dir.resolve()), "architecture": spec.architecture,
        "family": spec.family, "dtype": str(dt).removeprefix("torch."),
        "parallel": dict(zip(("tp", "pp", "ep", "etp"), par)),
        "config_sha256": layout.config_hash(cfg),
        "source_files": {f: {"bytes": (hf_dir / f).stat().st_size} for f in sorted(set(hf.file_of.values()))},
        "tensors": {"hf": len(plan.hf_names()), "megatron": len(plan.jobs), "ignored": list(plan.ignored),
                    "copies": plan.copies},
        "mtp_layers": spec.mtp_layers,
        "warnings": list(spec.warnings), "megatron_lm_gaps": layout.gap_lines(spec, settings),
        "seconds": round(seconds, 2), "processes": workers, "checked_finite": finite_checked,
        "writer": "megatron-core's dist_checkpointing (torch_dist, through PyTorch DCP)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{pkg: version(pkg) for pkg in ("megatron-core", "transformers", "safetensors")}},
    }
