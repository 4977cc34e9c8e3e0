"""A checkpoint written once (TP=1) loads at TP=2, PP=2 and EP=2 under torchrun on CPU and matches HF logits."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converter.convert import convert
from converter.verify import SAMPLE_TEXT, token_ids

WORKER = Path(__file__).with_name("parallel_worker.py")


def _hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM

    from converter import derive

    ids = token_ids(hf_dir, SAMPLE_TEXT, derive(hf_dir).vocab_size)
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("name,tp,pp,ep", [
    ("Qwen/Qwen2.5-7B", 2, 1, 1),  # TP splits query groups and the qkv bias
    ("meta-llama/Llama-3.2-1B", 1, 2, 1),  # PP with tied embeddings
    ("mistralai/Mixtral-8x7B-v0.1", 1, 1, 2),  # EP: two experts per rank
])
def test_load_at_parallel_sizes(name, tp, pp, ep, tiny_models, tmp_path):
    hf = tiny_models(name)
    ckpt = convert(hf, tmp_path / "mc", dtype="fp32", tp=tp, pp=pp, ep=ep, progress=False)
    out = tmp_path / "logits.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--standalone", str(WORKER), str(hf), str(ckpt), str(tp), str(pp), str(ep), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = torch.load(out), _hf_logits(hf)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5 and (got.argmax(-1) == ref.argmax(-1)).all(), rel
