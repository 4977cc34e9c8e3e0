"""Megatron-LM itself, as a user runs it, on CPU: the judge of what hf2mcore writes.

Run as a script (one process, or under torchrun for TP/EP > 1) with a copy of Megatron-LM first on sys.path:

    python megatron_lm_judge.py MEGATRON_LM CKPT IDS.pt OUT.pt [extra Megatron-LM flags ...]

It takes the flags from CKPT/megatron_args.sh exactly as written (bash sources it), parses and validates them with
Megatron-LM's own `parse_and_validate_args`, builds the model the way `pretrain_gpt.py` does
(`gpt_config_from_args` -> `GPTModelBuilder.build_distributed_models`), loads CKPT with Megatron-LM's
`checkpointing.load_checkpoint` (`--finetune`, strictness raise_all), runs a forward pass on the token ids and
saves the full-vocabulary fp32 logits (rank 0). `save` as first argument instead saves the loaded model again with
Megatron-LM's own `save_checkpoint` into OUT (a directory), as training would.

Only CPU stand-ins are added (REFERENCE.md §8), none of which changes the model.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock


def model_args(ckpt: Path) -> tuple[list[str], list[str]]:
    """MODEL_ARGS of CKPT/megatron_args.sh as bash expands them, and the PYTHONPATH it exports (the --spec hook)."""
    out = subprocess.run(["bash", "-c", 'source "$1" && printf "%s\\0" "${PYTHONPATH:-}" "${MODEL_ARGS[@]}"', "_",
                          str(ckpt / "megatron_args.sh")], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    path, *args = out.stdout.split("\0")[:-1]
    return args, [p for p in path.split(":") if p]


def main() -> None:
    mode = "forward"
    if sys.argv[1] == "save":
        mode = sys.argv.pop(1)
    mlm, ckpt, ids_path, out_path, *extra = sys.argv[1:]
    ckpt = Path(ckpt)
    argv, path = model_args(ckpt)
    sys.path[:0] = [mlm, *path]  # Megatron-LM, then what megatron_args.sh put on PYTHONPATH (the --spec hook)
    import torch
    import torch.distributed as dist

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.training import arguments, checkpointing, get_args
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.models.gpt import GPTModelBuilder

    world = int(os.environ["WORLD_SIZE"])
    sys.argv = [sys.argv[0], *argv, "--load", str(ckpt), "--finetune", "--no-load-optim",
                "--no-load-rng", "--dist-ckpt-strictness", "raise_all", "--micro-batch-size", "1",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "8", "--no-gradient-accumulation-fusion",
                "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--attention-dropout", "0", "--hidden-dropout", "0",
                *extra]
    stack = contextlib.ExitStack()
    # CPU stand-ins (REFERENCE.md §8): no CUDA device, no fused kernels
    stack.enter_context(mock.patch("torch.cuda.current_device", lambda: "cpu"))
    stack.enter_context(mock.patch("torch.cuda.synchronize", lambda *a, **k: None))
    stack.enter_context(mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.get_rng_state()))
    stack.enter_context(mock.patch.object(torch.nn.Module, "cuda", lambda self, *a, **k: self))
    stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
    stack.enter_context(mock.patch.object(arguments, "get_device_arch_version", lambda: 9))
    stack.enter_context(mock.patch("megatron.core.fusions.fused_softmax.get_sliding_window_causal_mask",
                                   _window_mask))
    with stack:
        args = parse_and_validate_args()
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world)
        ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     expert_model_parallel_size=args.expert_model_parallel_size,
                                     expert_tensor_parallel_size=args.expert_tensor_parallel_size)
        stack.enter_context(mock.patch.object(mrandom.get_cuda_rng_tracker(), "fork",
                                              lambda *a, **k: contextlib.nullcontext()))
        cfg = gpt_config_from_args(args)
        from megatron.core.process_groups_config import ProcessGroupCollection

        checks = _compare_with_hf2mcore(ckpt, cfg.transformer, get_args())
        models = GPTModelBuilder(cfg).build_distributed_models(ProcessGroupCollection.use_mpu_process_groups(),
                                                                wrap_with_ddp=False)
        with _cpu_factories():
            checkpointing.load_checkpoint(models, None, None, strict=True)
        if mode == "save":
            args = get_args()
            args.save, args.no_save_optim, args.no_save_rng = out_path, True, True
            args.ckpt_format = "torch_dist"
            with _cpu_factories():
                checkpointing.save_checkpoint(1, models, None, None, 0)
            dist.barrier()
            return
        model = models[0]
        ids = torch.load(ids_path)
        s = ids.shape[1]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        model.eval()
        with torch.no_grad():
            logits = model(ids, torch.arange(s)[None], mask).float()
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        logits = gather_from_tensor_model_parallel_region(logits)
        if dist.get_rank() == 0:
            torch.save({"logits": logits, **checks}, out_path)
        dist.barrier()


def _compare_with_hf2mcore(ckpt: Path, config, args) -> dict:
    """Field by field: the TransformerConfig hf2mcore builds from the file against Megatron-LM's, and the args
    hf2mcore saved in the common state against Megatron-LM's parsed namespace."""
    import dataclasses

    from megatron.core import dist_checkpointing

    from converter import layout, megatron_fields
    from converter.model import RUNTIME, transformer_config

    ns = layout.read_args(ckpt)
    ours = transformer_config(ns, **{k: getattr(config, k) for k in RUNTIME})
    fields = [f.name for f in dataclasses.fields(config) if f.name not in RUNTIME]
    config_diff = {f: (repr(getattr(ours, f)), repr(getattr(config, f))) for f in fields
                   if getattr(ours, f) != getattr(config, f) and f not in RUN_ONLY}
    saved = dist_checkpointing.load_common_state_dict(str(layout.find_checkpoint(ckpt)))["args"]
    args_diff = {f.dest: (repr(getattr(saved, f.dest, None)), repr(getattr(args, f.dest, None)))
                 for f in megatron_fields.TABLE if megatron_fields.applies(f, vars(args))
                 and getattr(saved, f.dest, None) != getattr(args, f.dest, None)}
    return {"config_diff": config_diff, "args_diff": args_diff}


# Config fields Megatron-LM sets from run-time arguments that the model's flags do not carry (training options).
RUN_ONLY = {"init_method", "output_layer_init_method", "inference_sampling_seed", "config_logger_dir", "timers",
            "finalize_model_grads_func", "grad_scale_func", "no_sync_func", "grad_sync_func", "param_sync_func",
            "variable_seq_lengths", "moe_token_dispatcher_type", "embedding_init_method", "cp_comm_type",
            "tensor_parallel_num_weight_shards", "expert_tensor_parallel_num_weight_shards"}


def _window_mask(sq, skv, window):
    import torch

    allowed = torch.ones(sq, skv, dtype=torch.bool).triu(skv - sq - window[0]).tril(skv - sq + window[1])
    return ~allowed


@contextlib.contextmanager
def _cpu_factories():
    """Megatron-LM's checkpoint reader makes a few tensors on device='cuda' (the iteration all-reduce): CPU here."""
    import torch

    real = {n: getattr(torch, n) for n in ("tensor", "zeros", "ones", "empty")}

    def cpu(fn):
        def wrapped(*a, **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return fn(*a, **k)
        return wrapped

    with contextlib.ExitStack() as stack:
        for n, fn in real.items():
            stack.enter_context(mock.patch.object(torch, n, cpu(fn)))
        yield


if __name__ == "__main__":
    main()
