"""Phi-3: Llama layout with HF-side fused qkv_proj ([q; k; v]) and gate_up_proj ([gate; up])."""
from converter.transforms import FUSED_QKV

from .base import Family, L, embeddings, pre_mlp_norm, rule

A = "model.layers.{i}."
FAMILY = Family(
    name="phi3",
    architectures={"Phi3ForCausalLM": {"reads_sliding_window": True, "reads_partial_rotary": True,
                                       "reads_resid_pdrop": True}},
    rules=(
        *embeddings(), *pre_mlp_norm(),
        rule(L + "input_layernorm.weight", A + "input_layernorm.weight"),
        rule(L + "self_attention.linear_qkv.weight", A + "self_attn.qkv_proj.weight", transform=FUSED_QKV),
        rule(L + "self_attention.linear_proj.weight", A + "self_attn.o_proj.weight"),
        rule(L + "mlp.linear_fc1.weight", A + "mlp.gate_up_proj.weight"),
        rule(L + "mlp.linear_fc2.weight", A + "mlp.down_proj.weight"),
    ),
)
