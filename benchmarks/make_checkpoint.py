"""Random-weight HF checkpoint with the exact tensor names and shapes of a real config (bf16, hub-style shards).

Shapes come from instantiating the HF model on the meta device; values are written one tensor at a time, so a
multi-GB checkpoint needs little memory. `--layers N` scales a big model down by layer count; `--set key=value`
changes any other field (e.g. narrow sizes with all of a model's layers and experts: the per-tensor costs alone).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from converter.hf_io import write_sharded  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("config", help="path to a config.json")
    p.add_argument("out")
    p.add_argument("--layers", type=int)
    p.add_argument("--shard-size", default=5 * 2**30, type=int)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config fields (JSON values)")
    a = p.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = json.loads(Path(a.config).read_text())
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    for item in a.set:
        key, _, value = item.partition("=")
        cfg[key] = json.loads(value)
    cfg.pop("quantization_config", None)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    from transformers.core_model_loading import revert_weight_conversion

    # the names and shapes save_pretrained writes (transformers 5 fuses MoE experts in memory, not on disk)
    shapes = {k: v.shape for k, v in revert_weight_conversion(model, model.state_dict()).items()}
    if cfg.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    g = torch.Generator().manual_seed(0)
    tensors = ((k, (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)) for k, s in sorted(shapes.items()))
    out = Path(a.out)
    write_sharded(tensors, out, a.shard_size)
    cfg["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


if __name__ == "__main__":
    main()
