"""Gemma 2: the Llama layout with a norm after the attention and after the MLP (post_attention_layernorm is that
one here; pre_feedforward_layernorm comes before the MLP), norms scaling by 1 + weight, embeddings times
sqrt(hidden_size), soft-capped scores and logits, and a tanh-GELU gate: the --spec hook builds those layers."""
from .base import Family, L, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, rule

A = "model.layers.{i}."
FAMILY = Family(
    name="gemma2",
    architectures={"Gemma2ForCausalLM": {"zero_centered_norm": True, "embedding_scale": True, "post_norms": True,
                                         "reads_sliding_window": True, "reads_softcapping": True,
                                         "reads_query_pre_attn_scalar": True}},
    rules=(*embeddings(), *gqa_attention(), *pre_mlp_norm(A + "pre_feedforward_layernorm.weight"),
           *gated_mlp(L + "mlp.", A + "mlp."),
           rule(L + "self_attention.linear_proj.post_layernorm.weight", A + "post_attention_layernorm.weight"),
           rule(L + "mlp.linear_fc2.post_layernorm.weight", A + "post_feedforward_layernorm.weight")),
)
