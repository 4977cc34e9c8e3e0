"""Megatron-LM itself, as a user runs it, on CPU: the judge of what hf2mcore writes.

    python megatron_lm_judge.py MEGATRON_LM JOBS.json        (one process, or under torchrun for TP/EP > 1)

Each job ({"ckpt", "ids", "out", "extra": [flags], "mode": "forward" | "save"}) takes the flags from
CKPT/megatron_args.sh exactly as written (bash sources it, PYTHONPATH included), parses and validates them with
Megatron-LM's own `parse_and_validate_args`, builds the model the way `pretrain_gpt.py` does
(`gpt_config_from_args` -> `GPTModelBuilder.build_distributed_models`), or for a hybrid layer pattern the way
`pretrain_hybrid.py` does (`hybrid_config_from_args` -> `HybridModelBuilder`), loads CKPT with Megatron-LM's
`checkpointing.load_checkpoint` (`--finetune`, strictness raise_all) and saves to OUT (rank 0) the fp32
full-vocabulary logits of the token ids, with the field-by-field comparisons of `_compare_with_hf2mcore`, or the
error. Mode "save" saves the loaded model again with Megatron-LM's own `save_checkpoint` into the directory OUT.

With a visible GPU (benchmarks/gpu_hybrid.py) it runs there, with nccl and none of the CPU stand-ins.

The jobs share one process (Megatron-LM's imports are most of a run's cost); each starts from fresh global state
(Megatron-LM's `unset_global_variables`, the parallel state, the --spec module). Megatron-LM runs without ModelOpt
installed (its plain GPT path; the import costs seconds). Only CPU stand-ins are added (REFERENCE.md §8), none of
which changes the model; for Mamba layers, hf2mcore's (converter.runtime: mamba_ssm's Triton kernels, interpreted,
the unfused Mamba path, `--disable-mamba-mem-eff-path`, since the fused one needs causal_conv1d's CUDA kernels, and
`--deterministic-mode`, which runs Gated DeltaNet's conv1d and delta rule in PyTorch instead of fla's Triton kernels).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path
from unittest import mock

HOOK = "hf2mcore_spec"


def model_args(ckpt: Path) -> tuple[list[str], list[str]]:
    """MODEL_ARGS of CKPT/megatron_args.sh as bash expands them, and the PYTHONPATH it exports (the --spec hook)."""
    out = subprocess.run(["bash", "-c", 'source "$1" && printf "%s\\0" "${PYTHONPATH:-}" "${MODEL_ARGS[@]}"', "_",
                          str(ckpt / "megatron_args.sh")], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    path, *args = out.stdout.split("\0")[:-1]
    return args, [p for p in path.split(":") if p]


def main() -> None:
    mlm, jobs = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    sys.modules["modelopt"] = None  # a training environment without ModelOpt
    sys.path.insert(0, mlm)
    from converter.imports import interpret_triton_without_gpu

    interpret_triton_without_gpu()
    import torch
    import torch.distributed as dist

    from converter.runtime import mamba_kernels

    mamba_kernels()  # before anything of Megatron-LM's imports megatron-core's Mamba layer
    if "MASTER_PORT" not in os.environ:  # one process: a port no other test's judge holds (the suite runs in parallel)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.training import arguments
    cuda = torch.cuda.is_available()  # the tests hide the GPU; benchmarks/gpu_hybrid.py runs this on one
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    scaling = RotaryEmbedding._apply_scaling  # the --exact hook rebinds it process-wide
    with contextlib.ExitStack() as stack:
        if not cuda:
            _cpu_stand_ins(stack, torch, arguments)
        for job in jobs:
            argv, path = model_args(Path(job["ckpt"]))
            sys.path[:0] = path  # what megatron_args.sh put on PYTHONPATH (the --spec hook)
            try:
                result = run(job, argv)
            except BaseException:  # the job's verdict, not the batch's: the others still run
                result = {"error": traceback.format_exc()[-4000:]}
            finally:
                _reset(path, scaling)
            if job.get("mode", "forward") == "forward" and dist.get_rank() == 0:
                torch.save(result, job["out"])
            elif "error" in result:
                raise SystemExit(result["error"])
            dist.barrier()


def _cpu_stand_ins(stack, torch, arguments) -> None:
    """CPU stand-ins (REFERENCE.md §8): no CUDA device, no fused kernels."""
    from converter.runtime import cpu_patches, window_mask

    stack.enter_context(mock.patch("torch.cuda.current_device", lambda: "cpu"))
    stack.enter_context(mock.patch("torch.cuda.synchronize", lambda *a, **k: None))
    stack.enter_context(mock.patch("torch.cuda.get_rng_state", lambda *a, **k: torch.get_rng_state()))
    stack.enter_context(mock.patch.object(torch.nn.Module, "cuda", lambda self, *a, **k: self))
    stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
    stack.enter_context(mock.patch.object(arguments, "get_device_arch_version", lambda: 9))
    stack.enter_context(mock.patch("megatron.core.fusions.fused_softmax.get_sliding_window_causal_mask",
                                   window_mask))
    stack.enter_context(cpu_patches())  # adds Mamba's Triton stand-ins to the above


def run(job: dict, argv: list[str]) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
    from megatron.training import checkpointing, get_args
    from megatron.training.argument_utils import gpt_config_from_args, hybrid_config_from_args
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.models.gpt import GPTModelBuilder
    from megatron.training.models.hybrid import HybridModelBuilder

    ckpt = Path(job["ckpt"])
    sys.argv = [sys.argv[0], *argv, "--load", str(ckpt), "--finetune", "--no-load-optim",
                "--no-load-rng", "--dist-ckpt-strictness", "raise_all", "--micro-batch-size", "1",
                "--tokenizer-type", "NullTokenizer", "--vocab-size", "8", "--no-gradient-accumulation-fusion",
                "--no-persist-layer-norm", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion",
                # hybrid: the unfused Mamba path, and Gated DeltaNet's PyTorch conv1d and delta rule (as hf2mcore's
                # RUNTIME): the fused and fla paths need CUDA kernels
                *(["--disable-mamba-mem-eff-path", "--deterministic-mode"] if "--hybrid-layer-pattern" in argv else []),
                *job.get("extra", [])]
    with _cpu_factories():  # --use-checkpoint-args reads the tracker as load_checkpoint does
        args = parse_and_validate_args()
    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 expert_model_parallel_size=args.expert_model_parallel_size,
                                 expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    if torch.cuda.is_available():  # what Megatron-LM's initialize does for the model's RNG tracker
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(1234)
        fork = contextlib.nullcontext()
    else:
        fork = mock.patch.object(mrandom.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    with fork:
        hybrid = args.hybrid_layer_pattern is not None
        cfg = (hybrid_config_from_args if hybrid else gpt_config_from_args)(args)
        checks = _compare_with_hf2mcore(ckpt, cfg.transformer, get_args())
        builder = (HybridModelBuilder if hybrid else GPTModelBuilder)(cfg)
        models = builder.build_distributed_models(ProcessGroupCollection.use_mpu_process_groups(), wrap_with_ddp=False)
        with _cpu_factories():
            checkpointing.load_checkpoint(models, None, None, strict=True)
        if job.get("mode") == "save":
            args.save, args.no_save_optim, args.no_save_rng, args.ckpt_format = job["out"], True, True, "torch_dist"
            with _cpu_factories():
                checkpointing.save_checkpoint(1, models, None, None, 0)
            return {}
        model = models[0]
        ids = torch.load(job["ids"]).cuda()  # (Tensor.cuda is the identity on CPU)
        s = ids.shape[1]
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None].cuda()
        model.eval()
        seen = []  # what GPTModel's forward feeds its MTP block's output to: [main; depth 1; ...] hidden states
        hook = model.mtp.register_forward_hook(lambda m, a, out: seen.append(out)) if model.mtp_process else None
        with torch.no_grad():
            logits = model(ids, torch.arange(s)[None].cuda(), mask).float()
            mtp = [gather_from_tensor_model_parallel_region(model.output_layer(
                       h, weight=model.shared_embedding_or_output_weight()
                       if model.share_embeddings_and_output_weights else None)[0]).transpose(0, 1).float()
                   for h in torch.chunk(seen[0], 1 + cfg.transformer.mtp_num_layers, dim=0)[1:]] if seen else []
        if hook is not None:
            hook.remove()
        logits = gather_from_tensor_model_parallel_region(logits)
    dist.barrier()
    return {"logits": logits.cpu(), "mtp_logits": [m.cpu() for m in mtp], **checks,
            "dropout": (args.attention_dropout, args.hidden_dropout)}


def _reset(path: list[str], scaling) -> None:
    """What one job leaves behind that the next must not see."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.training.global_vars import unset_global_variables

    unset_global_variables()
    ps.destroy_model_parallel()
    RotaryEmbedding._apply_scaling = scaling
    for cls in (RotaryEmbedding, GPTModel):  # the hook's rope frequencies, its output soft-cap
        cls.__init__ = getattr(cls.__init__, "hf2mcore_original", cls.__init__)
    mtp = gpt_layer_specs.get_gpt_mtp_block_spec  # the hook's MLA redirect of the MTP spec
    gpt_layer_specs.get_gpt_mtp_block_spec = getattr(mtp, "hf2mcore_original", mtp)
    sys.modules.pop(HOOK, None)
    for p in path:
        sys.path.remove(p)


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


@contextlib.contextmanager
def _cpu_factories():
    """Megatron-LM's checkpoint reader makes a few tensors on device='cuda' (the iteration all-reduce): CPU here."""
    import torch

    if torch.cuda.is_available():
        yield
        return

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
