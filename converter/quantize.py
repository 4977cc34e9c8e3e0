"""Post-training quantization with NVIDIA ModelOpt on the megatron-core model: calibrate, report quality, save.

The model is the same GPTModel the converter targets (local spec, per-expert MoE), filled straight from HF or from
a torch_dist checkpoint. ModelOpt does the quantization (`mtq.quantize`), its sharded `modelopt_state` save/restore
and its HF deployment export; this module supplies data, the quality report and the checkpoint layout.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import ConversionError
from .model import mcore_logits

FORMATS = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq": "INT4_AWQ_CFG",
           "w4a8_awq": "W4A8_AWQ_BETA_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}
HF_EXPORT_FORMATS = ("fp8", "nvfp4")
# Built-in corpus, no download: English docstrings of the standard library; evaluation uses other modules.
CALIB_MODULES = ("collections", "functools", "itertools", "json", "argparse", "pathlib", "subprocess", "threading",
                 "logging", "unittest", "decimal", "fractions", "statistics", "random", "datetime", "calendar",
                 "textwrap", "difflib", "email.message", "http.client", "asyncio", "inspect", "tokenize", "ast")
EVAL_MODULES = ("csv", "sqlite3", "zipfile", "tarfile", "shutil", "heapq", "bisect", "contextlib", "dataclasses",
                "enum", "typing", "socket", "urllib.request", "pickle", "copy", "pprint", "string", "re", "os",
                "io", "tempfile", "glob", "fnmatch", "queue")


def _mtq():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError:
        raise ConversionError("quantization needs NVIDIA ModelOpt: pip install 'hf2mcore[quant]' "
                              "(nvidia-modelopt 0.47)") from None
    return mtq


def quant_config(fmt: str, quantize_output_layer: bool = False) -> dict:
    """The ModelOpt config for a short format name or any `mtq` config name; the output layer and MoE routers
    stay unquantized unless `quantize_output_layer`."""
    mtq = _mtq()
    name = FORMATS.get(fmt, fmt)
    cfg = getattr(mtq, name, None)
    if not isinstance(cfg, dict) or "quant_cfg" not in cfg:
        known = sorted(n for n in dir(mtq) if n.endswith("_CFG"))
        raise ConversionError(f"unknown quantization format {fmt!r}; use {', '.join(FORMATS)} or one of {known}")
    cfg = copy.deepcopy(cfg)
    rules = list(cfg["quant_cfg"])
    if quantize_output_layer:
        rules = [r for r in rules if not any(s in str(r.get("quantizer_name", "")) for s in ("output_layer", "lm_head"))]
    else:
        rules.append({"quantizer_name": "*output_layer*", "enable": False})
    rules.append({"quantizer_name": "*router*", "enable": False})
    cfg["quant_cfg"] = rules
    return cfg


@contextlib.contextmanager
def linear_functions_kept():
    """megatron-core's linear functions as they were, whatever happens inside.

    For each forward, ModelOpt's quantized linears put a function of their own (bound to their quantizers) in place of
    megatron-core's `linear_with_grad_accumulation_and_async_allreduce` and put the original back when the forward
    returns, not when it raises (modelopt's replace_function has no try/finally). A forward that raised (out of
    memory in calibration, a format the device cannot run, Ctrl-C) left it there for the whole process: every later
    forward of any model, a fresh unquantized one included, then ran through the failed model's quantizers."""
    from megatron.core.tensor_parallel import layers

    before = dict(vars(layers))
    try:
        yield
    finally:
        for name in vars(layers).keys() - before.keys():
            delattr(layers, name)
        for name, value in before.items():
            if vars(layers).get(name) is not value:
                setattr(layers, name, value)


# ---- text -----------------------------------------------------------------------------------------------
def builtin_texts(split: str) -> list[str]:
    """Docstrings of standard-library modules and of the classes and functions they define; the evaluation
    split shares no text with the calibration split."""
    import importlib
    import inspect

    def docs(modules):
        out = []
        for name in modules:
            mod = importlib.import_module(name)
            members = [getattr(mod, n) for n in sorted(dir(mod)) if not n.startswith("_")]
            own = [m for m in members if (inspect.isclass(m) or inspect.isroutine(m))
                   and getattr(m, "__module__", None) == name]
            out += [d for d in map(inspect.getdoc, [mod, *own]) if d and len(d) > 200 and d not in out]
        return out

    calib = docs(CALIB_MODULES)
    if split == "calib":
        return calib
    seen = set(calib)
    return [d for d in docs(EVAL_MODULES) if d not in seen]


def read_texts(path: str | Path) -> list[str]:
    """Plain text (paragraphs), or JSONL with a `text` field."""
    path = Path(path)
    try:
        raw = path.read_text()
    except OSError as exc:
        raise ConversionError(f"cannot read calibration data {path}: {exc}") from exc
    if path.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConversionError(f"{path}:{i}: not a JSON object with a 'text' field") from None
    else:
        texts = [p for p in raw.split("\n\n") if p.strip()]
    if not texts:
        raise ConversionError(f"{path} holds no text")
    return texts


