"""Every Megatron-LM setting hf2mcore writes, known in one place.

A model's Megatron settings are held as Megatron-LM's own argument namespace: argparse destinations and parsed
values (`layernorm_epsilon` for `--norm-epsilon`, `moe_layer_freq` as a list, `window_size` as a tuple). From that
one namespace come, through the table below, all four views that used to be written by hand:

- `flags(ns)`: the command line of `megatron_args.sh`, and `parse_flags(argv)` its inverse;
- `transformer_config(ns)`: the TransformerConfig, the way Megatron-LM's `core_transformer_config_from_args` makes
  it (a destination that names a config field sets it; the same few special cases);
- `gpt_model_kwargs(ns)`: GPTModel's own arguments, the way `gpt_config_from_args` / `GPTModelBuilder` pass them;
- `saved_args(ns)`: the `args` of the common state that `--use-checkpoint-args` and `check_checkpoint_args` read;
- `hf_fields(ns)`: the HF config fields that map one to one (the `hf` column), for `export` without `--like`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConversionError


@dataclass(frozen=True)
class Field:
    flag: str  # Megatron-LM's command-line flag
    dest: str  # its argparse destination: the name in Megatron-LM's namespace and in a checkpoint's saved args
    kind: str = "int"  # int | float | str | true (store_true) | false (store_false) | pattern | pair | pair_list
    default: Any = None  # Megatron-LM's value when the flag is absent
    hf: str | None = None  # the HF config field it equals, where the two map one to one
    only_with: str | None = None  # meaningful only when this destination is set (MoE and MLA settings)


F = Field
TABLE: tuple[Field, ...] = (
    F("--num-layers", "num_layers", hf="num_hidden_layers"),
    F("--hidden-size", "hidden_size", hf="hidden_size"),
    F("--ffn-hidden-size", "ffn_hidden_size", hf="intermediate_size"),
    F("--num-attention-heads", "num_attention_heads", hf="num_attention_heads"),
    F("--kv-channels", "kv_channels", hf="head_dim"),
    F("--group-query-attention", "group_query_attention", "true", False),
    F("--num-query-groups", "num_query_groups", default=1),
    F("--normalization", "normalization", "str", "LayerNorm"),
    F("--norm-epsilon", "layernorm_epsilon", "float", 1e-5, hf="rms_norm_eps"),
    F("--apply-layernorm-1p", "layernorm_zero_centered_gamma", "true", False),
    F("--swiglu", "swiglu", "true", False),
    F("--quick-geglu", "quick_geglu", "true", False),
    F("--squared-relu", "squared_relu", "true", False),
    F("--glu-linear-offset", "glu_linear_offset", "float", 0.0),
    F("--activation-func-clamp-value", "activation_func_clamp_value", "float", hf="swiglu_limit"),
    F("--window-size", "window_size", "pair"),
    F("--window-attn-skip-freq", "window_attn_skip_freq", "pattern"),
    F("--softmax-type", "softmax_type", "str", "vanilla"),
    F("--no-rope-freq", "no_rope_freq", "pattern"),
    F("--qk-l2-norm", "qk_l2_norm", "true", False),
    F("--disable-bias-linear", "add_bias_linear", "false", True),
    F("--add-qkv-bias", "add_qkv_bias", "true", False),
    F("--qk-layernorm", "qk_layernorm", "true", False),
    F("--attention-output-gate", "attention_output_gate", "true", False),
    F("--attention-softmax-in-fp32", "attention_softmax_in_fp32", "true", False),
    F("--attention-dropout", "attention_dropout", "float", 0.1, hf="attention_dropout"),
    F("--hidden-dropout", "hidden_dropout", "float", 0.1),
    F("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights", "true", False),
    F("--position-embedding-type", "position_embedding_type", "str", "learned_absolute"),
    F("--rotary-base", "rotary_base", "int", 10000),
    F("--rotary-percent", "rotary_percent", "float", 1.0),
    F("--rotary-interleaved", "rotary_interleaved", "true", False),
    F("--rotary-seq-len-interpolation-factor", "rotary_seq_len_interpolation_factor"),
    F("--use-rope-scaling", "use_rope_scaling", "true", False),
    F("--rope-scaling-factor", "rope_scaling_factor", "float", 8.0),
    F("--rope-type", "rope_type", "str"),
    F("--rotary-scaling-factor", "rotary_scaling_factor", "float", 1.0),
    F("--yarn-original-max-position-embeddings", "yarn_original_max_position_embeddings", "int"),
    F("--yarn-beta-fast", "yarn_beta_fast", "float"),
    F("--yarn-beta-slow", "yarn_beta_slow", "float"),
    F("--no-yarn-correction-range-round-to-int", "yarn_correction_range_round_to_int", "false"),
    F("--mscale", "mscale", "float", 1.0),
    F("--mscale-all-dim", "mscale_all_dim", "float", 0.0),
    F("--max-position-embeddings", "max_position_embeddings", hf="max_position_embeddings"),
    F("--seq-length", "seq_length"),
    F("--multi-latent-attention", "multi_latent_attention", "true", False),
    F("--q-lora-rank", "q_lora_rank", hf="q_lora_rank", only_with="multi_latent_attention"),
    F("--kv-lora-rank", "kv_lora_rank", default=32, hf="kv_lora_rank", only_with="multi_latent_attention"),
    F("--qk-head-dim", "qk_head_dim", default=128, hf="qk_nope_head_dim", only_with="multi_latent_attention"),
    F("--qk-pos-emb-head-dim", "qk_pos_emb_head_dim", default=64, hf="qk_rope_head_dim", only_with="multi_latent_attention"),
    F("--v-head-dim", "v_head_dim", default=128, hf="v_head_dim", only_with="multi_latent_attention"),
    F("--num-experts", "num_experts"),
    F("--moe-ffn-hidden-size", "moe_ffn_hidden_size", only_with="num_experts"),
    F("--moe-router-topk", "moe_router_topk", default=2, hf="num_experts_per_tok", only_with="num_experts"),
    F("--moe-layer-freq", "moe_layer_freq", "pattern", 1, only_with="num_experts"),
    F("--moe-shared-expert-intermediate-size", "moe_shared_expert_intermediate_size", only_with="num_experts"),
    F("--moe-shared-expert-gate", "moe_shared_expert_gate", "true", False, only_with="num_experts"),
    F("--moe-apply-probs-on-input", "moe_apply_probs_on_input", "true", False, only_with="num_experts"),
    F("--moe-router-score-function", "moe_router_score_function", "str", "softmax", only_with="num_experts"),
    F("--moe-router-pre-softmax", "moe_router_pre_softmax", "true", False, only_with="num_experts"),
    F("--moe-router-enable-expert-bias", "moe_router_enable_expert_bias", "true", False, only_with="num_experts"),
    F("--moe-router-num-groups", "moe_router_num_groups", hf="n_group", only_with="num_experts"),
    F("--moe-router-group-topk", "moe_router_group_topk", hf="topk_group", only_with="num_experts"),
    F("--moe-router-topk-scaling-factor", "moe_router_topk_scaling_factor", "float", hf="routed_scaling_factor", only_with="num_experts"),
    F("--moe-router-dtype", "moe_router_dtype", "str", only_with="num_experts"),
    F("--mtp-num-layers", "mtp_num_layers", hf="num_nextn_predict_layers"),
    F("--hybrid-layer-pattern", "hybrid_layer_pattern", "str", hf="hybrid_override_pattern"),
    F("--mamba-state-dim", "mamba_state_dim", default=128, hf="ssm_state_size", only_with="hybrid_layer_pattern"),
    F("--mamba-head-dim", "mamba_head_dim", default=64, hf="mamba_head_dim", only_with="hybrid_layer_pattern"),
    F("--mamba-num-groups", "mamba_num_groups", default=8, hf="n_groups", only_with="hybrid_layer_pattern"),
    F("--mamba-num-heads", "mamba_num_heads", hf="mamba_num_heads", only_with="hybrid_layer_pattern"),
    F("--linear-conv-kernel-dim", "linear_conv_kernel_dim", default=4, hf="linear_conv_kernel_dim",
      only_with="hybrid_layer_pattern"),
    F("--linear-key-head-dim", "linear_key_head_dim", default=128, hf="linear_key_head_dim",
      only_with="hybrid_layer_pattern"),
    F("--linear-value-head-dim", "linear_value_head_dim", default=128, hf="linear_value_head_dim",
      only_with="hybrid_layer_pattern"),
    F("--linear-num-key-heads", "linear_num_key_heads", default=16, hf="linear_num_key_heads",
      only_with="hybrid_layer_pattern"),
    F("--linear-num-value-heads", "linear_num_value_heads", default=32, hf="linear_num_value_heads",
      only_with="hybrid_layer_pattern"),
    F("--padded-vocab-size", "padded_vocab_size", hf="vocab_size"),
    F("--make-vocab-size-divisible-by", "make_vocab_size_divisible_by", default=128),
    F("--tensor-model-parallel-size", "tensor_model_parallel_size", default=1),
    F("--pipeline-model-parallel-size", "pipeline_model_parallel_size", default=1),
    F("--expert-model-parallel-size", "expert_model_parallel_size", default=1, only_with="num_experts"),
    F("--expert-tensor-parallel-size", "expert_tensor_parallel_size", only_with="num_experts"),
    F("--bf16", "bf16", "true", False),
    F("--fp16", "fp16", "true", False),
    F("--transformer-impl", "transformer_impl", "str", "transformer_engine"),
    F("--spec", "spec", "pair_list"),
)
BY_DEST = {f.dest: f for f in TABLE}
# Megatron-LM's namespace-to-config special cases (core_transformer_config_from_args): destinations whose config
# field has another name or is made from several of them.
_NOT_CONFIG = {"swiglu", "quick_geglu", "group_query_attention", "num_query_groups", "num_experts"}


def namespace(**values) -> dict[str, Any]:
    """A namespace of known destinations (a misspelt one is an error here, not a silent default in Megatron-LM)."""
    odd = sorted(set(values) - set(BY_DEST))
    if odd:
        raise ConversionError(f"internal: not Megatron-LM arguments hf2mcore knows: {odd}")
    return values


def value(ns: dict, dest: str) -> Any:
    """The value Megatron-LM has for `dest`: the namespace's, else Megatron-LM's default."""
    return ns[dest] if dest in ns else BY_DEST[dest].default


# ---- flags -------------------------------------------------------------------------------------------------
def _format(f: Field, v: Any) -> list[str]:
    if f.kind == "true":
        return [f.flag] if v else []
    if f.kind == "false":
        return [f.flag] if v is False else []
    if f.kind == "pattern" and isinstance(v, (list, tuple)):
        return [f.flag, "[" + ",".join(map(str, v)) + "]"]
    if f.kind == "pair":
        return [f.flag, ",".join(map(str, v))]
    if f.kind == "pair_list":
        return [f.flag, *v]
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # 500000.0 as 500000; Megatron-LM's float type reads it back the same
    return [f.flag, str(v)]


def flags(ns: dict) -> list[str]:
    """Megatron-LM's command line for `ns`, in table order; flags equal to Megatron-LM's defaults are written
    too when set explicitly (they document the model), except store_true flags that are off."""
    return [part for f in TABLE if f.dest in ns and ns[f.dest] is not None for part in _format(f, ns[f.dest])]


MAX_PATTERN = 100_000  # a file from elsewhere must not make hf2mcore build a list of 10**12 layers


def _pattern(x: str) -> int | list[int]:
    """Megatron-LM's moe_freq_type / no_rope_freq_type: an int, or a Python list expression of 0/1 such as
    `([0]+[1]*3)*2`, evaluated here without eval: only lists, whole numbers, + and *, at most MAX_PATTERN long."""
    x = x.strip()
    if "[" not in x:
        return int(x)
    try:
        layers = _pattern_value(ast.parse(x, mode="eval").body)
    except (SyntaxError, ValueError, TypeError) as exc:
        raise ConversionError(f"cannot read layer pattern {x!r}: {exc}") from None
    if not isinstance(layers, list):
        raise ConversionError(f"layer pattern {x!r} is not a list")
    return layers


def _pattern_value(node):
    if isinstance(node, ast.Constant) and type(node.value) is int and 0 <= node.value <= MAX_PATTERN:
        return node.value
    if isinstance(node, ast.List):
        return [_pattern_value(e) for e in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        add = isinstance(node.op, ast.Add)
        left, right = _pattern_value(node.left), _pattern_value(node.right)
        if not add and isinstance(right, list):
            left, right = right, left
        if not (isinstance(left, list) and isinstance(right, list if add else int)
                and (len(left) + len(right) if add else len(left) * right) <= MAX_PATTERN):
            raise ValueError(f"only lists joined with + or repeated with * (at most {MAX_PATTERN} entries)")
        return left + right if add else left * right
    raise ValueError(f"only lists, whole numbers up to {MAX_PATTERN}, + and * are allowed")


def parser() -> argparse.ArgumentParser:
    """An argparse parser for the table's flags, with Megatron-LM's destinations and types."""
    p = argparse.ArgumentParser(prog="megatron_args.sh", add_help=False, allow_abbrev=False, exit_on_error=False)
    types = {"int": int, "float": float, "str": str, "pattern": _pattern,
             "pair": lambda x: tuple(int(i) for i in x.strip("()").split(","))}
    for f in TABLE:
        if f.kind == "true":
            p.add_argument(f.flag, dest=f.dest, action="store_true", default=argparse.SUPPRESS)
        elif f.kind == "false":
            p.add_argument(f.flag, dest=f.dest, action="store_false", default=argparse.SUPPRESS)
        elif f.kind == "pair_list":
            p.add_argument(f.flag, dest=f.dest, nargs=2, default=argparse.SUPPRESS)
        else:
            p.add_argument(f.flag, dest=f.dest, type=types[f.kind], default=argparse.SUPPRESS)
    return p


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """The namespace a command line sets (only what it sets): the inverse of `flags`. A flag the table does not
    know is an error naming it."""
    try:
        ns, rest = parser().parse_known_args(argv)
    except (argparse.ArgumentError, ValueError) as exc:
        raise ConversionError(f"cannot read the Megatron-LM flags: {exc}") from None
    if rest:
        raise ConversionError(f"Megatron-LM flags hf2mcore does not model: {' '.join(rest[:6])}")
    return vars(ns)


# ---- TransformerConfig and GPTModel ------------------------------------------------------------------------
def config_class(ns: dict):
    from megatron.core.transformer import MLATransformerConfig, TransformerConfig

    return MLATransformerConfig if value(ns, "multi_latent_attention") else TransformerConfig


def transformer_config_kwargs(ns: dict) -> dict[str, Any]:
    """What Megatron-LM's core_transformer_config_from_args gives the config for this namespace (the model part;
    run-time settings such as fusions and initialisation are the caller's)."""
    import torch.nn.functional as F

    names = {f.name for f in dataclasses.fields(config_class(ns))}
    # every destination, set or defaulted, as Megatron-LM's namespace has them all (e.g. q_lora_rank None, where
    # MLATransformerConfig's own default is 512)
    kw = {f.dest: value(ns, f.dest) for f in TABLE if f.dest in names and f.dest not in _NOT_CONFIG}
    kw["num_moe_experts"] = ns.get("num_experts")
    kw["num_query_groups"] = ns.get("num_query_groups") if ns.get("group_query_attention") else None
    if ns.get("swiglu"):
        kw.update(activation_func=F.silu, gated_linear_unit=True)
    elif ns.get("quick_geglu"):
        from megatron.core.fusions.fused_bias_geglu import quick_gelu

        kw.update(activation_func=quick_gelu, gated_linear_unit=True)
    elif ns.get("squared_relu"):
        from megatron.core.activations import squared_relu

        kw["activation_func"] = squared_relu
    if ns.get("hybrid_layer_pattern"):
        kw["is_hybrid_model"] = True
    if ns.get("rope_type") is None:
        kw.pop("rope_type", None)
    for d in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        kw.setdefault(d, BY_DEST[d].default)
    kw.setdefault("expert_tensor_parallel_size", kw["tensor_model_parallel_size"])
    dtype = params_dtype(ns)
    kw.update(params_dtype=dtype, pipeline_dtype=dtype)
    return kw


