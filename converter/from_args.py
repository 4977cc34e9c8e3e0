"""Megatron-LM arguments -> an HF config.json: how `export` describes a checkpoint that Megatron-LM training wrote
(its common state keeps the `args` namespace but no HF config) when no `--like` directory is given.

Covers the layouts whose HF class follows from the flags alone: Llama (and Mistral, which shares its layout),
Qwen2 (qkv bias), Qwen3 (q/k norm), Mixtral and Qwen3-MoE. Anything else is refused by flag name.
"""
from __future__ import annotations

from .errors import ConversionError


def _get(args, name, default=None):
    return getattr(args, name, default)


def hf_config_from_args(args) -> dict:
    """The HF config of the model these Megatron-LM flags describe."""
    refuse = {
        "multi_latent_attention": "multi-latent attention",
        "moe_shared_expert_intermediate_size": "shared experts",
        "add_bias_linear": "linear-layer biases",
    }
    for flag, what in refuse.items():
        if _get(args, flag):
            raise ConversionError(f"--{flag.replace('_', '-')} ({what}): cannot name the HF architecture from the "
                                  "checkpoint's arguments alone; pass --like HF_DIR")
    if _get(args, "normalization", "RMSNorm") != "RMSNorm" or not _get(args, "swiglu", False):
        raise ConversionError("only RMSNorm + SwiGLU models can be described from their arguments; pass --like HF_DIR")
    if _get(args, "position_embedding_type", "rope") != "rope":
        raise ConversionError(f"--position-embedding-type {args.position_embedding_type}: pass --like HF_DIR")
    heads = args.num_attention_heads
    moe = bool(_get(args, "num_experts"))
    qk_norm, qkv_bias = bool(_get(args, "qk_layernorm")), bool(_get(args, "add_qkv_bias"))
    if moe and qkv_bias:
        raise ConversionError("a MoE model with qkv biases: pass --like HF_DIR")
    arch, model_type = (("Qwen3MoeForCausalLM", "qwen3_moe") if moe and qk_norm else
                        ("MixtralForCausalLM", "mixtral") if moe else
                        ("Qwen3ForCausalLM", "qwen3") if qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if qkv_bias else ("LlamaForCausalLM", "llama"))
    cfg = {
        "architectures": [arch], "model_type": model_type,
        "num_hidden_layers": args.num_layers, "hidden_size": args.hidden_size,
        "intermediate_size": args.ffn_hidden_size, "num_attention_heads": heads,
        "num_key_value_heads": args.num_query_groups if _get(args, "group_query_attention") else heads,
        "head_dim": _get(args, "kv_channels") or args.hidden_size // heads,
        "rms_norm_eps": _get(args, "norm_epsilon", 1e-5), "hidden_act": "silu",
        "vocab_size": args.padded_vocab_size,  # padding rows (if any) come along: the tokenizer is not recorded
        "max_position_embeddings": _get(args, "max_position_embeddings") or _get(args, "seq_length"),
        "tie_word_embeddings": not _get(args, "untie_embeddings_and_output_weights", False),
        "rope_theta": float(_get(args, "rotary_base", 10000)),
    }
    if _get(args, "use_rope_scaling"):  # megatron-core's llama3 scaling constants
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(_get(args, "rope_scaling_factor", 8.0)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    if moe:
        pattern = _get(args, "moe_layer_freq", 1)
        pattern = [1] * args.num_layers if pattern == 1 else list(pattern)
        topk_norm = not _get(args, "moe_router_pre_softmax", False)
        if _get(args, "moe_router_score_function", "softmax") != "softmax":
            raise ConversionError("--moe-router-score-function other than softmax: pass --like HF_DIR")
        if model_type == "mixtral":
            if not all(pattern) or not topk_norm:
                raise ConversionError("dense layers or unnormalised top-k in a Mixtral-style model: pass --like HF_DIR")
            cfg.update(num_local_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                       intermediate_size=_get(args, "moe_ffn_hidden_size") or args.ffn_hidden_size)
        else:
            cfg.update(num_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
                       moe_intermediate_size=_get(args, "moe_ffn_hidden_size") or args.ffn_hidden_size,
                       norm_topk_prob=topk_norm, decoder_sparse_step=1,
                       mlp_only_layers=[i for i, m in enumerate(pattern) if not m])
    dtype = _get(args, "params_dtype")
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else (
        "bfloat16" if _get(args, "bf16") else "float16" if _get(args, "fp16") else "float32")
    return cfg
