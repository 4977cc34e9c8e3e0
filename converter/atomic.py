"""Write a directory completely or not at all: build it in a hidden sibling, rename it into place at the end.

The sibling is locked (flock) while its run lives, so the next run into the same OUT recognises one that a killed
run left behind and removes it. Publishing never replaces a directory that appeared meanwhile (another run) unless
--overwrite was given, and then exchanges the two atomically: OUT is always either the old or the new one.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path

from .errors import ConversionError, causes, one_line

MARK = ".hf2mcore-partial"  # inside every temporary directory: only such directories are ever swept
STALE_AFTER_S = 10.0  # an unlocked sibling younger than this may be a run between its mkdir and its lock
LOW_SPACE = 1 << 20  # free bytes below which a failed write is taken for a full disk


def refuse_existing(out_dir: Path, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> None:
    """Stop before any work when OUT exists (without --overwrite), or when replacing it would remove an input:
    OUT is an input, holds one, or lies inside one."""
    inp = _input_under(out_dir, inputs)
    if inp is not None:
        raise ConversionError(f"{out_dir} is, holds or lies inside the input {inp}: choose an output elsewhere")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} exists; pass --overwrite to replace it")


def _input_under(path: Path, inputs) -> Path | None:
    """The input that `path` is, holds or lies inside, if any."""
    p = Path(path).resolve()
    for inp in (Path(i).resolve() for i in inputs if i is not None):
        if p == inp or p in inp.parents or inp in p.parents:
            return inp
    return None


@contextlib.contextmanager
def atomic_dir(out_dir: Path, overwrite: bool, need: int | None = None, inputs: tuple[Path | None, ...] = ()):
    """Yields the temporary directory; on success it becomes out_dir, on any failure (a signal included) it is
    removed. need: the bytes the output will take, checked against the free space first; inputs: never swept."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir, inputs)
    _check_space(out_dir, need)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    fd = _locked(tmp)
    try:
        with disk_errors(out_dir, need):
            yield tmp
        (tmp / MARK).unlink()
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir_all_ranks(out_dir: Path, overwrite: bool, need: int | None = None,
                         inputs: tuple[Path | None, ...] = ()):
    """atomic_dir for every process of a torch.distributed job writing one directory: rank 0 owns the
    temporary directory and renames it after every rank is done; each rank gets the temporary path."""
    import torch.distributed as dist

    refuse_existing(out_dir, overwrite, inputs)
    rank = dist.get_rank()
    with contextlib.ExitStack() as stack:
        box = [stack.enter_context(atomic_dir(out_dir, overwrite, need, inputs)) if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        if rank != 0:  # every rank names a full disk the same way, whichever reports first
            stack.enter_context(disk_errors(out_dir, need))
        yield box[0]
        dist.barrier()  # every rank has written its part before rank 0 renames
    dist.barrier()


def scratch_dir(out_dir: Path, inputs: tuple[Path | None, ...] = ()) -> tuple[Path, int]:
    """A marked, locked sibling of out_dir for work begun before the conversion's own temporary directory exists
    (preplace.py); the caller removes it, or the next run into out_dir once this one is gone. Returns it and the
    descriptor holding its lock."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir, inputs)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-early"
    return tmp, _locked(tmp)


def _locked(tmp: Path) -> int:
    """Make `tmp`, lock it and mark it as ours; the descriptor holds the lock."""
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        (tmp / MARK).touch()
    except BaseException:
        os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return fd


def sweep_stale(out_dir: Path, inputs: tuple[Path | None, ...] = ()) -> list[Path]:
    """Remove the temporary siblings of out_dir that killed runs left: marked as ours, unlocked, not brand new,
    and not one of this run's inputs (nor holding or inside one)."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.tmp-\d+(-early)?")
    removed = []
    for p in out_dir.parent.iterdir() if out_dir.parent.is_dir() else ():
        if not (pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink() and (p / MARK).is_file()):
            continue
        if _input_under(p, inputs) is not None:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its run is alive
            continue
        finally:
            os.close(fd)
        if time.time() - p.stat().st_mtime > STALE_AFTER_S:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    if not overwrite:
        if not _rename2(tmp, out_dir, _RENAME_NOREPLACE):
            if out_dir.exists():  # (a plain rename would replace an empty directory)
                raise _appeared(out_dir)
            tmp.rename(out_dir)
        return
    if not out_dir.exists():
        tmp.rename(out_dir)
    elif _rename2(tmp, out_dir, _RENAME_EXCHANGE):
        shutil.rmtree(tmp)  # now the old output
    else:  # a filesystem without the exchange: the old output steps aside first
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _appeared(out_dir: Path) -> ConversionError:
    return ConversionError(f"{out_dir} appeared while this run was writing it (another run?): left as it is, this "
                           "run's output discarded; pass --overwrite to replace it")


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the filesystem lacks it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    if err == errno.EEXIST:
        raise _appeared(dst)
    raise OSError(err, os.strerror(err), str(dst))


def _mount_of(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def _check_space(out_dir: Path, need: int | None) -> None:
    if need is None:
        return
    free = shutil.disk_usage(out_dir.parent).free
    if free < need:
        raise ConversionError(f"not enough space for {out_dir}: it needs {_size(need)}, the disk at "
                              f"{_mount_of(out_dir.parent)} has {_size(free)} free")


@contextlib.contextmanager
def disk_errors(out_dir: Path, need: int | None):
    """A full disk, however deep in the writer it surfaced, becomes one line naming the disk and the bytes."""
    try:
        yield
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        free = shutil.disk_usage(out_dir.parent).free
        # safetensors reports ENOSPC only in its message, torch's zip writer not at all ("unexpected pos"): a
        # failed write with the disk all but full is taken for a full disk, and the writer's own words follow
        if not (free < LOW_SPACE or any(isinstance(e, OSError) and e.errno == errno.ENOSPC
                                        or "No space left on device" in str(e) for e in causes(exc))):
            raise
        needs = f"it needs {_size(need)}, " if need else ""
        raise ConversionError(f"no space left on the disk at {_mount_of(out_dir.parent)} while writing {out_dir} "
                              f"({needs}{_size(free)} free now; the writer said: {one_line(exc, 120)})") from None


def _size(n: int) -> str:
    return f"{n / (1 << 20):,.1f} MiB ({n:,} bytes)"
