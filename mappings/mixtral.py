"""Mixtral: Llama attention, every layer a softmax top-k MoE with experts w1 (gate), w3 (up), w2 (down)."""
from .base import Family, L, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, rule

M = "model.layers.{i}.block_sparse_moe."
FAMILY = Family(
    name="mixtral",
    # Mixtral's router always renormalises the top-k probabilities.
    architectures={"MixtralForCausalLM": {"norm_topk_prob": True, "reads_sliding_window": True}},
    rules=(
        *embeddings(), *gqa_attention(), *pre_mlp_norm(),
        rule(L + "mlp.router.weight", M + "gate.weight"),
        *gated_mlp(L + "mlp.experts.local_experts.{e}.", M + "experts.{e}.", gate="w1", up="w3", down="w2"),
    ),
)
