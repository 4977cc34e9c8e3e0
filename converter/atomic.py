"""Write a directory completely or not at all: build it in a hidden sibling, rename it into place at the end."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from .errors import ConversionError


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
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
