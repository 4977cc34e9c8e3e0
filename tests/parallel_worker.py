"""Run under torchrun: build the model at TP/PP/EP, fill it from an hf2mcore checkpoint (`ckpt`) or straight from
HF safetensors (`hf`), write the last stage's logits; in `hf` mode also save it back as HF weights and as a
Megatron-LM checkpoint saved at this parallel layout."""
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def logits(model, spec, ids):
    from megatron.core import parallel_state as ps

    from converter.model import mcore_logits

    if ps.get_pipeline_model_parallel_world_size() > 1:
        # two stages by hand: stage 0 sends its hidden states [s, b, h] to stage 1
        if ps.is_pipeline_first_stage():
            dist.send(mcore_logits(model, ids).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        h = torch.empty(ids.shape[1], 1, spec.hidden_size)
        dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h)
    return mcore_logits(model, ids)


def main(mode, hf_dir, ckpt, tp, pp, ep, out):
    from converter import derive
    from converter.live import megatron_model, save_hf_weights
    from converter.mcore_io import load_into, save_model
    from converter.runtime import ensure_distributed
    from converter.verify import SAMPLE_TEXT, token_ids

    tp, pp, ep, out = int(tp), int(pp), int(ep), Path(out)
    spec = derive(hf_dir)
    if mode == "hf":
        model = megatron_model(hf_dir, tp=tp, pp=pp, ep=ep, dtype="fp32").eval()
    else:
        ensure_distributed(tp=tp, pp=pp, ep=ep)
        model = spec.build_model(device="cpu", dtype=torch.float32).eval()
        load_into(model, ckpt)
    got = logits(model, spec, token_ids(Path(hf_dir), SAMPLE_TEXT, spec.vocab_size))
    if dist.get_rank() == dist.get_world_size() - 1:
        torch.save(got[..., : spec.vocab_size], out / "logits.pt")
    if mode == "hf":
        save_hf_weights(model, out / "hf", like=hf_dir)
        save_model(model, out / "mcore", spec)


if __name__ == "__main__":
    main(*sys.argv[1:])
    dist.barrier()
    dist.destroy_process_group()
