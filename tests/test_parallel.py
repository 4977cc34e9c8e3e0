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
    # PP with tied embeddings; Gemma 2's embedding scale on the first stage, its logit soft-cap on the last
    ("google/gemma-2-2b", 1, 2, 1),
    ("mistralai/Mixtral-8x7B-v0.1", 1, 1, 2),  # EP: two experts per rank
    ("deepseek-ai/DeepSeek-V3", 2, 1, 1),  # TP over multi-latent attention, shared experts, expert bias
    ("openai/gpt-oss-20b", 1, 1, 2),  # EP over packed experts (each rank reads only its experts' slices)
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct:text", 1, 2, 1),  # PP: per-layer q/k norms follow global layers
    ("nvidia/Nemotron-H-56B-Base-8K", 2, 1, 1),  # TP over Mamba's in_proj parts, conv1d parts and grouped norm
    ("transformers:nemotron_h:NemotronHForCausalLM#nemotron-3", 1, 2, 1),  # PP: the hybrid pattern split evenly
    ("Qwen/Qwen3-Next-80B-A3B-Thinking", 2, 1, 1),  # TP over Gated DeltaNet's in_proj and conv1d parts, gated qkv
]


def _hf_logits(hf_dir):
    from transformers import AutoModelForCausalLM

    from converter import derive

    ids = token_ids(hf_dir, SAMPLE_TEXT, derive(hf_dir).vocab_size)
    from converter.runtime import transformers_reference

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad(), transformers_reference(model):
        return model(ids).logits


def _torchrun(mode, hf, ckpt, tp, pp, ep, out):
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # (--log-dir: torchrun's log directory, else one more in the system's temporary directory each run, never removed)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                        "--log-dir", str(out / "torchrun"), str(WORKER), mode, str(hf), str(ckpt), str(tp), str(pp),
                        str(ep), str(out)],
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


def test_convert_workers_in_process_matches_one_process(tiny_models, tmp_path):
    """The library call with workers=2, after this process already converted alone (it holds a one-process group,
    which the forked ranks replace): the same tensors as a one-process conversion, written by two ranks."""
    hf = tiny_models("meta-llama/Llama-3.2-1B")
    one = convert(hf, tmp_path / "one", dtype="fp32", progress=False)
    two = convert(hf, tmp_path / "two", dtype="fp32", progress=False, workers=2)
    assert len(list((two / "release").glob("*.distcp"))) == 2
    a, b = _weights(export(one, tmp_path / "a", progress=False)), _weights(export(two, tmp_path / "b", progress=False))
    _assert_same_weights(b, a)


def test_worker_failure_stops_every_rank(monkeypatch):
    """One rank fails while another waits for it in a collective: the job stops with the failing rank's message,
    without waiting for the grace period after which stragglers are killed."""
    import signal
    import time

    import torch.distributed as dist

    from converter import ConversionError, workers

    monkeypatch.setattr(workers, "GRACE_S", 120.0)

    def fn():
        if dist.get_rank() == 1:
            raise ConversionError("model.layers.0.mlp.up_proj.weight: corrupt")
        dist.barrier()

    t = time.monotonic()
    with pytest.raises(ConversionError, match="up_proj.weight: corrupt"):
        workers.run_forked(2, fn)
    assert time.monotonic() - t < 60

    def killed():  # as the OOM killer would
        if dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()

    with pytest.raises(RuntimeError, match="rank 1 was killed by signal 9"):
        workers.run_forked(2, killed)
    assert time.monotonic() - t < 120


def test_forked_convert_failure_leaves_no_output(tiny_models, tmp_path, monkeypatch):
    """A rank that fails during the save: the conversion raises its error, and neither the output nor the
    temporary directory that rank 0 was writing into is left behind."""
    import importlib

    import torch.distributed as dist

    from converter import ConversionError

    convert_module = importlib.import_module("converter.convert")  # the package exports a function of that name
    save = convert_module.save_streaming

    def failing_on_rank_1(*a, **k):
        if dist.get_rank() == 1:
            raise ConversionError("model.norm.weight: unreadable")
        return save(*a, **k)

    monkeypatch.setattr(convert_module, "save_streaming", failing_on_rank_1)
    hf = tiny_models("meta-llama/Llama-3.2-1B")
    with pytest.raises(ConversionError, match="model.norm.weight: unreadable"):
        convert(hf, tmp_path / "mc", progress=False, workers=2)
    assert list(tmp_path.iterdir()) == []


def test_auto_worker_count(monkeypatch, tiny_models, tmp_path):
    """workers="auto": one rank per 512 MiB to write, bounded by cores, MAX_AUTO and available memory (1 GiB + 2 x
    the largest tensor per rank); a tiny model converts in one process."""
    from converter import workers

    gib = 1 << 30
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(workers, "_available_memory", lambda: 64 * gib)
    assert workers.auto_count(300 << 20, 10 << 20) == 1
    assert workers.auto_count(2 * gib + (100 << 20), 500 << 20) == 4
    assert workers.auto_count(700 * gib, 100 << 20) == workers.MAX_AUTO
    assert workers.auto_count(700 * gib, 4 * gib) == 7  # 64 GiB // 9 GiB
    assert workers.auto_count(700 * gib, 40 * gib) == 1
    monkeypatch.setattr(workers, "_available_memory", lambda: None)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 2)
    assert workers.auto_count(700 * gib, 4 * gib) == 2
    out = convert(tiny_models("meta-llama/Llama-3.2-1B"), tmp_path / "mc", progress=False, workers="auto")
    assert json.loads((out / "hf2mcore.json").read_text())["processes"] == 1
