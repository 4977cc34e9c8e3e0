"""Nemotron-H and Nemotron 3 (NemotronHForCausalLM): hybrid Mamba-2, attention, MLP and MoE layers on megatron-core's
HybridModel. Each HF layer is one pre-norm and one mixer of the kind its layer pattern names; the Megatron names
say which (Mamba `mixer.`, attention `self_attention.`, MLP and MoE `mlp.`), so the HF norm feeds the one norm
that layer has. Mamba's in_proj ([z, x, B, C, dt]) and conv1d ([x, B, C]) are stored in megatron-core's order."""
from .base import Family, L, gqa_attention, rule

B = "backbone.layers.{i}."
M = B + "mixer."
X = L + "mlp.experts.local_experts.{e}."
FAMILY = Family(
    name="nemotron_h",
    # the modeling code fixes: MLPs and experts are not gated, no rotary embedding, sigmoid routing in groups with
    # the score-correction bias
    architectures={"NemotronHForCausalLM": {"hybrid": "nemotron_h", "mlp": "plain", "position_embedding": "none",
                                            # (its modeling code ties no weights: lm_head stays its own)
                                            "tie_word_embeddings": False,
                                            "mamba_mixer": "NemotronHMamba2Mixer",  # (its dt range: derive)
                                            "scoring_func": "sigmoid", "topk_method": "noaux_tc"}},
    rules=(
        rule("embedding.word_embeddings.weight", "backbone.embeddings.weight"),
        rule("output_layer.weight", "lm_head.weight"),
        rule("decoder.final_norm.weight", "backbone.norm_f.weight"),
        rule(L + "norm.weight", B + "norm.weight"),
        *(rule(L + "mixer." + mc, M + hf) for mc, hf in (
            ("in_proj.weight", "in_proj.weight"), ("conv1d_weight", "conv1d.weight"), ("conv1d_bias", "conv1d.bias"),
            ("dt_bias", "dt_bias"), ("A_log", "A_log"), ("D", "D"), ("norm.weight", "norm.weight"),
            ("out_proj.weight", "out_proj.weight"))),
        *gqa_attention(attn=M, norm=B + "norm."),
        rule(L + "pre_mlp_layernorm.weight", B + "norm.weight"),
        rule(L + "mlp.linear_fc1.weight", M + "up_proj.weight"),
        rule(L + "mlp.linear_fc2.weight", M + "down_proj.weight"),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        rule(L + "mlp.router.expert_bias", M + "gate.e_score_correction_bias"),
        rule(X + "linear_fc1.weight", M + "experts.{e}.up_proj.weight"),
        rule(X + "linear_fc2.weight", M + "experts.{e}.down_proj.weight"),
        rule(L + "mlp.shared_experts.linear_fc1.weight", M + "shared_experts.up_proj.weight"),
        rule(L + "mlp.shared_experts.linear_fc2.weight", M + "shared_experts.down_proj.weight"),
    ),
)
