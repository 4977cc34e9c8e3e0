"""Run under torchrun: load an hf2mcore checkpoint at the given TP/PP/EP and write the last stage's logits."""
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")


def main(hf_dir, ckpt, tp, pp, ep, out):
    from megatron.core import parallel_state as ps

    from converter import derive
    from converter.mcore_io import load_into
    from converter.runtime import ensure_distributed
    from converter.verify import mcore_logits, token_ids, SAMPLE_TEXT

    ensure_distributed(tp=int(tp), pp=int(pp), ep=int(ep))
    spec = derive(hf_dir)
    model = spec.build_model(device="cpu", dtype=torch.float32).eval()
    load_into(model, ckpt)
    ids = token_ids(__import__("pathlib").Path(hf_dir), SAMPLE_TEXT, spec.vocab_size)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # two stages by hand: stage 0 sends its hidden states [s, b, h] to stage 1
        hidden_shape = (ids.shape[1], 1, spec.hidden_size)
        if ps.is_pipeline_first_stage():
            h = mcore_logits(model, ids)
            dist.send(h.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return
        h = torch.empty(hidden_shape)
        dist.recv(h, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(h)
    logits = mcore_logits(model, ids)
    if dist.get_rank() == dist.get_world_size() - 1:
        torch.save(logits[..., : spec.vocab_size], out)


if __name__ == "__main__":
    main(*sys.argv[1:])
    dist.barrier()
    dist.destroy_process_group()
