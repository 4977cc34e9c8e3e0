"""Write a directory completely or not at all: build it in a hidden sibling, rename it into place at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import ConversionError


def refuse_existing(out_dir: Path, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Stop before any work when OUT exists (without --overwrite), or when replacing it would remove an input:
    OUT is an input, holds one, or lies inside one."""
    out = out_dir.resolve()
    for inp in (Path(i).resolve() for i in inputs if i is not None):
        if out == inp or out in inp.parents or inp in out.parents:
            raise ConversionError(f"{out_dir} is, holds or lies inside the input {inp}: choose an output elsewhere")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_dir(out_dir: Path):
    """Yields the temporary directory; on success it replaces out_dir, on any failure it is removed."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_dir_all_ranks(out_dir: Path, overwrite: bool):
    """atomic_dir for every process of a torch.distributed job writing one directory: rank 0 owns the
    temporary directory and renames it after every rank is done; each rank gets the temporary path."""
    import torch.distributed as dist

    refuse_existing(out_dir, overwrite)
    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        box = [stack.enter_context(atomic_dir(out_dir)) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        yield box[0]
        dist.barrier()  # every rank has written its part before rank 0 renames
    dist.barrier()
