"""Hybrid models on a GPU, in one call: each tiny hybrid model of the tests (Nemotron-H; a Nemotron 3-style hybrid
MoE; Qwen3-Next) is made, converted (fp32) and run on CUDA two ways, against transformers' logits on the same GPU
(its PyTorch Mamba-2: mamba_ssm's package does not import without its CUDA extension, so transformers falls back;
for Qwen3-Next, fla's Triton Gated DeltaNet, while megatron-core's runs its PyTorch one, --deterministic-mode):
- hf2mcore's `verify --device cuda`: the HybridModel built from the written megatron_args.sh, mamba_ssm's Triton
  kernels compiled for the GPU;
- Megatron-LM itself (tests/megatron_lm_judge.py, which runs on the GPU when one is visible): pretrain_hybrid.py's
  parse_and_validate_args -> hybrid_config_from_args -> HybridModelBuilder, load_checkpoint strict.
Triton's tl.dot (mamba_ssm's chunked scan) computes fp32 products in TF32 on these GPUs unless TRITON_F32_DEFAULT=ieee;
gpu_hybrid.sh runs both. Prints a table last. Run through benchmarks/gpu_hybrid.sh."""
import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from converter.imports import interpret_triton_without_gpu  # first: nothing to interpret here, but same order

interpret_triton_without_gpu()
import torch  # noqa: E402

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
MODELS = ["nvidia/Nemotron-H-56B-Base-8K", "transformers:nemotron_h:NemotronHForCausalLM#nemotron-3",
          "Qwen/Qwen3-Next-80B-A3B-Thinking"]


def main():
    from tiny import make_model, tiny_config

    from converter import derive
    from converter.convert import convert
    from converter.verify import verify

    p = argparse.ArgumentParser()
    p.add_argument("--megatron-lm", required=True)
    p.add_argument("--work", default="/tmp/gpu_hybrid")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_hybrid_out"))
    p.add_argument("--tokens", type=int, default=512)
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for name in MODELS:
        tag = name.split("/")[-1].replace(":", "_").replace("#", "_")
        hf = make_model(tiny_config(name), work / tag / "hf")
        ckpt = convert(hf, work / tag / "mc", dtype="fp32", progress=False, overwrite=True)
        spec = derive(hf)
        ids = torch.randint(0, spec.vocab_size, (1, a.tokens), generator=torch.Generator().manual_seed(0))
        from transformers import AutoModelForCausalLM

        from converter.runtime import transformers_reference

        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).cuda().eval()
        with torch.no_grad():
            ref = model(ids.cuda()).logits.float().cpu()
            with transformers_reference(model, torch_only=True):  # its PyTorch code, not fla / mamba_ssm
                own = model(ids.cuda()).logits.float().cpu()
        del model
        rows.append((tag, "transformers' PyTorch path vs its kernel path (cuda)",
                     ((own - ref).abs().max() / ref.abs().max()).item(),
                     (own.argmax(-1) == ref.argmax(-1)).float().mean().item(), 0.0))
        t = time.time()
        r = verify(hf, ckpt, device="cuda")
        rows.append((tag, "hf2mcore verify (HybridModel, cuda)", r["rel_err"], r["top1_agreement"], time.time() - t))
        torch.save(ids, work / tag / "ids.pt")
        jobs.append({"ckpt": str(ckpt), "ids": str(work / tag / "ids.pt"), "out": str(work / tag / "mlm.pt"),
                     "extra": [], "mode": "forward", "tag": tag, "ref": ref, "own": own})
    for j in jobs:
        torch.save(j.pop("ref"), j["out"] + ".ref")
        torch.save(j.pop("own"), j["out"] + ".own")
    path = work / "jobs.json"
    path.write_text(json.dumps(jobs))
    t = time.time()
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "megatron_lm_judge.py"), a.megatron_lm, str(path)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": f"{ROOT}:" +
                                                              os.environ.get("PYTHONPATH", "")})
    took = time.time() - t
    for j in jobs:
        if run.returncode != 0 or not Path(j["out"]).exists():
            rows.append((j["tag"], "Megatron-LM pretrain_hybrid path (cuda)", float("nan"), 0.0, took))
            print(run.stdout[-3000:], run.stderr[-6000:])
            continue
        v, ref = torch.load(j["out"], weights_only=False), torch.load(j["out"] + ".ref")
        if "error" in v:
            print(j["tag"], v["error"])
            rows.append((j["tag"], "Megatron-LM pretrain_hybrid path (cuda)", float("nan"), 0.0, took))
            continue
        got = v["logits"][..., : ref.shape[-1]]
        for what, r in (("", ref), (" vs transformers' PyTorch path", torch.load(j["out"] + ".own"))):
            err = ((got - r).abs().max() / r.abs().max()).item()
            top1 = (got.argmax(-1) == r.argmax(-1)).float().mean().item()
            rows.append((j["tag"], f"Megatron-LM pretrain_hybrid path (cuda){what}, config/args diffs "
                                   f"{len(v['config_diff'])}/{len(v['args_diff'])}", err, top1, took))
    (out / f"gpu_hybrid_{os.environ.get('TRITON_F32_DEFAULT', 'tf32')}.json").write_text(json.dumps(rows, indent=1))
    dots = os.environ.get("TRITON_F32_DEFAULT", "Triton's default (tf32)")
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.tokens} tokens, fp32 weights and compute, "
          f"Triton fp32 dots: {dots}, vs transformers")
    print(f"{'model':32} {'path':96} {'rel err':>9} {'top-1':>6} {'s':>6}")
    for tag, what, err, top1, s in rows:
        print(f"{tag[:32]:32} {what:96} {err:9.2e} {top1:6.3f} {s:6.1f}")


if __name__ == "__main__":
    main()
