"""Peer: ModelOpt's HF importer (`import_mcore_gpt_from_hf`) into a CPU GPTModel, then megatron-core's own
torch_dist save. ModelOpt does not derive the model, so hf2mcore's derive builds the same GPTModel for it.
Usage (one run, timed from outside by benchmarks/run.py): python benchmarks/peer_modelopt.py HF_DIR OUT_DIR"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main(hf_dir: str, out_dir: str) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from modelopt.torch.export import import_mcore_gpt_from_hf

    from converter import derive
    from converter.mcore_io import CONTENT_METADATA
    from converter.runtime import cpu_patches

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model = derive(hf_dir).build_model(device="cpu", dtype=torch.bfloat16)
    with cpu_patches():
        import_mcore_gpt_from_hf(model, hf_dir, dtype=torch.bfloat16)
        dist_checkpointing.save(model.sharded_state_dict(metadata=dict(CONTENT_METADATA)), out_dir,
                                content_metadata=dict(CONTENT_METADATA))


if __name__ == "__main__":
    main(*sys.argv[1:])
