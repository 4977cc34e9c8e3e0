"""Known architectures megatron-core's GPTModel cannot express exactly; each names what is missing."""
from .base import Family

FAMILIES = (
    Family("gemma2", {"Gemma2ForCausalLM": {}, "Gemma3ForCausalLM": {}},
           refuse="attn_logit_softcapping / final_logit_softcapping (no logit soft-capping in megatron-core), "
                  "post_attention / post_feedforward norms around each block (not in the megatron-core layer) and "
                  "the sqrt(hidden_size) embedding scale"),
    Family("nemotron_h", {"NemotronHForCausalLM": {}},
           refuse="hybrid Mamba-2 layers (hybrid_override_pattern); GPTModel has no Mamba layers"),
    Family("qwen3_next", {"Qwen3NextForCausalLM": {}},
           refuse="hybrid gated-DeltaNet linear-attention layers (full_attention_interval); GPTModel has none"),
)
