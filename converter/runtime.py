"""Process-group set-up and the CPU patches megatron-core needs to run a forward pass without CUDA."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist


def import_megatron_eager() -> None:
    """Import megatron-core with its fused elementwise kernels left as plain functions.

    megatron-core decorates them with torch.compile at import (megatron.core.jit binds `jit_fuser` then), and
    torch.compile loads dynamo and inductor: about 1.5 s of every CLI run, for kernels that converting and exporting
    never call (verify and quantize run them unfused: the same functions, without kernel fusion). Only the CLI
    calls this, before anything imports megatron-core, so a library user's process keeps megatron's fusions.
    """
    if "megatron.core" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    try:
        importlib.import_module("megatron.core.jit")  # with megatron.core, which binds jit_fuser
    finally:
        torch.compile = compile_


def ensure_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, cpu: bool = False) -> None:
    """Start a process group (gloo on CPU, nccl on CUDA) and megatron's parallel state.

    Single process when not launched by torchrun; under torchrun the sizes must fit the world. `cpu`: the work
    only reads and writes files, so under torchrun it takes gloo even where CUDA is available (any number of
    processes per GPU); a single process keeps nccl there, for whatever the caller does next.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        backend = "nccl" if torch.cuda.is_available() and not (cpu and torchrun) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if torchrun:
            dist.init_process_group(backend=backend)
        else:  # one process: an in-memory store, no port, nothing leaked into child processes' environment
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    want = (tp, pp, ep, etp or tp)
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())
        if have == want:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if dist.get_backend() == "nccl":
        model_parallel_cuda_manual_seed(1234)


@contextlib.contextmanager
def cpu_patches():
    """Let megatron-core's GPTModel run forward / save on CPU (REFERENCE.md §7); no-op with CUDA.

    Scoped: the patches are undone on exit so library users keep the real torch.cuda.
    """
    if torch.cuda.is_available():
        yield
        return
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.get_cuda_rng_tracker()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: "cpu"))
        stack.enter_context(mock.patch("torch.cuda.synchronize", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(tracker, "fork", lambda *a, **k: contextlib.nullcontext()))
        # tied embeddings under PP: megatron-core moves the shared weight to CUDA before its all-reduce
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
        # sliding-window attention builds its mask with device="cuda"
        stack.enter_context(mock.patch("megatron.core.fusions.fused_softmax.get_sliding_window_causal_mask",
                                       _window_mask))
        yield


def _window_mask(sq: int, skv: int, window: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window causal mask (True = masked), on the CPU."""
    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window[0]).tril(skv - sq + window[1])
    return ~allowed


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """Boolean [1, 1, s, s] mask, True = masked: the local-spec attention needs it explicitly."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
