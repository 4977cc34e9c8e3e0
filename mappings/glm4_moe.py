"""GLM-4.5 / GLM-4.5-Air: GQA attention with qkv bias (and optional q/k norm) and partial rotary embeddings,
dense-first layers, DeepSeek-V3-style MoE (sigmoid routing with expert bias, shared experts)."""
from .base import MTP_COPIES, Family, L, embeddings, gated_mlp, gqa_attention, mtp, pre_mlp_norm, rule

M = "model.layers.{i}.mlp."
FAMILY = Family(
    name="glm4_moe",
    # the modeling code always routes like DeepSeek-V3's noaux_tc, and attention_bias covers q/k/v only
    architectures={"Glm4MoeForCausalLM": {"scoring_func": "sigmoid", "topk_method": "noaux_tc",
                                          "attention_bias_is_qkv_only": True, "reads_partial_rotary": True}},
    rules=(
        *embeddings(), *gqa_attention(), *pre_mlp_norm(),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        rule(L + "mlp.router.expert_bias", M + "gate.e_score_correction_bias"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}."),
        *gated_mlp(L + "mlp.shared_experts.", M + "shared_experts."),
        *gated_mlp(L + "mlp.", M), *mtp(),
    ),
    copies=MTP_COPIES,
)
