"""Importing torch and megatron-core with less of their fixed cost: a CLI run pays it on every call."""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import os
import sys


@contextlib.contextmanager
def gc_paused():
    """No garbage collection inside the block.

    Importing torch and megatron-core allocates a few hundred thousand objects that all stay alive; the
    collector's passes over them during the imports cost about 0.4 s of a conversion's start-up, for nothing.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def import_megatron_eager() -> None:
    """Import megatron-core with its fused elementwise kernels left as plain functions.

    megatron-core decorates them with torch.compile at import (megatron.core.jit binds `jit_fuser` then), and
    torch.compile loads dynamo and inductor: about 1.5 s of every CLI run, for kernels that converting and exporting
    never call (verify and quantize run them unfused: the same functions, without kernel fusion). Only the CLI
    calls this, before anything imports megatron-core, so a library user's process keeps megatron's fusions.
    """
    if "megatron.core" in sys.modules:
        return
    with gc_paused():
        import torch

        compile_ = torch.compile
        torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
        try:
            importlib.import_module("megatron.core.jit")  # with megatron.core, which binds jit_fuser
        finally:
            torch.compile = compile_


def interpret_triton_without_gpu() -> None:
    """On a machine without a GPU, have Triton run kernels (Mamba's) in its interpreter on the CPU: Triton reads
    TRITON_INTERPRET when a kernel is defined, its own library's included, so before torch is imported (which
    imports Triton). A process that imported torch first gets runtime.check_cpu_kernels' error instead."""
    if "triton" not in sys.modules and not any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/kfd")):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def cache_bytecode(package: str = "torch") -> str | None:
    """Where Python may not write bytecode (PYTHONDONTWRITEBYTECODE, which many container images set) and `package`
    was installed without it (uv, pip --no-compile), every run compiles torch, megatron-core and sympy from source:
    about 6 s of each start-up on the GPU node, 9-11 s in all (RESULTS.md, session 13). Then the bytecode goes to
    hf2mcore's cache directory (HF2MCORE_CACHE) instead: still nothing is written beside the installed sources.
    The directory used, or None where nothing changed. Called before those imports."""
    if not sys.dont_write_bytecode or sys.pycache_prefix is not None:
        return None
    spec = importlib.util.find_spec(package)  # located, not imported
    if spec is None or not (spec.origin or "").endswith(".py"):
        return None
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):  # installed with its bytecode: read it there
        return None
    from .default_model import cache_dir

    # (a tree mirroring the sources' absolute paths; each .pyc names its interpreter and is checked against its
    # source's size and time, as beside it)
    sys.pycache_prefix, sys.dont_write_bytecode = str(cache_dir() / "pycache"), False
    return sys.pycache_prefix
