"""ModelOpt quantization: argument handling and configuration, and the whole flow as fake quantization on CPU
(ModelOpt runs its quantizers in plain torch there); the CLI itself requires CUDA. GPU runs: benchmarks/gpu_quant.sh."""
import json
import subprocess
import sys

import pytest
import torch

from converter import ConversionError, megatron_model
from converter.quantize import (builtin_texts, quant_config, quantize, quantize_checkpoint, read_texts,
                                token_batches, uncalibrated)

pytest.importorskip("modelopt.torch.quantization")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "converter", *map(str, args)], capture_output=True, text=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cli_needs_cuda(tmp_path):
    for args in (("quantize", "", tmp_path / "q", "--format", "fp8"), ("convert", "", tmp_path / "q", "--quantize", "fp8")):
        r = _cli(*args)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "q").exists()


def test_missing_modelopt_names_the_extra():
    code = ("import sys; sys.modules['modelopt'] = None\n"
            "from converter.quantize import quant_config\n"
            "try:\n    quant_config('fp8')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "ConversionError" in r.stdout and "hf2mcore[quant]" in r.stdout, r.stdout + r.stderr


def test_config_keeps_output_layer_and_routers_unquantized():
    rules = quant_config("fp8")["quant_cfg"]
    assert {"quantizer_name": "*output_layer*", "enable": False} in rules
    assert {"quantizer_name": "*router*", "enable": False} in rules
    assert not any("output_layer" in r.get("quantizer_name", "") for r in
                   quant_config("fp8", quantize_output_layer=True)["quant_cfg"])
    assert quant_config("INT8_DEFAULT_CFG")["quant_cfg"]  # any mtq config name
    with pytest.raises(ConversionError, match="unknown quantization format 'fp7'"):
        quant_config("fp7")


def test_calibration_text(tmp_path, smollm2):
    from transformers import AutoTokenizer

    calib, held_out = builtin_texts("calib"), builtin_texts("eval")
    assert len(calib) > 50 and len(held_out) > 50 and not set(calib) & set(held_out)
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "first document"}\n\n{"text": "second"}\n')
    assert read_texts(f) == ["first document", "second"]
    f.write_text('{"txt": 1}\n')
    with pytest.raises(ConversionError, match=r"c.jsonl:1: not a JSON object with a 'text' field"):
        read_texts(f)
    tok = AutoTokenizer.from_pretrained(smollm2)
    batches = token_batches(tok, calib, 5, 64, 2)
    assert [tuple(b.shape) for b in batches] == [(2, 64), (2, 64), (1, 64)]
    with pytest.raises(ConversionError, match="fewer than one sequence"):
        token_batches(tok, ["two words"], 1, 512, 1)


def test_moe_experts_without_tokens_still_get_scales(tiny_models):
    model = megatron_model(tiny_models("Qwen/Qwen3-30B-A3B"), dtype="bf16").eval()
    # two tokens, top-k 2: at most 4 of each layer's experts see a token
    info = quantize(model, "fp8", [torch.tensor([[5, 17]])])
    idle = info["experts_without_calibration_tokens"]
    assert idle and info["experts"] > len(idle)
    assert uncalibrated(model) == []
    expert = model.get_submodule(idle[0])
    assert expert.linear_fc1.weight_quantizer.amax is not None and expert.linear_fc1.input_quantizer.amax is not None


def test_a_forward_that_raises_leaves_later_models_unquantized(tiny_models):
    """A quantized forward that raises, in calibration or in the report's evaluation, leaves megatron-core's linear
    functions as they were: a fresh model built after it computes what it computed before (ModelOpt alone left its
    quantized function in their place for the process, and every later forward ran through those quantizers)."""
    from converter.quantize import evaluate
    from converter.model import mcore_logits

    hf, ids = tiny_models("meta-llama/Llama-3.2-1B"), torch.tensor([[5, 17, 101, 7, 9]])
    clean = mcore_logits(megatron_model(hf, dtype="bf16").eval(), ids)

    def stop(*_):
        raise RuntimeError("stopped inside a quantized linear")

    def calibrate_then_stop(m):
        mcore_logits(m, ids)
        m.decoder.layers[0].self_attention.linear_qkv.input_quantizer.register_forward_pre_hook(stop)
        mcore_logits(m, ids)

    with pytest.raises(RuntimeError, match="stopped inside"):
        quantize(megatron_model(hf, dtype="bf16").eval(), "fp8", calibrate_then_stop)
    assert torch.equal(mcore_logits(megatron_model(hf, dtype="bf16").eval(), ids), clean)

    model = megatron_model(hf, dtype="bf16").eval()
    quantize(model, "fp8", [ids])
    model.decoder.layers[1].mlp.linear_fc2.input_quantizer.register_forward_pre_hook(stop)
    with pytest.raises(RuntimeError, match="stopped inside"):
        evaluate(model, [ids], 100)
    assert torch.equal(mcore_logits(megatron_model(hf, dtype="bf16").eval(), ids), clean)


