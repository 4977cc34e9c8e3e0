"""Process-group set-up and the CPU patches megatron-core needs to run a forward pass without CUDA."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
from unittest import mock

import torch
import torch.distributed as dist

from .errors import ConversionError
from .launch import launched_by_torchrun  # (re-exported: callers import it from here)


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
        if "megatron.core.ssm.mamba_mixer" in sys.modules:
            # Mamba's Triton kernels, interpreted (mamba_kernels): they enter the tensor's CUDA device, and their
            # autotuner would time each candidate on a GPU; any one configuration computes the same result
            stack.enter_context(mock.patch("torch.cuda.device", lambda *a, **k: contextlib.nullcontext()))
            stack.enter_context(mock.patch("triton.runtime.autotuner.Autotuner.prune_configs", _first_config))
        yield


def _first_config(self, kwargs):
    return self.configs[:1]


def check_cpu_kernels() -> None:
    """Before a Mamba or Gated DeltaNet layer (Triton kernels: mamba_ssm's, fla's l2norm) runs on the CPU: Triton's
    interpreter must be on (imports.interpret_triton_without_gpu)."""
    import triton.language as tl

    if type(tl.cumsum).__name__ != "InterpretedFunction":
        raise ConversionError("Mamba and Gated DeltaNet layers on the CPU run Triton's interpreter: set TRITON_INTERPRET=1 in the "
                              "environment, or import converter before torch (it sets it on machines without a GPU)")


def mamba_kernels() -> None:
    """Make megatron-core's Mamba layer buildable before megatron.core.ssm is first imported.

    It needs mamba_ssm's Triton kernels. mamba-ssm installed without its CUDA extension (MAMBA_SKIP_CUDA_BUILD=TRUE,
    as setup.sh does: the extension needs nvcc and a long build) has them, but its package __init__ imports the
    extension, so megatron-core would take the package for absent: megatron-core then sees the package without
    its __init__ run."""
    ssm = sys.modules.get("megatron.core.ssm.mamba_mixer")
    if ssm is not None:
        if not ssm.HAVE_MAMBA_SSM:
            raise ConversionError("internal: megatron-core's Mamba layer was imported before mamba_kernels()")
        return
    stand_in = None
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        found = importlib.util.find_spec("mamba_ssm")
        if found is None or not found.submodule_search_locations:
            raise ConversionError("Mamba layers need the mamba-ssm package (its Triton kernels are enough: "
                                  "MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation "
                                  "mamba-ssm)") from None
        stand_in = sys.modules["mamba_ssm"] = types.ModuleType("mamba_ssm")
        stand_in.__path__, stand_in.__spec__ = list(found.submodule_search_locations), found
    try:
        import megatron.core.ssm.mamba_mixer as mixer
    finally:
        # only megatron-core sees the stand-in: transformers, finding no importable mamba_ssm, keeps its PyTorch
        # Mamba-2 (an independent reference)
        if stand_in is not None and sys.modules.get("mamba_ssm") is stand_in:
            del sys.modules["mamba_ssm"]
    if not mixer.HAVE_MAMBA_SSM:
        raise ConversionError("megatron-core cannot import mamba_ssm's Triton kernels (mamba_ssm.ops.triton)")


@contextlib.contextmanager
def transformers_reference(model, torch_only: bool = False):
    """transformers' hybrid models call kernel packages (fla's Gated DeltaNet, mamba_ssm) wherever they are installed,
    and those run only on a GPU: on the CPU (or with torch_only), the model's own PyTorch functions compute the
    reference instead, for the block (transformers keeps each one as the kernel wrapper's __wrapped__)."""
    module = sys.modules[type(model).__module__]
    if torch.cuda.is_available() and not torch_only:
        yield
        return
    kernels = {name: f for name, f in vars(module).items() if callable(getattr(f, "__wrapped__", None))
               and getattr(getattr(f, "__code__", None), "co_filename", "").endswith("hub_kernels.py")}
    try:
        for name, f in kernels.items():
            setattr(module, name, f.__wrapped__)
        yield
    finally:
        for name, f in kernels.items():
            setattr(module, name, f)


def window_mask(sq: int, skv: int, window: tuple[int, int]) -> torch.Tensor:
    """megatron-core's sliding-window causal mask (True = masked), on the CPU."""
    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window[0]).tril(skv - sq + window[1])
    return ~allowed


def causal_mask(seq_len: int, device) -> torch.Tensor:
    """Boolean [1, 1, s, s] mask, True = masked: the local-spec attention needs it explicitly."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]
