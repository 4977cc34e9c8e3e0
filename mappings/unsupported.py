"""Known architectures megatron-core cannot express exactly (or hf2mcore does not convert yet); each names what
is missing."""
from .base import Family

FAMILIES = (
    Family("gemma2", {"Gemma2ForCausalLM": {}, "Gemma3ForCausalLM": {}},
           refuse="attn_logit_softcapping / final_logit_softcapping (no logit soft-capping in megatron-core), "
                  "post_attention / post_feedforward norms around each block (not in the megatron-core layer) and "
                  "the sqrt(hidden_size) embedding scale"),
)