def yarn_attributes(ns: dict) -> dict[str, Any]:
    """The `yarn_*` attributes Megatron-LM sets on a non-MLA config for yarn rope (_apply_yarn_config_from_args)."""
    if value(ns, "position_embedding_type") != "yarn" or value(ns, "multi_latent_attention"):
        return {}
    pick = {"rotary_scaling_factor": "rotary_scaling_factor", "original_max_position_embeddings":
            "yarn_original_max_position_embeddings", "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow",
            "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
            "correction_range_round_to_int": "yarn_correction_range_round_to_int"}
    # what Megatron-LM puts in place of a flag left unset (None), for each of them: an unset
    # --yarn-correction-range-round-to-int (truncate, HF's default) is True there
    fallback = {"rotary_scaling_factor": 1.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0, "correction_range_round_to_int": True}
    out = {}
    for attr, dest in pick.items():
        v = value(ns, dest)
        out["yarn_" + attr] = v if v is not None else fallback[attr]
    return out


def gpt_model_kwargs(ns: dict) -> dict[str, Any]:
    """GPTModel's own arguments, as pretrain_gpt.py's GPTModelBuilder passes them (gpt_config_from_args): note
    that it never passes --rope-scaling-factor (GPTModelConfig keeps 8.0)."""
    return dict(vocab_size=ns["padded_vocab_size"], max_sequence_length=ns["max_position_embeddings"],
                share_embeddings_and_output_weights=not value(ns, "untie_embeddings_and_output_weights"),
                position_embedding_type=value(ns, "position_embedding_type"),
                rotary_percent=value(ns, "rotary_percent"), rotary_base=value(ns, "rotary_base"),
                rope_scaling=value(ns, "use_rope_scaling"), rope_scaling_factor=8.0,
                seq_len_interpolation_factor=value(ns, "rotary_seq_len_interpolation_factor"))


