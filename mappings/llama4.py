"""Llama 4 text model (Scout / Maverick): GQA attention, weightless q/k norm on rope layers, NoPE layers,
interleaved llama3 rope; MoE layers with a top-1 sigmoid router applied to the expert input, a shared expert and
experts packed per layer ([gate | up] columns). The multimodal checkpoint keeps the same tensors under
`language_model.`; its vision tower and projector are left out (text-only conversion)."""
import re

from converter.transforms import TRANSPOSE

from .base import Family, L, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, rule

IMPLIED = {"qk_norm_is_l2": True, "rope_interleaved": True, "scoring_func": "sigmoid", "n_shared_experts": 1,
           "moe_probs_on_input": True}


def family(name: str, architecture: str, root: str) -> Family:
    m, ff, x = root + "model.", root + "model.layers.{i}.feed_forward.", L + "mlp.experts.local_experts.{e}."
    return Family(
        name=name, architectures={architecture: IMPLIED},
        packed=(re.escape(root) + r"model\.layers\.\d+\.feed_forward\.experts\.(gate_up|down)_proj",),
        ignore=(*Family.ignore, r"vision_model\..*", r"multi_modal_projector\..*"),
        rules=(
            *embeddings(m, lm_head=root + "lm_head.weight"),
            *gqa_attention(m + "layers.{i}.self_attn.", m + "layers.{i}.input_layernorm."),
            *pre_mlp_norm(m + "layers.{i}.post_attention_layernorm.weight"),
            rule(L + "mlp.router.weight", ff + "router.weight"),
            rule(x + "linear_fc1.weight", ff + "experts.gate_up_proj[{e}]", transform=TRANSPOSE),
            rule(x + "linear_fc2.weight", ff + "experts.down_proj[{e}]", transform=TRANSPOSE),
            *gated_mlp(L + "mlp.shared_experts.", ff + "shared_expert."),
            *gated_mlp(L + "mlp.", ff),
        ),
    )


FAMILY = family("llama4", "Llama4ForCausalLM", "")
MULTIMODAL = family("llama4_multimodal", "Llama4ForConditionalGeneration", "language_model.")
