"""Every boolean field of a family's transformers config class flipped, and a few other fields changed, on the tests'
tiny model: each variant must convert and verify (logits against HF), or be refused by name. A variant whose
conversion verifies wrong is a silent error: the kind session 23 found six of (fields the modeling code never reads,
yarn's attention factor, Qwen's max_window_layers, DeepSeek's interleave and latent-norm eps, Nemotron-H's tie).

    .venv/bin/python scripts/config_variants.py meta-llama/Llama-2-7b-hf deepseek-ai/DeepSeek-V3 ...

(names of tests/conftest.py's FAMILY_CONFIGS; none given: all of them). Prints one line per variant and exits 1 if
any verified wrong or crashed. A variant transformers itself cannot build or run is said as such, not counted.
"""
import contextlib
import copy
import io
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parents[1])]

from conftest import FAMILY_CONFIGS  # noqa: E402
from tiny import make_model, tiny_config  # noqa: E402

from converter import ConversionError, convert, verify  # noqa: E402
from converter.derive import derive  # noqa: E402

# config fields that change no weight or forward
BOOKKEEPING = {"return_dict", "output_hidden_states", "torchscript", "use_cache", "tie_encoder_decoder", "is_decoder",
               "add_cross_attention", "output_attentions", "is_encoder_decoder", "use_bfloat16", "output_router_logits",
               "tf_legacy_loss"}
CHANGED = [("partial_rotary_factor", 0.5), ("head_dim", 32), ("sliding_window", 16), ("rope_theta", 12345.0),
           ("rms_norm_eps", 1e-3), ("layer_norm_epsilon", 1e-3), ("num_key_value_heads", 1), ("vocab_size", 385),
           ("max_position_embeddings", 64), ("intermediate_size", 80)]


def variants(name: str) -> list[dict]:
    from transformers import CONFIG_MAPPING

    base = tiny_config(name)
    defaults = CONFIG_MAPPING[base["model_type"]]().to_dict()
    flips = [{k: not base.get(k, v)} for k, v in defaults.items()
             if isinstance(v, bool) and k not in BOOKKEEPING and not k.startswith("_")]
    return flips + [{k: v} for k, v in CHANGED]


def reference(hf: Path) -> None:
    """transformers' own forward of the variant (some changes break it: then there is nothing to compare with)."""
    import torch
    from transformers import AutoModelForCausalLM

    from converter.runtime import transformers_reference

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad(), transformers_reference(model):
        model(torch.tensor([[1, 2, 3, 4]]))


def judge(name: str, change: dict, work: Path) -> str:
    shutil.rmtree(work, ignore_errors=True)
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
    quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    with quiet:
        try:
            hf = make_model({**copy.deepcopy(tiny_config(name)), **change}, work / "hf")
            reference(hf)
        except Exception as exc:  # (transformers refuses or cannot run the variant itself)
            return f"transformers cannot run it ({type(exc).__name__})"
        try:
            said = " ".join(derive(hf).warnings)
            r = verify(hf, convert(hf, work / "mc", dtype="fp32", progress=False, exact=True))
        except ConversionError as exc:
            return f"refused: {str(exc)[:160]}"
        except Exception as exc:
            return f"CRASH {type(exc).__name__}: {str(exc)[:160]}"
    if r["ok"]:
        return "ok"
    error = f"rel err {r['rel_err']:.2e}, top-1 {r['top1_agreement']:.2f}"
    # a difference the output names (a WARNING line about the changed field) is said, not silent
    return f"differs, and a warning says so: {error}" if any(f"{k}=" in said for k in change) else f"WRONG: {error}"


def main() -> int:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in sys.argv[1:] or FAMILY_CONFIGS:
            for change in variants(name):
                verdict = judge(name, change, Path(tmp) / "v")
                bad += verdict.startswith(("WRONG", "CRASH"))
                print(f"{name} {change}: {verdict}", flush=True)
    print(f"{bad} variant(s) verified wrong or crashed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
