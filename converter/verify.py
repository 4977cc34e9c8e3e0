"""Logits of the converted Megatron-Core model against HF transformers' forward, on the same text."""
from __future__ import annotations

from pathlib import Path

import torch

from . import layout
from .derive import derive
from .errors import ConversionError
from .mcore_io import load_into
from .model import build, mcore_logits, single_process
from .runtime import ensure_distributed, transformers_reference

SAMPLE_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined a "
    "screw press with movable metal type. Books became cheaper, literacy spread across Europe, and within a "
    "few decades printers were at work in more than two hundred cities. Scholars could compare identical "
    "copies of a text, which changed how knowledge was shared, argued over and corrected."
)


def token_ids(hf_dir: Path, text: str, vocab: int, max_len: int = 128) -> torch.Tensor:
    """Tokenize with the model's tokenizer; tiny test models without one get ids derived from the text bytes."""
    if any((hf_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(hf_dir)(text, return_tensors="pt").input_ids[:, :max_len]
    else:
        data = text.encode()[:max_len]
        ids = torch.tensor([[(b * 131 + i * 7) % vocab for i, b in enumerate(data)]])
    return ids


def checkpoint_dtype(ckpt: Path) -> torch.dtype:
    from megatron.core import dist_checkpointing

    from .untrusted import reading

    with reading():
        meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    return next(v.dtype for k, v in meta.items() if k.endswith("word_embeddings.weight") or "layers" in k)


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Errors of `out` against `ref`; `nonfinite` counts NaN/Inf on each side (any makes the comparison void)."""
    diff = (out - ref).abs()
    return {"max_abs_err": diff.max().item(), "rel_err": (diff.max() / ref.abs().max()).item(),
            "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(), "tokens": ref.shape[1],
            "nonfinite": {"megatron": int((~out.isfinite()).sum()), "hf": int((~ref.isfinite()).sum())}}


def verify(hf_dir: str | Path, mcore_dir: str | Path, device: str = "cpu", text: str = SAMPLE_TEXT,
           family: str | None = None, tol: float = 1e-5) -> dict:
    """HF's logits against those of the model Megatron-LM builds from the checkpoint's megatron_args.sh as written
    (its flags and --spec hook; a training checkpoint's saved args), loaded strictly. Both run in fp32 from the
    same (checkpoint-dtype) weights, so where Megatron-LM represents the model only kernel order differs."""
    from transformers import AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("--device cuda: no CUDA GPU is visible")
    spec = derive(hf_dir, family=family)
    ckpt = layout.find_checkpoint(mcore_dir)
    ns, settings = layout.megatron_view(layout.root_of(ckpt), ckpt)
    if settings is None and ns.get("spec"):  # a training save names the hook without carrying its settings
        settings = spec.hook_settings()
    dt = checkpoint_dtype(ckpt)
    ensure_distributed()
    ns = {**single_process(ns), "bf16": False, "fp16": False}  # fp32 compute from the checkpoint's values
    model = build(ns, settings, device="cpu")
    load_into(model, ckpt)
    model = model.to(device).eval()
    ids = token_ids(hf_dir, text, spec.vocab_size)
    out = mcore_logits(model, ids)[..., : spec.vocab_size].cpu()
    del model
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dt).float().to(device).eval()
    with torch.no_grad(), transformers_reference(hf):
        ref = hf(ids.to(device)).logits.float().cpu()
    report = {"hf": str(hf_dir), "megatron": str(ckpt), "checkpoint_dtype": str(dt).removeprefix("torch."),
              **compare(out, ref), "tolerance": tol, "megatron_lm_gaps": layout.gap_lines(spec, settings)}
    report["ok"] = (not any(report["nonfinite"].values()) and report["rel_err"] <= tol
                    and report["top1_agreement"] == 1.0)
    return report
