"""hf2mcore: derive Megatron-Core settings from a Hugging Face config, convert, export, verify and quantize.

The entry points below are imported when first used, not with the package: importing torch takes seconds, and the
command line starts reading the source files before it (readahead.py), or answers --help and bad arguments at once.
"""
import importlib
import sys
import types

from .imports import gc_paused, interpret_triton_without_gpu

interpret_triton_without_gpu()

_API = {"derive": "derive", "ModelSpec": "spec", "ConversionError": "errors", "convert": "convert",
        "export": "export", "verify": "verify", "load_hf_weights": "live", "save_hf_weights": "live",
        "megatron_model": "live", "quantize": "quantize"}
__all__ = list(_API)


class _Package(types.ModuleType):
    def __getattribute__(self, name):
        # before the module's own attributes: importing submodule converter.convert binds that name to the module,
        # where the package's `convert` is the function
        if name in _API:
            with gc_paused():  # what torch's import allocates stays alive: collecting during it is wasted
                return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        return super().__getattribute__(name)

    def __dir__(self):
        return sorted({*super().__dir__(), *_API})


sys.modules[__name__].__class__ = _Package