def token_batches(tokenizer, texts: list[str], n: int, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """n sequences of seq_len tokens cut from the concatenated texts, in batches."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False).input_ids + sep
        if len(ids) >= n * seq_len:
            break
    n = min(n, len(ids) // seq_len)
    if n == 0:
        raise ConversionError(f"the text gives {len(ids)} tokens, fewer than one sequence of {seq_len}")
    seqs = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return list(seqs.split(batch_size))


# ---- running the model ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches: list[torch.Tensor], vocab: int, ref: list[torch.Tensor] | None = None) -> tuple[dict, list]:
    """Perplexity on `batches`; with `ref` (the unquantized logits) also relative logit error and mean KL."""
    nll, count, logits_out = 0.0, 0, []
    worst, scale, kl = 0.0, 0.0, 0.0
    with linear_functions_kept():
        for i, ids in enumerate(batches):
            logits = mcore_logits(model, ids)[..., :vocab].float()
            target = ids[:, 1:].to(logits.device)
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="sum").item()
            count += target.numel()
            if ref is None:
                logits_out.append(logits)
                continue
            r = ref[i].to(logits.device)
            worst, scale = max(worst, (logits - r).abs().max().item()), max(scale, r.abs().max().item())
            kl += F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(r, -1).flatten(0, 1),
                           log_target=True, reduction="sum").item()
    out = {"perplexity": math.exp(nll / count), "tokens": count}
    if ref is not None:
        out.update(rel_logit_err=worst / scale, kl_per_token=kl / sum(b.numel() for b in batches))
    return out, logits_out


class ExpertTokens:
    """Counts the tokens each MoE expert sees during calibration (forward hooks on megatron-core's experts)."""

    def __init__(self, model):
        self.counts: dict[str, int] = {}
        self.handles = []
        for name, mod in model.named_modules():
            for i, expert in enumerate(getattr(mod, "local_experts", None) or []):
                key = f"{name}.local_experts.{i}"
                self.counts[key] = 0
                self.handles.append(expert.register_forward_hook(self._hook(key)))

    def _hook(self, key):
        def hook(_, args, __):
            self.counts[key] += args[0].shape[0]
        return hook

    def idle(self) -> list[str]:
        return [k for k, v in self.counts.items() if v == 0]

    def close(self):
        for h in self.handles:
            h.remove()


def uncalibrated(model) -> list[str]:
    """Enabled static quantizers without a scale (amax)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [n for n, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled
            and not q.is_mx_format and getattr(q, "_amax", None) is None
            and not (getattr(q, "_dynamic", False) and (q.block_sizes or {}).get("scale_bits") is None)]


def quantize(model, fmt: str, calib: Callable | list[torch.Tensor], *, quantize_output_layer: bool = False) -> dict:
    """Quantize `model` in place with ModelOpt. `calib`: a forward loop `f(model)` or a list of token batches.

    Experts that see no calibration tokens get their input scales from the other experts of their layer and
    weight scales from their own weights (ModelOpt's sync_moe_expert_amax); they are reported, and any quantizer
    still without a scale stops the run by name."""
    mtq = _mtq()
    from modelopt.torch.quantization.utils import sync_moe_expert_amax

    cfg = quant_config(fmt, quantize_output_layer)
    loop = calib if callable(calib) else (lambda m: [mcore_logits(m, ids) for ids in calib])
    counter = ExpertTokens(model)
    try:
        with linear_functions_kept():
            mtq.quantize(model, cfg, loop)
    finally:
        counter.close()
    for _, mod in model.named_modules():
        if getattr(mod, "local_experts", None) is not None:
            sync_moe_expert_amax(mod.local_experts)
    missing = uncalibrated(model)
    if missing:
        raise ConversionError(f"{len(missing)} quantizers have no scale after calibration: {missing[:5]}")
    return {"format": fmt, "config": FORMATS.get(fmt, fmt), "experts": len(counter.counts),
            "experts_without_calibration_tokens": counter.idle()}


# ---- the command: source -> quantized checkpoint (+ HF deployment export) + report ---------------------------
def _source(src: Path, like: Path | None, device: str, family: str | None):
    """(spec, model, HF directory for the tokenizer and config) for an HF directory or a Megatron checkpoint."""
    from . import layout
    from .derive import derive
    from .live import megatron_model
    from .mcore_io import load_into
    from .runtime import ensure_distributed

    if (src / "config.json").is_file():
        spec = derive(src, family=family)
        return spec, megatron_model(src, device=device, dtype="bf16", family=family), like or src
    ckpt = layout.find_checkpoint(src)
    if (ckpt / "modelopt_state").is_dir():
        raise ConversionError(f"{src} is already quantized (it has modelopt_state/); start from the unquantized model")
    root = layout.root_of(ckpt)
    hf_src = layout.manifest(root).get("source")
    hf_dir = like or (Path(hf_src) if hf_src and Path(hf_src).is_dir() else None)
    if hf_dir is None:
        raise ConversionError(f"{src}: pass --like HF_DIR (the tokenizer and config.json of the model)")
    spec = layout.checkpoint_spec(root, ckpt, like, family)[0]
    ensure_distributed()
    model = spec.build_model(device=device, dtype=torch.bfloat16)
    load_into(model, ckpt)
    return spec, model, hf_dir


def _require_cuda(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConversionError("quantization needs a CUDA GPU (ModelOpt's calibrated kernels); none is visible")


def quantize_checkpoint(src: str | Path, out_dir: str | Path, fmt: str, *, like: str | Path | None = None,
                        calib_data: str | Path | None = None, calib_size: int = 128, calib_seq_len: int = 512,
                        calib_batch_size: int = 4, eval_data: str | Path | None = None, eval_size: int = 8,
                        export_hf: str | Path | None = None, quantize_output_layer: bool = False,
                        overwrite: bool = False, device: str = "cuda", family: str | None = None) -> dict:
    """Quantize an HF directory or a Megatron checkpoint; save the quantized Megatron checkpoint (torch_dist +
    modelopt_state/ + argument file + quant_report.json) and, for fp8/nvfp4, an HF deployment checkpoint."""
    from transformers import AutoTokenizer

    from .atomic import atomic_dir, refuse_existing
    from .mcore_io import save_model, sync_save_strategy

    _require_cuda(device)
    _mtq()
    src, out_dir = Path(src), Path(out_dir)
    like = Path(like) if like else None
    export_hf = Path(export_hf) if export_hf else None
    if export_hf is not None and fmt not in HF_EXPORT_FORMATS:
        raise ConversionError(f"--export-hf supports {', '.join(HF_EXPORT_FORMATS)}, not {fmt}")
    quant_config(fmt)  # unknown formats stop before any work
    refuse_existing(out_dir, overwrite, (src, like))
    if export_hf is not None:
        refuse_existing(export_hf, overwrite, (src, like, out_dir))
    calib_texts = read_texts(calib_data) if calib_data else builtin_texts("calib")
    eval_texts = read_texts(eval_data) if eval_data else builtin_texts("eval")

    spec, model, hf_dir = _source(src, like, device, family)
    model.eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    calib = token_batches(tok, calib_texts, calib_size, calib_seq_len, calib_batch_size)
    evalb = token_batches(tok, eval_texts, eval_size, calib_seq_len, calib_batch_size)
    base, ref = evaluate(model, evalb, spec.vocab_size)
    info = quantize(model, fmt, calib, quantize_output_layer=quantize_output_layer)
    _mtq().print_quant_summary(model)
    quant, _ = evaluate(model, evalb, spec.vocab_size, ref)
    del ref
    report = {**info, "source": str(src), "calibration": {
        "data": str(calib_data or "built-in (standard-library docstrings)"), "sequences": sum(len(b) for b in calib),
        "seq_len": calib_seq_len, "batch_size": calib_batch_size},
        "evaluation": {"data": str(eval_data or "built-in (other standard-library modules)"), "tokens": base["tokens"]},
        "bf16": {"perplexity": base["perplexity"]}, "quantized": quant,
        "perplexity_change_pct": 100 * (quant["perplexity"] / base["perplexity"] - 1)}

    def extra(release: Path) -> None:
        from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

        save_sharded_modelopt_state([model], str(release), sharded_strategy=sync_save_strategy())
        (release.parent / "quant_report.json").write_text(json.dumps(report, indent=2))

    if export_hf is not None:
        from modelopt.torch.export import export_mcore_gpt_to_hf

        with atomic_dir(export_hf, overwrite, inputs=(src, like, out_dir)) as tmp:
            export_mcore_gpt_to_hf(model, str(hf_dir), dtype=torch.bfloat16, export_dir=str(tmp))
        report["export_hf"] = str(export_hf)
    save_model(model, out_dir, spec, overwrite=overwrite, extra=extra)
    return report


def load_quantized(ckpt_dir: str | Path, device: str = "cuda", family: str | None = None):
    """A quantized checkpoint written by `quantize_checkpoint`, in a fresh process: restore ModelOpt's state
    (the quantizer modules), then the weights and scales."""
    from unittest import mock

    from modelopt.torch.opt.plugins import mcore_dist_checkpointing as mcd

    from . import layout
    from .mcore_io import load_into
    from .runtime import cpu_patches, ensure_distributed
    from .untrusted import load_plain, reading

    _mtq()
    ckpt = layout.find_checkpoint(ckpt_dir)
    spec = layout.checkpoint_spec(layout.root_of(ckpt), ckpt, family=family)[0]
    ensure_distributed()
    model = spec.build_model(device=device, dtype=torch.bfloat16)
    with torch.no_grad():  # restoring runs the weight quantizers once (to size their scales): weights must be
        for p in model.parameters():  # finite, not the uninitialised memory build_model leaves; load overwrites them
            p.zero_()
    # ModelOpt's state is unpickled too: DCP's byte items, or a legacy common.pt through its safe_load (which
    # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns into a plain pickle.load): all through the allow-lists
    plain = mock.patch.object(mcd, "safe_load", lambda f, **kw: load_plain(f, "modelopt_state"))
    with cpu_patches(), reading(), plain:
        mcd.restore_sharded_modelopt_state([model], str(ckpt))
    load_into(model, ckpt)
    return model.eval()
