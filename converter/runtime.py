"""Process-group set-up and the CPU patches megatron-core needs to run a forward pass without CUDA."""
from __future__ import annotations

import contextlib
import os
from unittest import mock

import torch
import torch.distributed as dist

from .errors import ConversionError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_own_group = None  # the one-process group ensure_distributed started, the only one it may also end


def release_own_group() -> None:
    """End the one-process group ensure_distributed started, and megatron's parallel state on it: ranks forked
    from this process need a group of their own, and tearing down an inherited one crashes the child.

    A group someone else started is not ours to end: that is an error.
    """
    global _own_group
    if not dist.is_initialized():
        return
    if _own_group is None or dist.group.WORLD is not _own_group:
        raise ConversionError("this process already belongs to a torch.distributed job: launch the ranks with "
                              "torchrun instead of workers")
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    for name, value in vars(parallel_state).items():  # megatron-core 0.19 leaves two of them set
        if isinstance(value, dist.ProcessGroup):
            setattr(parallel_state, name, None)
    dist.destroy_process_group()
    _own_group = None


def ensure_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, cpu: bool = False) -> None:
    """Start a process group (gloo on CPU, nccl on CUDA) and megatron's parallel state.

    Single process when not launched by torchrun; under torchrun the sizes must fit the world. `cpu`: the work
    only reads and writes files, so under torchrun it takes gloo even where CUDA is available (any number of
    processes per GPU); a single process keeps nccl there, for whatever the caller does next.
    """
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        torchrun = launched_by_torchrun()
        backend = "nccl" if torch.cuda.is_available() and not (cpu and torchrun) else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if torchrun:
            dist.init_process_group(backend=backend)
        else:  # one process: an in-memory store, no port, nothing leaked into child processes' environment
            global _own_group
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            _own_group = dist.group.WORLD
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
                                       window_mask))
        yield


def window_mask(sq: int, skv: int, window: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window causal mask (True = masked), on the CPU."""
    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window[0]).tril(skv - sq + window[1])
    return ~allowed


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """Boolean [1, 1, s, s] mask, True = masked: the local-spec attention needs it explicitly."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
