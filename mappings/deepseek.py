"""DeepSeek-V2/V3, Kimi-K2: multi-latent attention (renames only), dense-first layers, routed + shared experts."""
from .base import MTP_COPIES, Family, L, embeddings, gated_mlp, mtp, pre_mlp_norm, rule

A, M = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
S = L + "self_attention."
FAMILY = Family(
    name="deepseek",
    # MLA always normalises the compressed q and kv (q_a_layernorm, kv_a_layernorm); transformers' DeepSeek-V2
    # router never renormalises its top-k, whatever norm_topk_prob says
    architectures={"DeepseekV2ForCausalLM": {"qk_layernorm": True, "norm_topk_prob": False},
                   "DeepseekV3ForCausalLM": {"qk_layernorm": True}},
    rules=(
        *embeddings(), *pre_mlp_norm(),
        rule(L + "input_layernorm.weight", "model.layers.{i}.input_layernorm.weight"),
        rule(S + "linear_q_proj.weight", A + "q_proj.weight"),
        rule(S + "linear_q_down_proj.weight", A + "q_a_proj.weight"),
        rule(S + "q_layernorm.weight", A + "q_a_layernorm.weight"),
        rule(S + "linear_q_up_proj.weight", A + "q_b_proj.weight"),
        rule(S + "linear_kv_down_proj.weight", A + "kv_a_proj_with_mqa.weight"),
        rule(S + "kv_layernorm.weight", A + "kv_a_layernorm.weight"),
        rule(S + "linear_kv_up_proj.weight", A + "kv_b_proj.weight"),
        rule(S + "linear_proj.weight", A + "o_proj.weight"),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        rule(L + "mlp.router.expert_bias", M + "gate.e_score_correction_bias"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}."),
        *gated_mlp(L + "mlp.shared_experts.", M + "shared_experts."),
        *gated_mlp(L + "mlp.", M), *mtp(),
    ),
    copies=MTP_COPIES,
)
