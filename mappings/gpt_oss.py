"""gpt-oss: attention with biases and sinks, alternating sliding-window layers, yarn rope (not truncated);
MoE with router bias, experts packed per layer (gate/up interleaved, biases) and the clamped GLU."""
from converter.transforms import INTERLEAVED_GATE_UP, INTERLEAVED_GATE_UP_T, TRANSPOSE

from .base import Family, L, embeddings, gqa_attention, pre_mlp_norm, rule

M, X = "model.layers.{i}.mlp.", L + "mlp.experts.local_experts.{e}."
FAMILY = Family(
    name="gpt_oss",
    # the modeling code fixes: biases on every projection, sinks, softmax over the top-k, the clamped GLU
    architectures={"GptOssForCausalLM": {"mlp_bias": True, "attention_sinks": True, "norm_topk_prob": True,
                                         "glu": "clamped_swiglu", "reads_sliding_window": True}},
    packed=(r"model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?",),
    rules=(
        *embeddings(), *gqa_attention(), *pre_mlp_norm(),
        rule(L + "self_attention.core_attention.softmax_offset", "model.layers.{i}.self_attn.sinks"),
        rule(L + "mlp.router.weight", M + "router.weight"),
        rule(L + "mlp.router.bias", M + "router.bias"),
        rule(X + "linear_fc1.weight", M + "experts.gate_up_proj[{e}]", transform=INTERLEAVED_GATE_UP_T),
        rule(X + "linear_fc1.bias", M + "experts.gate_up_proj_bias[{e}]", transform=INTERLEAVED_GATE_UP),
        rule(X + "linear_fc2.weight", M + "experts.down_proj[{e}]", transform=TRANSPOSE),
        rule(X + "linear_fc2.bias", M + "experts.down_proj_bias[{e}]"),
    ),
)
