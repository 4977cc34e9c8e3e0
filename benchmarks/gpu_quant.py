"""GPU checks for quantization, in one process (ModelOpt compiles its CUDA extension once per process):
convert + verify SmolLM2 on CUDA; quantize it with each format (report, quantized checkpoint, HF export for
fp8/nvfp4); reload every quantized checkpoint in a fresh process and compare perplexity; read the FP8 export back
with transformers' config reader; quantize a tiny Qwen3-MoE-shaped model and check every expert has scales.
Writes reports under --out and prints a table last. Run through benchmarks/gpu_quant.sh."""
import argparse
import json
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

FORMATS = ["fp8", "int8_sq", "int4_awq", "nvfp4"]
TARGET_PCT = {"fp8": 1, "int8_sq": 2, "int4_awq": 15, "nvfp4": 15}


def reload_ppl(ckpt: str, hf: str, n: int, seq_len: int, batch: int, device: str) -> float:
    from transformers import AutoTokenizer

    from converter.quantize import builtin_texts, evaluate, load_quantized, token_batches

    model = load_quantized(ckpt, device=device)
    batches = token_batches(AutoTokenizer.from_pretrained(hf), builtin_texts("eval"), n, seq_len, batch)
    from converter import derive

    return evaluate(model, batches, derive(hf).vocab_size)[0]["perplexity"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work", default="/tmp/gpu_quant")
    p.add_argument("--moe-config", help="a Qwen3-MoE config.json (shrunk to a tiny model)")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=16)
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script with fake quantization")
    p.add_argument("--tiny-families", action="store_true", help="also every family's tiny model on the GPU")
    p.add_argument("--skip-smollm2", action="store_true")
    a = p.parse_args()
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows, results = [], {}

    def stage(name, fn):
        t = time.perf_counter()
        try:
            res = fn()
            rows.append((name, "ok", f"{time.perf_counter() - t:.0f}s", res))
            results[name] = res
        except Exception as exc:  # record and go on: one failing format must not hide the others
            traceback.print_exc()
            rows.append((name, "FAILED", f"{time.perf_counter() - t:.0f}s", f"{type(exc).__name__}: {exc}"[:300]))
        (out / "results.json").write_text(json.dumps({"rows": rows, "results": results}, indent=2, default=str))

    import torch

    from converter.convert import convert
    from converter.default_model import smollm2_dir
    from converter.quantize import HF_EXPORT_FORMATS, quantize_checkpoint
    from converter.verify import verify

    dev = a.device
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}", flush=True)
    if a.tiny_families:
        stage(f"tiny families on {dev}: convert + verify fp32, quantize fp8", lambda: tiny_families(dev))
    if a.skip_smollm2:
        return print_table(rows)
    hf = str(smollm2_dir())

    def convert_verify():
        mc = convert(hf, work / "mc", dtype="bf16", overwrite=True, progress=False)
        r = verify(hf, mc, device=dev, tol=1e-2)
        return {k: r[k] for k in ("rel_err", "top1_agreement", "tokens")}

    stage("convert+verify bf16 (cuda)", convert_verify)
    # every quantize_checkpoint below calibrates and evaluates alike, so that their perplexities compare
    calibration = dict(calib_size=a.calib_size, calib_seq_len=a.seq_len, calib_batch_size=8, eval_size=a.eval_size,
                       overwrite=True, device=dev)
    for fmt in FORMATS:
        def run(fmt=fmt):
            exp = work / f"{fmt}_hf" if fmt in HF_EXPORT_FORMATS else None
            return quantize_checkpoint(hf, work / fmt, fmt, export_hf=exp, **calibration)
        stage(f"quantize {fmt}", run)

    def reload_all():
        got = {}
        for fmt in FORMATS:
            if f"quantize {fmt}" not in results:
                continue
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import gpu_quant; "
                    f"print(gpu_quant.reload_ppl({str(work / fmt)!r}, {hf!r}, {a.eval_size}, {a.seq_len}, 8, {dev!r}))")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{fmt}: {r.stderr[-1500:]}")
            ppl = float(r.stdout.split()[-1])
            before = results[f"quantize {fmt}"]["quantized"]["perplexity"]
            got[fmt] = {"reloaded_ppl": ppl, "same": abs(ppl / before - 1) < 1e-4}
        return got

    stage("reload in a fresh process", reload_all)

    def read_fp8_export():
        from transformers import AutoConfig

        q = AutoConfig.from_pretrained(work / "fp8_hf").quantization_config
        keys = json.loads((work / "fp8_hf" / "model.safetensors.index.json").read_text())["weight_map"]
        layers = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_scale")})
        return {"quant_algo": q.get("quant_algo"), "quant_method": q.get("quant_method"),
                "quantized_layers": len(layers), "first": layers[:3], "ignored": q.get("ignore")}

    if "quantize fp8" in results:
        stage("fp8 HF export read back", read_fp8_export)

    def from_cli_checkpoint():
        """The command line's checkpoint (its tensors in the early copy's __placed_K.distcp files, written while
        torch was imported: at the source's dtype, fp32) quantized as the HF source was: the same bf16 weights once
        loaded, so the same perplexity."""
        mc = work / "cli_mc"
        r = subprocess.run([sys.executable, "-m", "converter", "convert", hf, str(mc), "--dtype", "fp32",
                            "--overwrite", "--no-progress"], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-1500:])
        placed = sorted(p.name for p in (mc / "release").glob("__placed_*.distcp"))
        if not placed:
            raise RuntimeError("the command line placed no tensor early: not the checkpoint this stage is for")
        q = quantize_checkpoint(mc, work / "fp8_from_cli", "fp8", like=hf, **calibration)
        ppl, ref = q["quantized"]["perplexity"], results["quantize fp8"]["quantized"]["perplexity"]
        return {"placed_files": placed, "ppl": ppl, "ppl_from_hf": ref, "rel_diff": abs(ppl / ref - 1)}

    if "quantize fp8" in results:
        stage("fp8 from the CLI's checkpoint", from_cli_checkpoint)

    if a.moe_config:
        def moe():
            from tiny import make_model, shrink

            from converter import megatron_model
            from converter.quantize import quantize, uncalibrated

            d = make_model(shrink(json.loads(Path(a.moe_config).read_text()), experts=8), work / "moe")
            got = {}
            for fmt in ("fp8", "nvfp4", "int4_awq"):
                model = megatron_model(d, device=dev, dtype="bf16").eval()
                info = quantize(model, fmt, [torch.tensor([[5, 17, 101]])])  # 3 tokens: most experts idle
                got[fmt] = {"experts": info["experts"], "idle": len(info["experts_without_calibration_tokens"]),
                            "uncalibrated_quantizers": len(uncalibrated(model))}
            return got

        stage("tiny Qwen3-MoE quantize", moe)

    print_table(rows)


