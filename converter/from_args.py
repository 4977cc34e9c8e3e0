"""Megatron-LM arguments -> an HF config.json: how `export` describes a checkpoint that Megatron-LM training wrote
(its common state keeps the `args` namespace but no HF config) when no `--like` directory is given.

The namespace is read through megatron_fields (Megatron-LM's destinations: `layernorm_epsilon`, `moe_layer_freq`
as parsed); the one-to-one fields come from its `hf` column. Covers the layouts whose HF class follows from the
flags alone: Llama (and Mistral, which shares its layout), Qwen2 (qkv bias), Qwen3 (q/k norm), Mixtral and
Qwen3-MoE, and hybrid layer patterns as Nemotron-H / Nemotron 3. Anything else is refused by flag name.
"""
from __future__ import annotations

from .errors import ConversionError
from .megatron_fields import BY_DEST, hf_fields, params_dtype, value


def hf_config_from_args(ns: dict) -> dict:
    """The HF config of the model this Megatron-LM namespace describes."""
    if value(ns, "hybrid_layer_pattern"):
        return _nemotron_h(ns)
    refuse = {"multi_latent_attention": "multi-latent attention",
              "moe_shared_expert_intermediate_size": "shared experts", "add_bias_linear": "linear-layer biases",
              "window_size": "sliding-window attention", "qk_l2_norm": "q/k L2 norm", "no_rope_freq": "NoPE layers",
              "quick_geglu": "the clamped GLU", "moe_router_enable_expert_bias": "expert bias",
              "mtp_num_layers": "multi-token prediction",
              # (--exact's fixes: longrope, llama3 constants, ... live in the hook's settings, not the arguments)
              "spec": "a --spec hook, whose settings the arguments do not carry"}
    for dest, what in refuse.items():
        if value(ns, dest) not in (None, False):
            raise ConversionError(f"{BY_DEST[dest].flag} ({what}): cannot name the HF architecture from the "
                                  "checkpoint's arguments alone; pass --like HF_DIR")
    if value(ns, "normalization") != "RMSNorm" or not value(ns, "swiglu"):
        raise ConversionError("only RMSNorm + SwiGLU models can be described from their arguments; pass --like HF_DIR")
    if value(ns, "position_embedding_type") != "rope":
        raise ConversionError(f"--position-embedding-type {value(ns, 'position_embedding_type')}: pass --like HF_DIR")
    moe = bool(value(ns, "num_experts"))
    qk_norm, qkv_bias = value(ns, "qk_layernorm"), value(ns, "add_qkv_bias")
    if moe and qkv_bias:
        raise ConversionError("a MoE model with qkv biases: pass --like HF_DIR")
    arch, model_type = (("Qwen3MoeForCausalLM", "qwen3_moe") if moe and qk_norm else
                        ("MixtralForCausalLM", "mixtral") if moe else
                        ("Qwen3ForCausalLM", "qwen3") if qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if qkv_bias else ("LlamaForCausalLM", "llama"))
    heads = ns["num_attention_heads"]
    cfg = {"architectures": [arch], "model_type": model_type, **hf_fields(ns), "hidden_act": "silu",
           # the padded rows (if any) come along: the tokenizer is not recorded
           "num_key_value_heads": value(ns, "num_query_groups") if value(ns, "group_query_attention") else heads,
           "head_dim": value(ns, "kv_channels") or ns["hidden_size"] // heads,
           "max_position_embeddings": value(ns, "max_position_embeddings") or value(ns, "seq_length"),
           "tie_word_embeddings": not value(ns, "untie_embeddings_and_output_weights"),
           "rope_theta": float(value(ns, "rotary_base"))}
    if value(ns, "use_rope_scaling"):  # megatron-core's llama3 scaling constants
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": float(value(ns, "rope_scaling_factor")),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    if value(ns, "rotary_seq_len_interpolation_factor"):  # positions divided by the factor
        if value(ns, "use_rope_scaling"):
            raise ConversionError("--use-rope-scaling with --rotary-seq-len-interpolation-factor: no HF rope_scaling "
                                  "has both; pass --like HF_DIR")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(value(ns, "rotary_seq_len_interpolation_factor"))}
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False
    if moe:
        freq = value(ns, "moe_layer_freq")
        pattern = [int(i % freq == 0) for i in range(ns["num_layers"])] if isinstance(freq, int) else list(freq)
        topk_norm = not value(ns, "moe_router_pre_softmax")
        if value(ns, "moe_router_score_function") != "softmax":
            raise ConversionError("--moe-router-score-function other than softmax: pass --like HF_DIR")
        experts, ffn = ns["num_experts"], value(ns, "moe_ffn_hidden_size") or ns["ffn_hidden_size"]
        if model_type == "mixtral":
            if not all(pattern) or not topk_norm:
                raise ConversionError("dense layers or unnormalised top-k in a Mixtral-style model: pass --like HF_DIR")
            cfg.update(num_local_experts=experts, intermediate_size=ffn)
        else:
            cfg.update(num_experts=experts, moe_intermediate_size=ffn, norm_topk_prob=topk_norm,
                       decoder_sparse_step=1, mlp_only_layers=[i for i, m in enumerate(pattern) if not m])
    cfg["torch_dtype"] = str(params_dtype(ns)).removeprefix("torch.")
    return cfg