def hybrid_model_kwargs(ns: dict) -> dict[str, Any]:
    """HybridModel's own arguments, as Megatron-LM's hybrid_builder (pretrain_hybrid.py) passes them."""
    return dict(vocab_size=ns["padded_vocab_size"], max_sequence_length=ns["max_position_embeddings"],
                hybrid_layer_pattern=ns["hybrid_layer_pattern"],
                share_embeddings_and_output_weights=not value(ns, "untie_embeddings_and_output_weights"),
                position_embedding_type=value(ns, "position_embedding_type"),
                rotary_percent=value(ns, "rotary_percent"), rotary_base=value(ns, "rotary_base"),
                seq_len_interpolation_factor=value(ns, "rotary_seq_len_interpolation_factor"))


def params_dtype(ns: dict) -> torch.dtype:
    return torch.bfloat16 if ns.get("bf16") else torch.float16 if ns.get("fp16") else torch.float32


# ---- the common state's args ----------------------------------------------------------------------------
def saved_args(ns: dict) -> argparse.Namespace:
    """The `args` a checkpoint's common state carries, as Megatron-LM's save_checkpoint writes them: its parsed
    destinations and types (what --use-checkpoint-args copies back), plus the few run facts loading reads."""
    args = argparse.Namespace(**{f.dest: value(ns, f.dest) for f in TABLE})
    args.expert_tensor_parallel_size = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    args.params_dtype = params_dtype(ns)
    args.virtual_pipeline_model_parallel_size = None
    args.no_save_rng = args.no_save_optim = True
    args.ckpt_format, args.use_dist_ckpt = "torch_dist", True
    args.iteration, args.consumed_train_samples, args.consumed_valid_samples = 0, 0, 0
    return args


