"""Baseline for benchmarks/gpu_quant.py: ModelOpt applied to the HF transformers model itself (no Megatron), with
the same formats, calibration and held-out batches. If the perplexity changes agree with hf2mcore's, a miss of
the quality targets belongs to the model and the formats, not to the conversion. Prints a markdown table."""
import argparse
import math
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")


@torch.no_grad()
def perplexity(model, batches) -> float:
    nll, n = 0.0, 0
    for ids in batches:
        ids = ids.cuda()
        logits = model(ids).logits.float()
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        n += ids[:, 1:].numel()
    return math.exp(nll / n)


def main():
    import modelopt.torch.quantization as mtq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converter.default_model import smollm2_dir
    from converter.quantize import FORMATS, builtin_texts, token_batches

    p = argparse.ArgumentParser()
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-size", type=int, default=16)
    a = p.parse_args()
    hf = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(hf)
    calib = token_batches(tok, builtin_texts("calib"), a.calib_size, a.seq_len, 8)
    evalb = token_batches(tok, builtin_texts("eval"), a.eval_size, a.seq_len, 8)
    rows = []
    base = None
    for fmt in ["bf16", "fp8", "int8_sq", "int4_awq", "nvfp4"]:
        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16).cuda().eval()
        if fmt != "bf16":
            mtq.quantize(model, getattr(mtq, FORMATS[fmt]), lambda m: [m(ids.cuda()) for ids in calib])
        ppl = perplexity(model, evalb)
        base = base or ppl
        rows.append(f"| {fmt} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % |")
    print("\n| HF model + ModelOpt | perplexity | change |\n|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
