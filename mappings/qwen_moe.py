"""Qwen3-MoE: Llama attention, MoE layers with per-expert gate/up/down."""
from .base import Family, L, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, rule

M = "model.layers.{i}.mlp."
FAMILY = Family(
    name="qwen_moe",
    architectures={"Qwen3MoeForCausalLM": {"qk_layernorm": True}},
    rules=(
        *embeddings(), *gqa_attention(), *pre_mlp_norm(),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}."),
        # layers listed in mlp_only_layers are dense
        *gated_mlp(L + "mlp.", M),
    ),
)
