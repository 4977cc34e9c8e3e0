"""Whether a peer's torch_dist checkpoint holds the same weights as hf2mcore's, bit for bit.
Usage: python same_weights.py PEER_CKPT_DIR HF2MCORE_OUTPUT  (prints one line; exit 1 on any difference)

The peers build megatron-core's local layer spec, where the layer norms are modules of their own; hf2mcore writes
Megatron-LM's Transformer Engine names (the norm fused into linear_qkv / linear_fc1): those are matched up."""
import sys

import torch

from converter.layout import find_checkpoint
from converter.mcore_io import ChunkReader

TE_NAMES = {".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
            ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight"}


def main(peer_dir: str, ours_dir: str) -> int:
    peer, ours = ChunkReader(peer_dir), ChunkReader(find_checkpoint(ours_dir))
    differ, compared = [], 0
    for key, meta in peer.md.state_dict_metadata.items():
        if not hasattr(meta, "chunks") or key.endswith("_extra_state"):
            continue
        mine = next((key.replace(a, b) for a, b in TE_NAMES.items() if key.endswith(a)), key)
        if not ours.has(mine):
            differ.append(f"{key}: not in hf2mcore's checkpoint")
            continue
        size, zero = tuple(meta.size), (0,) * len(meta.size)
        a, b = peer.read(key, zero, size), ours.read(mine, zero, size)
        compared += 1
        if a.dtype != b.dtype or not torch.equal(a, b):
            differ.append(f"{key}: differs")
    missing = set(ours.md.state_dict_metadata) - {next((k.replace(a, b) for a, b in TE_NAMES.items()
                                                        if k.endswith(a)), k) for k in peer.md.state_dict_metadata}
    differ += [f"{k}: only in hf2mcore's checkpoint" for k in sorted(missing) if not k.endswith("_extra_state")]
    print(f"{compared} tensors compared, {len(differ)} differences" + (f": {differ[:5]}" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