@pytest.mark.slow
def test_quantized_checkpoint_reloads_and_exports(smollm2, tmp_path):
    """fp8 on CPU (fake quantization): report, save, reload in a fresh process with the same perplexity, HF export."""
    out, hf_out = tmp_path / "q", tmp_path / "hf"
    r = quantize_checkpoint(smollm2, out, "fp8", calib_size=4, calib_seq_len=64, calib_batch_size=2, eval_size=2,
                            export_hf=hf_out, device="cpu")
    assert r["bf16"]["perplexity"] < 200 and abs(r["perplexity_change_pct"]) < 10, r
    assert 0 < r["quantized"]["rel_logit_err"] < 1 and r["quantized"]["kl_per_token"] > 0
    assert json.loads((out / "quant_report.json").read_text()) == json.loads(json.dumps(r))
    assert (out / "release" / "modelopt_state").is_dir() and (out / "megatron_args.sh").is_file()
    code = (f"from converter.quantize import *\nfrom transformers import AutoTokenizer\n"
            f"m = load_quantized({str(out)!r}, device='cpu')\n"
            f"b = token_batches(AutoTokenizer.from_pretrained({str(smollm2)!r}), builtin_texts('eval'), 2, 64, 2)\n"
            f"print(evaluate(m, b, {49152})[0]['perplexity'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert float(p.stdout.split()[-1]) == pytest.approx(r["quantized"]["perplexity"], rel=1e-6)
    from transformers import AutoConfig

    q = AutoConfig.from_pretrained(hf_out).quantization_config
    assert q["quant_method"] == "modelopt" and q["quant_algo"] == "FP8"
    keys = json.loads((hf_out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.self_attn.q_proj.weight_scale" in keys and "model.layers.0.mlp.down_proj.input_scale" in keys
    with pytest.raises(ConversionError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "qq", "fp8", like=smollm2, device="cpu")
    with pytest.raises(ConversionError, match="--export-hf supports fp8, nvfp4"):
        quantize_checkpoint(smollm2, tmp_path / "q3", "int4_awq", export_hf=tmp_path / "x", device="cpu")


@pytest.mark.slow
def test_a_script_that_quantizes_runs_once(smollm2, tmp_path):
    """A library call from a plain script, without an `if __name__ == "__main__"` guard: saving the quantized
    checkpoint starts no process that runs the script again (megatron-core's default save strategy, which ModelOpt's
    state save used, spawned a manager process, and that imported the script's `__main__` anew)."""
    runs = tmp_path / "runs"
    script = tmp_path / "plain.py"
    script.write_text(f"with open({str(runs)!r}, 'a') as f:\n    f.write('started\\n')\n"
                      "from converter.quantize import quantize_checkpoint\n"
                      f"quantize_checkpoint({str(smollm2)!r}, {str(tmp_path / 'q')!r}, 'fp8', calib_size=1, "
                      "calib_seq_len=16, calib_batch_size=1, eval_size=1, device='cpu')\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert runs.read_text() == "started\n"
    assert (tmp_path / "q" / "release" / "modelopt_state" / "metadata.json").is_file()


@pytest.mark.gpu
def test_cli_quantizes_on_cuda(smollm2, tmp_path):
    r = _cli("quantize", smollm2, tmp_path / "q", "--format", "fp8", "--calib-size", "8", "--calib-seq-len", "128",
             "--export-hf", tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    # fp8 costs this Q4_1-sourced 135M model about 3-5 % perplexity, as ModelOpt on the HF model does
    # (benchmarks/RESULTS.md); a broken conversion or calibration costs far more
    assert 0 < report["perplexity_change_pct"] < 10 and report["quantized"]["kl_per_token"] < 0.2, report
    assert (tmp_path / "hf" / "hf_quant_config.json").is_file()
    print(json.dumps({k: report[k] for k in ("perplexity_change_pct", "bf16", "quantized")}))