# The destinations that decide which tensors a model has and their shapes: a checkpoint and an HF config describe
# the same weights only where these agree.
SHAPES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "group_query_attention",
          "num_query_groups", "normalization", "swiglu", "quick_geglu", "squared_relu", "add_bias_linear",
          "add_qkv_bias", "qk_layernorm", "untie_embeddings_and_output_weights", "softmax_type",
          "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
          "num_experts", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
          "moe_shared_expert_gate", "moe_router_enable_expert_bias", "mtp_num_layers", "hybrid_layer_pattern",
          "mamba_state_dim", "mamba_head_dim", "mamba_num_groups", "mamba_num_heads", "attention_output_gate",
          "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
          "linear_num_value_heads")


def shape_differences(a: dict, b: dict) -> list[str]:
    """Where two namespaces describe different weights, as 'flag: a vs b'."""
    def norm(ns, d):
        v = value(ns, d) if applies(BY_DEST[d], ns) else None
        if d == "moe_layer_freq" and isinstance(v, int):  # N: one MoE layer every N
            v = [int(i % v == 0) for i in range(ns["num_layers"])]
        if d == "num_query_groups" and not value(ns, "group_query_attention"):
            v = None
        return v
    return [f"{BY_DEST[d].flag} {norm(a, d)} vs {norm(b, d)}" for d in SHAPES if norm(a, d) != norm(b, d)]


def applies(f: Field, ns: dict) -> bool:
    return f.only_with is None or bool(ns.get(f.only_with))


def from_saved_args(args) -> dict[str, Any]:
    """The namespace of a checkpoint's saved args (written by hf2mcore or by Megatron-LM training, which saves
    every destination: MoE and MLA settings count only when the model has them)."""
    ns = {f.dest: getattr(args, f.dest) for f in TABLE if getattr(args, f.dest, None) is not None}
    ns = {d: v for d, v in ns.items() if applies(BY_DEST[d], ns)}
    if "params_dtype" in vars(args) and args.params_dtype in (torch.bfloat16, torch.float16):
        ns["bf16" if args.params_dtype == torch.bfloat16 else "fp16"] = True
    return ns


def hf_fields(ns: dict) -> dict[str, Any]:
    """The HF config fields that equal a Megatron-LM value one to one."""
    return {f.hf: value(ns, f.dest) for f in TABLE if f.hf and applies(f, ns) and value(ns, f.dest) is not None}
