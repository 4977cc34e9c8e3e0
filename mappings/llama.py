"""Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, SmolLM: dense pre-norm decoders with HF's Llama tensor names."""
from .base import Family, embeddings, gated_mlp, gqa_attention, pre_mlp_norm, L

FAMILY = Family(
    name="llama",
    architectures={
        # (reads_*: config fields the modeling code reads; without, derive leaves them out and says so)
        "LlamaForCausalLM": {},
        "MistralForCausalLM": {"reads_sliding_window": True},
        # Qwen2's modeling code always gives q/k/v a bias; the config has no field for it.
        "Qwen2ForCausalLM": {"add_qkv_bias": True, "reads_sliding_window": True},
        "Qwen3ForCausalLM": {"qk_layernorm": True, "reads_sliding_window": True},
    },
    rules=(*embeddings(), *gqa_attention(), *pre_mlp_norm(), *gated_mlp(L + "mlp.", "model.layers.{i}.mlp.")),
)