def tiny_families(dev: str) -> dict:
    """Every supported family's tiny model (tests/conftest.py) on the GPU: logits against HF, then fp8 with every
    quantizer calibrated."""
    import torch
    from conftest import FAMILY_CONFIGS
    from tiny import make_model, tiny_config

    from converter import convert, megatron_model, verify
    from converter.quantize import quantize, uncalibrated

    out = {}
    for name in FAMILY_CONFIGS:
        try:  # one family that cannot run here (the hybrids need mamba-ssm: gpu_hybrid.sh) must not hide the rest
            d = make_model(tiny_config(name), Path("/tmp/tiny") / name)
            r = verify(d, convert(d, Path("/tmp/tiny_mc") / name, dtype="fp32", overwrite=True, progress=False,
                                  exact=True),  # (the --spec hook: what no flag says, as the tests convert)
                       device=dev)
            model = megatron_model(d, device=dev, dtype="bf16").eval()
            quantize(model, "fp8", [torch.tensor([[5, 17, 101, 7, 9]])])
            out[name] = (f"rel {r['rel_err']:.1e} top1 {r['top1_agreement']:.2f}, "
                         f"fp8 uncalibrated {len(uncalibrated(model))}")
        except Exception as exc:
            out[name] = f"FAILED {type(exc).__name__}: {str(exc)[:200]}"
    return out


def print_table(rows) -> None:
    print("\n| stage | status | time | result |\n|---|---|---|---|")
    for name, status, t, res in rows:
        if name.startswith("tiny families") and isinstance(res, dict):  # a row per family
            for family, line in res.items():
                print(f"| {name}: {family} | {status} | {t} | {line} |")
            continue
        if isinstance(res, dict) and "quantized" in res:
            q = res["quantized"]
            res = (f"ppl bf16 {res['bf16']['perplexity']:.3f} -> {q['perplexity']:.3f} "
                   f"({res['perplexity_change_pct']:+.2f} %, target {TARGET_PCT[res['format']]} %), "
                   f"rel logit err {q['rel_logit_err']:.3g}, KL/token {q['kl_per_token']:.3g}, {q['tokens']} tokens")
        print(f"| {name} | {status} | {t} | {res} |")


if __name__ == "__main__":
    main()
