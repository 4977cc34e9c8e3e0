"""Known architectures megatron-core cannot express exactly (or hf2mcore does not convert yet); each names what
is missing."""
from .base import Family

FAMILIES = (
    Family("gemma3", {"Gemma3ForCausalLM": {}},
           refuse="rope of its own per layer type (rope_local_base_freq on the sliding layers, scaled rope on the "
                  "others), which megatron-core's single rotary embedding cannot give (Gemma 2 converts)"),
)
