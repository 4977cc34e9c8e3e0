"""The GPTModel (or HybridModel) that Megatron-LM builds from a Megatron-LM namespace (and the --spec hook's settings).

The same path as pretrain_gpt.py (pretrain_hybrid.py): the TransformerConfig from the namespace (megatron_fields),
the layer spec from the hook (megatron_hooks) or else Megatron-LM's default spec, the model with the builder's
arguments. Only run-time settings differ (RUNTIME): hf2mcore builds on the CPU or the meta device, without fused
kernels or dropout.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from . import megatron_fields
from .errors import ConversionError

# TransformerConfig fields hf2mcore sets for its own CPU/meta models where Megatron-LM training takes other
# values; none of them changes a weight's name, shape or the forward pass in eval mode.
RUNTIME: dict[str, Any] = dict(
    use_cpu_initialization=True, perform_initialization=False, hidden_dropout=0.0, attention_dropout=0.0,
    bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
    gradient_accumulation_fusion=False, persist_layer_norm=False, sequence_parallel=False,
    deallocate_pipeline_outputs=True, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
    use_mamba_mem_eff_path=False,  # the fused Mamba path needs causal_conv1d's CUDA kernels
    deterministic_mode=True,  # Gated DeltaNet's PyTorch conv1d and chunked delta rule (fla's are Triton-only)
)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConversionError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def single_process(ns: dict) -> dict:
    """The namespace at TP=PP=EP=1: torch_dist reshards, so one process reads a checkpoint saved at any size."""
    sizes = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
             "expert_tensor_parallel_size")
    return {k: v for k, v in ns.items() if k not in sizes}


def parallel_sizes() -> tuple[int, int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size())


def transformer_config(ns: dict, **overrides):
    """The TransformerConfig (MLATransformerConfig for MLA) Megatron-LM makes from `ns`, with RUNTIME applied."""
    kw = {**megatron_fields.transformer_config_kwargs(ns), **RUNTIME, **overrides}
    if not torch.cuda.is_available():  # alltoall needs CUDA streams; the experts' math is the same
        kw.setdefault("moe_token_dispatcher_type", "allgather")
    try:
        config = megatron_fields.config_class(ns)(**kw)
    except (AssertionError, ValueError) as exc:
        raise ConversionError(f"megatron-core rejects the derived config: {exc}") from exc
    for k, v in megatron_fields.yarn_attributes(ns).items():  # GPTModel reads these attributes; not fields
        setattr(config, k, v)
    return config


class HookConfig:
    """What the --spec hook sees of Megatron-LM's GPTModelConfig: the TransformerConfig's attributes, and GPTModel's
    rope_scaling_factor (which the builder passes on after the hook ran); and the --seq-length that the hook reads
    from Megatron-LM's arguments there."""

    def __init__(self, transformer, training_seq_length: int | None):
        self.transformer = transformer
        self.rope_scaling_factor = 8.0
        self.training_seq_length = training_seq_length

    def __getattr__(self, name):
        return getattr(self.transformer, name)


