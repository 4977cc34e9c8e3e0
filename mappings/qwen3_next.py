"""Qwen3-Next: Gated DeltaNet and gated attention, each followed by a MoE (or MLP) layer, on megatron-core's
HybridModel. Each HF layer is two Megatron layers (`G` or `*`, then `E` or `-`: plan.py numbers the rules by HF
layer). Norms scale by 1 + weight (--apply-layernorm-1p), the DeltaNet's output norm by its weight."""
from converter.transforms import DELTA_IN_PROJ, GATED_QKV

from .base import Family, L, gated_mlp, rule

H, A, M = "model.layers.{i}.", "model.layers.{i}.linear_attn.", "model.layers.{i}.mlp."
S = L + "self_attention."
FAMILY = Family(
    name="qwen3_next",
    architectures={"Qwen3NextForCausalLM": {"hybrid": "qwen3_next", "hf_layer_span": 2, "qk_layernorm": True,
                                            "attention_output_gate": True, "zero_centered_norm": True,
                                            "shared_expert_gate": True, "reads_partial_rotary": True}},
    # releases carry a multi-token-prediction module that transformers does not load either (derive warns)
    ignore=(r".*rotary_emb\.inv_freq", r"mtp\..*"),
    rules=(
        rule("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
        rule("output_layer.weight", "lm_head.weight"),
        rule("decoder.final_norm.weight", "model.norm.weight"),
        rule(L + "input_layernorm.weight", H + "input_layernorm.weight"),
        rule(S + "in_proj.weight", A + "in_proj_qkvz.weight", A + "in_proj_ba.weight", transform=DELTA_IN_PROJ),
        *(rule(S + mc, A + hf) for mc, hf in (("conv1d.weight", "conv1d.weight"), ("dt_bias", "dt_bias"),
                                              ("A_log", "A_log"), ("out_norm.weight", "norm.weight"),
                                              ("out_proj.weight", "out_proj.weight"))),
        rule(S + "linear_qkv.weight", *(H + f"self_attn.{p}_proj.weight" for p in "qkv"), transform=GATED_QKV),
        rule(S + "q_layernorm.weight", H + "self_attn.q_norm.weight"),
        rule(S + "k_layernorm.weight", H + "self_attn.k_norm.weight"),
        rule(S + "linear_proj.weight", H + "self_attn.o_proj.weight"),
        rule(L + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}."),
        *gated_mlp(L + "mlp.shared_experts.", M + "shared_expert."),
        rule(L + "mlp.shared_experts.gate_weight", M + "shared_expert_gate.weight"),
        *gated_mlp(L + "mlp.", M),  # mlp_only_layers
    ),
)
