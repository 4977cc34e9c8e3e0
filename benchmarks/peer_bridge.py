"""Peer: Megatron-Bridge's one-call HF -> Megatron import (`AutoBridge.import_ckpt`, a torch_dist checkpoint).
Usage (one run, timed from outside by benchmarks/run.py): python benchmarks/peer_bridge.py HF_DIR OUT_DIR

Megatron-Bridge pins versions of transformers and tokenizers that conflict with the ones hf2mcore is tested on
(RESULTS.md, sessions 2 and 3), so it is not in the project's environment. BRIDGE_SITE names a directory that holds
it and its pins (`pip install --target`); it goes ahead of the environment's packages. When the peer cannot run,
its exact error is the last line of stderr, and run.py reports it."""
import os
import sys


def main(hf_dir: str, out_dir: str) -> None:
    if os.environ.get("BRIDGE_SITE"):
        sys.path.insert(0, os.environ["BRIDGE_SITE"])
    from megatron.bridge import AutoBridge

    AutoBridge.import_ckpt(hf_dir, out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
