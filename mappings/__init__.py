"""Registry: HF architecture class -> family. One module per family; this file only lists them."""
from . import (deepseek, gemma2, glm4_moe, gpt_oss, llama, llama4, mixtral, nemotron_h, phi3, qwen3_next, qwen_moe,
               unsupported)
from .base import Family, Rule

FAMILIES: dict[str, Family] = {
    f.name: f for f in (llama.FAMILY, phi3.FAMILY, gemma2.FAMILY, mixtral.FAMILY, qwen_moe.FAMILY, deepseek.FAMILY,
                        glm4_moe.FAMILY, gpt_oss.FAMILY, llama4.FAMILY, llama4.MULTIMODAL, nemotron_h.FAMILY,
                        qwen3_next.FAMILY, *unsupported.FAMILIES)
}
BY_ARCHITECTURE: dict[str, Family] = {a: f for f in FAMILIES.values() for a in f.architectures}


def supported() -> list[str]:
    return sorted(name for name, f in FAMILIES.items() if not f.refuse)


__all__ = ["FAMILIES", "BY_ARCHITECTURE", "Family", "Rule", "supported"]
