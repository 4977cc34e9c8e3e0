"""Importing torch and megatron-core with less of their fixed cost: a CLI run pays it on every call."""
from __future__ import annotations

import contextlib
import gc
import importlib
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