def _nemotron_h(ns: dict) -> dict:
    """A hybrid layer pattern with squared-ReLU MLPs and no position embedding is Nemotron-H's layout (Nemotron 3:
    with E layers of sigmoid-routed experts, their score-correction bias and a shared expert)."""
    need = {"squared_relu": True, "normalization": "RMSNorm", "position_embedding_type": "none",
            "add_bias_linear": False, "add_qkv_bias": False, "qk_layernorm": False, "multi_latent_attention": False,
            "mtp_num_layers": None}
    odd = [f"{BY_DEST[d].flag} {value(ns, d)}" for d, want in need.items() if value(ns, d) != want]
    if odd:
        raise ConversionError(f"a hybrid model with {', '.join(odd)}: not Nemotron-H's layout; pass --like HF_DIR")
    pattern, heads = ns["hybrid_layer_pattern"], ns["num_attention_heads"]
    fields = hf_fields(ns)
    cfg = {"architectures": ["NemotronHForCausalLM"], "model_type": "nemotron_h", **fields,
           "num_hidden_layers": len(pattern), "layer_norm_epsilon": fields.pop("rms_norm_eps"),
           "num_key_value_heads": value(ns, "num_query_groups") if value(ns, "group_query_attention") else heads,
           "head_dim": value(ns, "kv_channels") or ns["hidden_size"] // heads, "mlp_hidden_act": "relu2",
           "tie_word_embeddings": not value(ns, "untie_embeddings_and_output_weights"),
           "max_position_embeddings": value(ns, "max_position_embeddings") or value(ns, "seq_length")}
    if "E" in pattern:
        if value(ns, "moe_router_score_function") != "sigmoid" or not value(ns, "moe_router_enable_expert_bias"):
            raise ConversionError("hybrid MoE layers without sigmoid routing and expert bias: pass --like HF_DIR")
        cfg.update(n_routed_experts=ns["num_experts"], moe_intermediate_size=value(ns, "moe_ffn_hidden_size"),
                   moe_shared_expert_intermediate_size=value(ns, "moe_shared_expert_intermediate_size"),
                   norm_topk_prob=True, routed_scaling_factor=value(ns, "moe_router_topk_scaling_factor") or 1.0,
                   n_group=value(ns, "moe_router_num_groups") or 1, topk_group=value(ns, "moe_router_group_topk") or 1)
    cfg["torch_dtype"] = str(params_dtype(ns)).removeprefix("torch.")
    return cfg
