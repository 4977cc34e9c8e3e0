"""Qwen3-MoE and Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Llama attention, MoE layers with per-expert
gate/up/down; Qwen2-MoE adds a shared expert scaled by its sigmoid gate."""
from .base import Family, L, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, rule

M = "model.layers.{i}.mlp."
FAMILY = Family(
    name="qwen_moe",
    # (Qwen2-MoE's modeling code always gates its shared expert: no config field says so)
    architectures={"Qwen3MoeForCausalLM": {"qk_layernorm": True, "reads_sliding_window": True},
                   "Qwen2MoeForCausalLM": {"shared_expert_gate": True, "reads_sliding_window": True}},
    rules=(
        *embeddings(), *gqa_attention(), *pre_mlp_norm(),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}."),
        *gated_mlp(L + "mlp.shared_experts.", M + "shared_expert."),
        rule(L + "mlp.shared_experts.gate_weight", M + "shared_expert_gate.weight"),
        # layers listed in mlp_only_layers are dense
        *gated_mlp(L + "mlp.", M),
    ),
)