def layer_spec(ns: dict, settings: dict | None, config, vp_stage: int | None):
    """The spec Megatron-LM's GPTModelBuilder uses: the hook's, or its default for this config. Returns it and the
    rope scaling factor GPTModel then gets."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec

    view = HookConfig(config, ns.get("seq_length"))
    if settings is not None:
        from . import megatron_hooks

        return megatron_hooks.layer_spec(view, vp_stage=vp_stage, settings=settings), view.rope_scaling_factor
    if config.num_moe_experts is not None:
        return get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=config.normalization,
                                          qk_l2_norm=config.qk_l2_norm, vp_stage=vp_stage), 8.0
    return get_gpt_layer_local_spec(config.num_moe_experts, config.moe_grouped_gemm, config.qk_layernorm,
                                    config.multi_latent_attention, normalization=config.normalization), 8.0


def mtp_block_spec(config, vp_stage: int | None):
    """The MTP block Megatron-LM's GPTModelBuilder builds (`mtp_block_spec`, at PP=1): megatron-core's MTP layer
    around the last layer of its default decoder spec. Not the --spec hook's: for MLA the hook redirects this
    call (megatron_hooks), as it does when Megatron-LM makes it."""
    from megatron.core.models.gpt import gpt_layer_specs

    if not config.mtp_num_layers:
        return None
    last = gpt_layer_specs.get_gpt_decoder_layer_specs(config, use_transformer_engine=False,
                                                       normalization=config.normalization,
                                                       qk_l2_norm=config.qk_l2_norm, vp_stage=vp_stage)[-1]
    return gpt_layer_specs.get_gpt_mtp_block_spec(config, last, use_transformer_engine=False, vp_stage=vp_stage)


def build(ns: dict, settings: dict | None, device: str = "meta", *, pre_process: bool | None = None,
          post_process: bool | None = None, vp_stage: int | None = None, **config_overrides):
    """Build this rank's GPTModel (HybridModel for a hybrid layer pattern) for `ns` under the current parallel
    state."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs

    from .runtime import cpu_patches

    config = transformer_config(ns, **config_overrides)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    if ns.get("hybrid_layer_pattern"):
        return _build_hybrid(ns, config, device, pre_process, post_process, vp_stage)
    # the hook's patches are process-wide (llama3 and longrope rope, the output soft-cap, the MLA MTP spec): this
    # process builds others
    scaling, init, gpt_init, mtp = (RotaryEmbedding._apply_scaling, RotaryEmbedding.__init__, GPTModel.__init__,
                                    gpt_layer_specs.get_gpt_mtp_block_spec)
    try:
        spec, factor = layer_spec(ns, settings, config, vp_stage)
        kwargs = {**megatron_fields.gpt_model_kwargs(ns), "rope_scaling_factor": factor}
        # MLA's yarn embedding asks torch.cuda for a device even with use_cpu_initialization.
        with torch.device("cpu" if device == "cpu" else device), cpu_patches():
            model = GPTModel(config=config, transformer_layer_spec=spec, pre_process=pre_process,
                             post_process=post_process, parallel_output=False, vp_stage=vp_stage,
                             mtp_block_spec=mtp_block_spec(config, vp_stage), **kwargs)
    finally:
        RotaryEmbedding._apply_scaling, RotaryEmbedding.__init__, GPTModel.__init__ = scaling, init, gpt_init
        gpt_layer_specs.get_gpt_mtp_block_spec = mtp
    if device != "cpu":  # some buffers (the router's expert_bias) ignore the device context
        model = model.to(device)
    return model


def _build_hybrid(ns, config, device, pre_process, post_process, vp_stage):
    """HybridModel as Megatron-LM's hybrid_builder makes it, with the hook's local stack spec."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    from .runtime import cpu_patches, mamba_kernels

    mamba_kernels()  # before the hook's spec imports megatron-core's Mamba layer
    from . import megatron_hooks

    mixer_log = logging.getLogger("megatron.core.ssm.mamba_mixer")  # warns once a layer about RUNTIME's unfused path
    level = mixer_log.level
    mixer_log.setLevel(logging.ERROR)
    try:
        with torch.device("cpu" if device == "cpu" else device), cpu_patches():
            model = HybridModel(config=config, hybrid_stack_spec=megatron_hooks.hybrid_spec(),
                                pre_process=pre_process, post_process=post_process, parallel_output=False,
                                vp_stage=vp_stage, **megatron_fields.hybrid_model_kwargs(ns))
    finally:
        mixer_log.setLevel(level)
    return model if device == "cpu" else model.to(device)


def mtp_logits(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """fp32 logits [b, s, padded vocab] of each MTP depth k (position i predicts token i + k + 1), as GPTModel's
    forward feeds its MTP block: the output head over each depth's chunk of the block's output."""
    seen = []
    handle = model.mtp.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        mcore_logits(model, ids)
    finally:
        handle.remove()
    chunks = torch.chunk(seen[0], 1 + model.config.mtp_num_layers, dim=0)[1:]
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    with torch.no_grad():
        return [model.output_layer(c, weight=weight)[0].transpose(0, 1).float() for c in chunks]


def mcore_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, padded vocab] on the model's device."""
    s = ids.shape[1]
    from .runtime import causal_mask, check_cpu_kernels, cpu_patches

    device = next(model.parameters()).device
    if device.type == "cpu" and any(type(m).__name__ in ("MambaMixer", "GatedDeltaNet") for m in model.modules()):
        check_cpu_kernels()
    with torch.no_grad(), cpu_patches():
        return model(ids.to(device), torch.arange(s, device=device)[None], causal_mask(s, device)).float()
