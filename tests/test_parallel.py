"""TP=2, PP=2 and EP=2 under torchrun on CPU: a checkpoint written once (TP=1) loads and matches HF logits; the
live API loads HF weights at each layout, matches HF logits, saves HF weights back bit for bit, and the
checkpoint it saves at that layout exports to the original HF tensors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from converter.convert import convert
from converter.export import export
from converter.verify import SAMPLE_TEXT, token_ids

WORKER = Path(__file__).with_name("parallel_worker.py")
LAYOUTS = [
    ("Qwen/Qwen2.5-7B", 2, 1, 1),  # TP splits query groups and the qkv bias
    ("meta-llama/Llama-3.2-1B", 1, 2, 1),  # PP with tied embeddings
    ("mistralai/Mixtral-8x7B-v0.1", 1, 1, 2),  # EP: two experts per rank
    ("deepseek-ai/DeepSeek-V3", 2, 1, 1),  # TP over multi-latent attention, shared experts, expert bias
    ("openai/gpt-oss-20b", 1, 1, 2),  # EP over packed experts (each rank reads only its experts' slices)
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct:text", 1, 2, 1),  # PP: per-layer q/k norms follow global layers
]


def _hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM

    from converter import derive

    ids = token_ids(hf_dir, SAMPLE_TEXT, derive(hf_dir).vocab_size)
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()(ids).logits


def _torchrun(mode, hf, ckpt, tp, pp, ep, out):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        str(WORKER), mode, str(hf), str(ckpt), str(tp), str(pp), str(ep), str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got, ref = torch.load(out / "logits.pt"), _hf_logits(hf)
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5 and (got.argmax(-1) == ref.argmax(-1)).all(), rel


def _weights(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _assert_same_weights(got: dict, ref: dict):
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("name,tp,pp,ep", LAYOUTS)
def test_checkpoint_loads_at_parallel_sizes(name, tp, pp, ep, tiny_models, tmp_path):
    hf = tiny_models(name)
    ckpt = convert(hf, tmp_path / "mc", dtype="fp32", tp=tp, pp=pp, ep=ep, progress=False)
    _torchrun("ckpt", hf, ckpt, tp, pp, ep, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("name,tp,pp,ep", LAYOUTS)
def test_live_model_at_parallel_sizes(name, tp, pp, ep, tiny_models, tmp_path):
    hf = tiny_models(name)
    _torchrun("hf", hf, "-", tp, pp, ep, tmp_path / "run")
    ref = _weights(hf)
    _assert_same_weights(_weights(tmp_path / "run" / "hf"), ref)
    # the checkpoint saved by the parallel job (its own layout) exports to the original tensors
    back = export(tmp_path / "run" / "mcore", tmp_path / "back", like=hf, progress=False)
    _assert_same_weights(_weights(back), ref)


@pytest.mark.slow
def test_convert_with_two_workers(tiny_models, tmp_path):
    """`convert --workers 2`: two processes share the writing (each rank's own .distcp holds data), and the
    result verifies and exports like a one-process conversion."""
    hf = tiny_models("Qwen/Qwen3-30B-A3B")
    out = tmp_path / "mc"
    r = subprocess.run([sys.executable, "-m", "converter", "convert", str(hf), str(out), "--workers", "2",
                        "--dtype", "fp32", "--verify", "--no-progress"], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0 and "-> OK" in r.stdout, r.stderr[-3000:]
    parts = sorted((out / "release").glob("*.distcp"))
    assert len(parts) == 2 and min(p.stat().st_size for p in parts) > 0.3 * max(p.stat().st_size for p in parts)
    _assert_same_weights(_weights(export(out, tmp_path / "back", progress=False)), _weights(hf))
    assert json.loads((out / "hf2mcore.json").read_text())["processes"] == 2
