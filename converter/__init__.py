"""hf2mcore: derive Megatron-Core settings from a Hugging Face config, convert, export, verify and quantize."""
from .derive import derive
from .errors import ConversionError
from .spec import ModelSpec

__all__ = ["derive", "ModelSpec", "ConversionError"]
