"""hf2mcore: derive Megatron-Core settings from a Hugging Face config, convert, export, verify and quantize."""
from .imports import gc_paused, interpret_triton_without_gpu

interpret_triton_without_gpu()
with gc_paused():  # torch is imported here
    from .convert import convert
    from .derive import derive
    from .errors import ConversionError
    from .export import export
    from .live import load_hf_weights, megatron_model, save_hf_weights
    from .quantize import quantize
    from .spec import ModelSpec
    from .verify import verify

__all__ = ["derive", "ModelSpec", "ConversionError", "convert", "export", "verify", "load_hf_weights",
           "save_hf_weights", "megatron_model", "quantize"]
