"""convert / verify / export on tiny models of every supported family, the real SmolLM2, and bad input."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import FAMILY_CONFIGS
from tiny import make_model, tiny_config
from converter import ConversionError
from converter.convert import convert
from converter.export import export
from converter.verify import verify


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_bit_exact(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_bf16_round_trip_is_bit_exact(name, tiny_models, tmp_path):
    """bf16 both ways; verify checks the model Megatron-LM builds from the written file (with --exact, the hook
    covers what the flags cannot say; test_megatron_lm.py has Megatron-LM itself judge both)."""
    hf = tiny_models(name, "bf16")
    out = convert(hf, tmp_path / "mc", dtype="bf16", progress=False, exact=True)
    assert_bit_exact(hf, export(out, tmp_path / "back", progress=False))
    assert verify(hf, out)["ok"]


@pytest.mark.parametrize("scaling", [{"attention_factor": 1.3, "mscale_all_dim": 0.5}, {"mscale": 0.707},
                                     {"mscale_all_dim": 0.5}])
def test_yarn_attention_factor_as_hf_computes_it(scaling, tmp_path):
    """HF scales yarn's cos and sin by attention_factor if given, by g(mscale) / g(mscale_all_dim) only where both
    are set, else by g(1); megatron-core always by that ratio: the written --mscale gives it HF's factor."""
    cfg = tiny_config("Qwen/Qwen3-8B#yarn")
    cfg["rope_scaling"] = {**cfg["rope_scaling"], **scaling}
    _assert_verifies(make_model(cfg, tmp_path / "hf"), tmp_path)


@pytest.mark.parametrize("name,field,value", [("meta-llama/Llama-2-7b-hf", "sliding_window", 16),
                                              ("meta-llama/Llama-2-7b-hf", "partial_rotary_factor", 0.5),
                                              ("deepseek-ai/DeepSeek-V2-Lite", "norm_topk_prob", True),
                                              ("nvidia/Nemotron-H-56B-Base-8K", "tie_word_embeddings", True)])
def test_fields_the_modeling_code_does_not_read(name, field, value, tmp_path):
    """Llama's modeling code reads neither of the first two (whole-sequence attention, rope on every dimension),
    DeepSeek-V2's router never renormalises its top-k, Nemotron-H ties no weights (its lm_head, saved, was dropped):
    converted as transformers runs them, with a warning that names the field."""
    from converter.derive import derive

    hf = make_model({**tiny_config(name), field: value}, tmp_path / "hf")
    spec = derive(hf)
    assert any(w.startswith(f"{field}={value}: {spec.architecture}'s modeling code") for w in spec.warnings)
    _assert_verifies(hf, tmp_path)


@pytest.mark.parametrize("change", [{"layer_norm_epsilon": 1e-3}, {"rms_norm_eps": 1e-3}])
def test_nemotron_h_norm_epsilon(change, tmp_path):
    """Nemotron-H reads layer_norm_epsilon everywhere, the Mamba mixer's gated norm included (megatron-core's fixes
    1e-5: the hook's mixer takes --norm-epsilon), and ignores a stray rms_norm_eps (derive takes the field
    transformers' config class has)."""
    _assert_verifies(make_model({**tiny_config("nvidia/Nemotron-H-56B-Base-8K"), **change}, tmp_path / "hf"), tmp_path)


@pytest.mark.parametrize("name, change", [("Qwen/Qwen2.5-7B", {"max_window_layers": 1}),  # the second of two
                                          ("Qwen/Qwen2.5-7B", {"max_window_layers": None}),  # (28: none)
                                          ("openai/gpt-oss-20b", {})])  # every other layer
def test_sliding_window_without_layer_types(name, change, tmp_path):
    """Configs as published carry no layer_types: with a sliding window, transformers' config class says which
    layers slide (Qwen2: from max_window_layers, or its default, on; gpt-oss: every other one), beyond a window
    shorter than verify's text."""
    cfg = {**tiny_config(name), "use_sliding_window": True, "sliding_window": 16, **change}
    hf = make_model({k: v for k, v in cfg.items() if v is not None}, tmp_path / "hf")
    written = json.loads((hf / "config.json").read_text())
    del written["layer_types"]
    (hf / "config.json").write_text(json.dumps({k: v for k, v in written.items() if change.get(k, 0) is not None}))
    _assert_verifies(hf, tmp_path)


def test_dynamic_rope_agrees_up_to_max_position_embeddings(tmp_path):
    """HF's dynamic NTK rope is plain rope until the sequence outgrows max_position_embeddings: converted as plain
    rope with a warning; the logits agree within that length and differ beyond it (verify's text: 160 tokens)."""
    from converter.derive import derive

    dynamic = {**tiny_config("meta-llama/Llama-2-7b-hf"), "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    hf = make_model({**dynamic, "max_position_embeddings": 4096}, tmp_path / "hf")
    assert any(w.startswith("rope_scaling dynamic") for w in derive(hf).warnings)
    _assert_verifies(hf, tmp_path)
    short = make_model({**dynamic, "max_position_embeddings": 64}, tmp_path / "short")
    assert verify(short, convert(short, tmp_path / "mc-short", dtype="fp32", progress=False))["rel_err"] > 1e-3


def test_longrope_with_partial_rotary(tmp_path):
    """Phi-4-mini's layout: longrope on part of each head (partial_rotary_factor): under --exact the hook's
    frequencies and attention factor cover the rotated dimensions only, as HF's do."""
    cfg = {**tiny_config("microsoft/Phi-3-mini-4k-instruct#longrope"), "partial_rotary_factor": 0.5,
           "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 2.5], "long_factor": [2.0, 4.0]}}
    hf = make_model(cfg, tmp_path / "hf")
    assert verify(hf, convert(hf, tmp_path / "mc", dtype="fp32", progress=False, exact=True))["ok"]


def test_hook_patches_follow_each_build():
    """The hook's process-wide patches (llama3 constants, longrope frequencies, the output soft-cap) are those of
    the latest build's settings: a second build (another virtual pipeline stage) does not stack them, a build
    without them gets megatron-core's own rope and GPTModel again."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel

    from converter import megatron_hooks
    from converter.derive import derive
    from converter.model import HookConfig, transformer_config
    from converter.runtime import ensure_distributed

    ensure_distributed()
    config = transformer_config(derive(tiny_config("meta-llama/Llama-3.1-8B")).megatron_namespace())
    inv_freq = lambda: RotaryEmbedding(8, 1.0, rope_scaling=True, use_cpu_initialization=True).inv_freq  # noqa: E731
    stock = inv_freq()
    llama3 = {"llama3": {"low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 64}}
    try:
        megatron_hooks.layer_spec(config, settings=llama3)
        once = inv_freq()
        megatron_hooks.layer_spec(config, settings=llama3)
        assert torch.equal(inv_freq(), once) and not torch.equal(once, stock)
        megatron_hooks.layer_spec(config, settings={"rope_inv_freq": [1.0, 0.5, 0.25, 0.125]})
        assert inv_freq().tolist() == [1.0, 0.5, 0.25, 0.125]
        long = {"rope_inv_freq": [1.0, 0.5, 0.25, 0.125], "rope_long": {"inv_freq": [0.5, 0.25, 0.2, 0.1],
                                                                        "beyond": 64}}
        megatron_hooks.layer_spec(HookConfig(config, 65), settings=long)  # a training sequence beyond 64
        assert inv_freq().tolist() == pytest.approx([0.5, 0.25, 0.2, 0.1])
        megatron_hooks.layer_spec(HookConfig(config, 64), settings=long)
        assert inv_freq().tolist() == [1.0, 0.5, 0.25, 0.125]
        stock_init = GPTModel.__init__
        for _ in range(2):
            megatron_hooks.layer_spec(config, settings={"final_logit_softcap": 2.0})
            assert GPTModel.__init__.hf2mcore_original is stock_init
    finally:
        megatron_hooks.layer_spec(config, settings={})
    assert torch.equal(inv_freq(), stock) and GPTModel.__init__ is stock_init


def test_longrope_factors_follow_the_training_sequence_length(tiny_models, tmp_path):
    """HF's longrope takes its long factors for a sequence longer than the original context (64 in the tiny
    model), the short ones else; a Megatron model has one set: the hook's long ones where --seq-length is longer
    (as written: 256), the short ones where the user trains at up to 64. HF agrees on sequences on that side."""
    from converter.verify import SAMPLE_TEXT

    hf = tiny_models("microsoft/Phi-3-mini-4k-instruct#longrope")
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False, exact=True)
    assert verify(hf, out)["ok"]  # 128 tokens
    args = out / "megatron_args.sh"
    assert "    --seq-length 256\n" in args.read_text()
    args.write_text(args.read_text().replace("    --seq-length 256\n", "    --seq-length 64\n"))
    assert verify(hf, out, text=SAMPLE_TEXT[:48])["ok"]
    assert verify(hf, out)["rel_err"] > 1e-3  # the short factors, for a sequence HF runs with the long ones


def _assert_verifies(hf, tmp_path):
    """Converted at fp32 as written (no --exact), the model Megatron-LM builds from it computes HF's logits."""
    r = verify(hf, convert(hf, tmp_path / "mc", dtype="fp32", progress=False))
    assert r["ok"], r


def test_smollm2_real_model(smollm2, tmp_path):
    out = convert(smollm2, tmp_path / "mc", dtype="fp32", progress=False)
    r = verify(smollm2, out)
    assert r["rel_err"] < 1e-5 and r["top1_agreement"] == 1.0 and r["tokens"] > 50, r
    back = export(out, tmp_path / "back", like=smollm2, progress=False)
    assert_bit_exact(smollm2, back)
    assert (back / "tokenizer.json").is_file()
    args = (out / "megatron_args.sh").read_text()
    assert "--num-query-groups 3" in args and "--untie-embeddings-and-output-weights" not in args


def test_verify_judges_the_written_file(tiny_models, tmp_path):
    """Without --exact, Llama-3.2's file gives Megatron-LM rope factor 8: verify builds that model, fails, and
    names the gap; the CLI says so and exits 1."""
    hf = tiny_models("meta-llama/Llama-3.2-1B")
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    r = verify(hf, out)
    assert not r["ok"] and r["rel_err"] > 1e-4 and r["megatron_lm_gaps"][0].startswith("rope_scaling.factor")
    c = _cli("verify", hf, out)
    assert c.returncode == 1 and "FAILED" in c.stdout and "rope_scaling.factor" in c.stdout, c.stdout + c.stderr


def test_smollm2_bf16_round_trip(smollm2, tmp_path):
    src = tmp_path / "bf16"
    shutil.copytree(smollm2, src, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in _tensors(smollm2).items()}, str(src / "model.safetensors"))
    out = convert(src, tmp_path / "mc", dtype="bf16", progress=False)
    back = export(out, tmp_path / "back", like=src, progress=False, shard_size="100MB")
    assert (back / "model.safetensors.index.json").is_file()  # sharded
    assert_bit_exact(src, back)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "converter", *map(str, args)], capture_output=True, text=True)


def _copy(hf, dst):
    shutil.copytree(hf, dst)
    return dst


def test_existing_output_needs_overwrite(tiny_models, tmp_path):
    hf = tiny_models("meta-llama/Llama-2-7b-hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    r = _cli("convert", hf, tmp_path / "out", "--no-progress")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (tmp_path / "out" / "keep").read_text() == "x"
    r = _cli("convert", hf, tmp_path / "out", "--no-progress", "--overwrite")
    assert r.returncode == 0 and not (tmp_path / "out" / "keep").exists()


def test_the_printed_use_line_runs_in_a_shell(tiny_models, tmp_path):
    """The command convert prints is pasted into a shell: an output path with a space, a quote and a `$` still
    sources the argument file and loads that directory."""
    hf = tiny_models("meta-llama/Llama-2-7b-hf")
    out = tmp_path / "a b" / "it's $HOME"
    r = _cli("convert", hf, out, "--no-progress")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[0]
    use = line[line.index("(Megatron-LM: ") + len("(Megatron-LM: "):].removesuffix(")")
    # torchrun stands in as a function that prints its arguments; the elision marks ("...") are its arguments too
    got = subprocess.run(["bash", "-c", 'torchrun() { printf "%s\\0" "$@"; }\n' + use], capture_output=True,
                         text=True, check=True).stdout.split("\0")
    assert got[got.index("--load") + 1] == str(out.resolve())
    assert "--num-layers" in got and "pretrain_gpt.py" in got


def _assert_fails_cleanly(hf, tmp_path, match):
    r = _cli("convert", hf, tmp_path / "out", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp leftovers


def test_truncated_safetensors(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_fails_cleanly(hf, tmp_path, "model.safetensors")


def test_corrupt_header(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    (hf / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    _assert_fails_cleanly(hf, tmp_path, "cannot read")


def _rewrite(hf, fn):
    from safetensors.torch import save_file

    t = _tensors(hf)
    fn(t)
    save_file(t, str(hf / "model.safetensors"))


def test_missing_tensor_is_named(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    _rewrite(hf, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _assert_fails_cleanly(hf, tmp_path, "model.layers.1.self_attn.k_proj.weight")


def test_unused_tensor_is_named(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    _rewrite(hf, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    _assert_fails_cleanly(hf, tmp_path, "model.layers.0.mystery.weight")


def test_wrong_shape_is_named(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    _rewrite(hf, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)}))
    _assert_fails_cleanly(hf, tmp_path, "decoder.layers.0.mlp.linear_fc1.weight")


def test_quantized_source_is_refused(tiny_models, tmp_path):
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq"}
    (hf / "config.json").write_text(json.dumps(cfg))
    _assert_fails_cleanly(hf, tmp_path, "quant_method='awq'")
    cfg["quantization_config"] = {"quant_method": "mxfp4"}  # supported, but these weights are not mxfp4
    (hf / "config.json").write_text(json.dumps(cfg))
    _assert_fails_cleanly(hf, tmp_path, "no *_blocks tensors")


def _fp8_blocks(w, block):
    """Block-wise fp8 as DeepSeek-V3 ships it, and the float values it stands for (the test's own oracle)."""
    b0, b1 = block
    rows, cols = (-(-n // b) for n, b in zip(w.shape, block))
    padded = torch.zeros(rows * b0, cols * b1)
    padded[: w.shape[0], : w.shape[1]] = w
    scale = padded.reshape(rows, b0, cols, b1).abs().amax(dim=(1, 3)) / 448
    full = scale.repeat_interleave(b0, 0)[: w.shape[0]].repeat_interleave(b1, 1)[:, : w.shape[1]]
    w8 = (w / full).to(torch.float8_e4m3fn)
    return w8, scale, w8.float() * full


def _mxfp4(w):
    """[E, in, out] floats -> gpt-oss's MXFP4 blocks [E, out, in/32, 16] and scales, and the values they encode."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    t = w.transpose(1, 2)
    g = t.reshape(*t.shape[:2], -1, 32)
    exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp(min=1e-30) / 6)).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    idx = (scaled.abs()[..., None] - lut).abs().argmin(-1)
    code = idx + 8 * (scaled < 0)
    values = (lut[idx] * torch.where(scaled < 0, -1.0, 1.0) * torch.exp2(exp)[..., None]).reshape(t.shape)
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks, (exp + 127).to(torch.uint8), values.transpose(1, 2).contiguous()


def test_mxfp4_source_is_dequantized(tiny_models, tmp_path):
    """gpt-oss's MXFP4 experts (blocks + scales, [experts, out, in]) convert to the values they encode."""
    src = tiny_models("openai/gpt-oss-20b")
    quant, deq = _copy(src, tmp_path / "mxfp4"), _copy(src, tmp_path / "deq")
    q_t, d_t = {}, {}
    for k, t in _tensors(src).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q_t[k + "_blocks"], q_t[k + "_scales"], d_t[k] = _mxfp4(t)
        else:
            q_t[k] = d_t[k] = t
    save_file(q_t, str(quant / "model.safetensors"))
    save_file(d_t, str(deq / "model.safetensors"))
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (quant / "config.json").write_text(json.dumps(cfg))
    out = convert(quant, tmp_path / "mc", dtype="fp32", progress=False)
    assert_bit_exact(deq, export(out, tmp_path / "back", like=deq, progress=False))
    assert verify(deq, out)["ok"]
    from converter import derive
    from converter.dequant import open_source

    name = next(k for k in d_t if k.endswith("experts.down_proj"))
    assert torch.equal(open_source(quant, derive(quant)).get(name + "[1]"), d_t[name][1])


def test_fp8_block_source_is_dequantized(tiny_models, tmp_path):
    """DeepSeek-V3-style fp8 weights + weight_scale_inv (blocks of 16, some partial) convert to the values they
    stand for: the export equals an fp32 checkpoint of the dequantized values, logits match HF on it, and the
    live loader reads boxes of rows across block edges the same way."""
    src = tiny_models("deepseek-ai/DeepSeek-V3")
    quant, deq = _copy(src, tmp_path / "fp8"), _copy(src, tmp_path / "deq")
    q_t, d_t = {}, {}
    for k, t in _tensors(src).items():
        if t.ndim == 2 and ".layers." in k and not k.endswith("gate.weight"):  # every linear but the router
            q_t[k], q_t[k + "_scale_inv"], d_t[k] = _fp8_blocks(t, (16, 16))
        else:
            q_t[k] = d_t[k] = t
    assert sum(v.dtype == torch.float8_e4m3fn for v in q_t.values()) > 10
    save_file(q_t, str(quant / "model.safetensors"))
    save_file(d_t, str(deq / "model.safetensors"))
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16],
                                  "activation_scheme": "dynamic"}
    (quant / "config.json").write_text(json.dumps(cfg))
    out = convert(quant, tmp_path / "mc", dtype="fp32", progress=False)
    assert_bit_exact(deq, export(out, tmp_path / "back", like=deq, progress=False))
    assert verify(deq, out)["ok"]
    from converter import derive
    from converter.dequant import open_source

    hf = open_source(quant, derive(quant))
    name = next(k for k, v in q_t.items() if v.dtype == torch.float8_e4m3fn and min(v.shape) >= 40)
    assert torch.equal(hf.get_slice(name, (slice(13, 37), slice(5, 40))), d_t[name][13:37, 5:40])
    del q_t[name + "_scale_inv"]
    save_file(q_t, str(quant / "model.safetensors"))
    _assert_fails_cleanly(quant, tmp_path, f"fp8 tensor {name} has no {name}_scale_inv")


def test_parallel_sizes_are_validated(tiny_models, tmp_path):
    hf = tiny_models("mistralai/Mixtral-8x7B-v0.1")
    with pytest.raises(ConversionError, match="num_key_value_heads=2 is not divisible by tp=4"):
        convert(hf, tmp_path / "o", tp=4, progress=False)
    with pytest.raises(ConversionError, match="num_experts=4 is not divisible by ep=3"):
        convert(hf, tmp_path / "o", ep=3, progress=False)
    out = convert(hf, tmp_path / "o", tp=2, ep=2, progress=False)
    args = (out / "megatron_args.sh").read_text()
    assert "--tensor-model-parallel-size 2" in args and "--expert-model-parallel-size 2" in args


def test_export_bad_input(tiny_models, tmp_path):
    r = _cli("export", tmp_path, tmp_path / "x")
    assert r.returncode == 2 and "not a Megatron checkpoint" in r.stderr
    hf = tiny_models("meta-llama/Llama-2-7b-hf")
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    other = tiny_models("Qwen/Qwen3-8B")  # a different architecture as --like
    r = _cli("export", out, tmp_path / "x", "--like", other)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "x").exists(), r.stderr
    shutil.rmtree(out / "release" / "__0_0.distcp", ignore_errors=True)
    (out / "release" / "__0_0.distcp").unlink(missing_ok=True)
    r = _cli("export", out, tmp_path / "y")
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "y").exists(), r.stderr


@pytest.mark.parametrize("name", ["meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "Qwen/Qwen3-8B",
                                  "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B", "meta-llama/Llama-3.2-1B",
                                  "meta-llama/Llama-2-7b-hf#linear"])
def test_export_without_like_from_megatron_lm_arguments(name, tiny_models, tmp_path):
    """A checkpoint as Megatron-LM training leaves it (common state with `args`, no HF config): the HF config is
    re-derived from the arguments, and the tensors and the derived Megatron settings come back the same."""
    from converter import derive

    hf = tiny_models(name)
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    for f in ("hf_config.json", "hf2mcore.json"):
        (out / f).unlink()
    back = export(out, tmp_path / "back", progress=False)
    assert_bit_exact(hf, back)
    assert derive(back).megatron_namespace() == derive(hf).megatron_namespace()
    assert json.loads((back / "config.json").read_text())["architectures"] == \
        json.loads((hf / "config.json").read_text())["architectures"]


def test_export_without_like_refuses_what_arguments_cannot_name(tmp_path):
    from converter.from_args import hf_config_from_args

    with pytest.raises(ConversionError, match="--multi-latent-attention"):
        hf_config_from_args({"multi_latent_attention": True})
    with pytest.raises(ConversionError, match="RMSNorm"):
        hf_config_from_args({"normalization": "LayerNorm", "add_bias_linear": False})
    with pytest.raises(ConversionError, match="--spec"):  # (e.g. longrope under --exact)
        hf_config_from_args({"spec": ["hf2mcore_spec", "layer_spec"], "add_bias_linear": False})


def test_llama4_multimodal_checkpoint_converts_its_language_model(tiny_models, tmp_path):
    """Llama4ForConditionalGeneration keeps the language model under `language_model.` next to a vision tower:
    the text model converts (vision left out), matches the text-only HF model and exports with the wrapper's names."""
    text = tiny_models("meta-llama/Llama-4-Scout-17B-16E-Instruct:text")
    mm = tmp_path / "mm"
    mm.mkdir()
    tensors = {"language_model." + k: v for k, v in _tensors(text).items()}
    save_file({**tensors, "vision_model.patch_embedding.weight": torch.ones(4, 4),
               "multi_modal_projector.linear_1.weight": torch.ones(4, 4)}, str(mm / "model.safetensors"))
    cfg = json.loads((text / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"architectures": ["Llama4ForConditionalGeneration"],
                                                "model_type": "llama4", "text_config": cfg}))
    out = convert(mm, tmp_path / "mc", dtype="fp32", progress=False, exact=True)
    assert verify(text, out)["ok"]
    back = _tensors(export(out, tmp_path / "back", progress=False))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_overwrite_never_removes_an_input(tiny_models, tmp_path):
    """--overwrite refuses an output that is, holds or lies inside an input; the inputs stay as they were."""
    hf = _copy(tiny_models("meta-llama/Llama-2-7b-hf"), tmp_path / "models" / "hf")
    before = sorted(p.name for p in hf.iterdir())
    for out in (hf, hf.parent, hf / "mc"):
        r = _cli("convert", hf, out, "--overwrite", "--no-progress")
        assert r.returncode == 2 and "input" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in hf.iterdir()) == before
    ck = convert(hf, tmp_path / "ck", dtype="fp32", progress=False)
    for out in (ck, tmp_path, hf):  # the checkpoint itself, its parent, the --like directory
        r = _cli("export", ck, out, "--like", hf, "--overwrite", "--no-progress")
        assert r.returncode == 2 and "input" in r.stderr, r.stderr
    assert (ck / "release" / "metadata.json").is_file() and sorted(p.name for p in hf.iterdir()) == before


@pytest.mark.parametrize("args,what", [(("--tp", "0"), "tp=0"), (("--pp", "-1"), "pp=-1"), (("--ep", "0"), "ep=0"),
                                       (("--tp", "3"), "not divisible by tp=3"),
                                       (("--pp", "3"), "not divisible by pp=3")])
def test_parallel_sizes_must_fit(args, what, tiny_models, tmp_path):
    """Zero, negative or non-dividing sizes: one line and exit 2, in convert and inspect, before any work."""
    hf = tiny_models("mistralai/Mixtral-8x7B-v0.1")
    for cmd in (("convert", hf, tmp_path / "out", "--no-progress"), ("inspect", hf, "--format", "args")):
        r = _cli(*cmd, *args)
        assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_hybrid_time_step_floor_is_the_stated_gap(tiny_models, tmp_path):
    """transformers' Mamba-2 clamps dt to a range (time_step_min up to transformers 5.24, time_step_limit after),
    megatron-core's only above 0: where derive says the installed transformers has a floor, a dt_bias that puts dt
    below it shows the stated error; where it says none, the logits agree. A floor in both keys is always said."""
    from safetensors.torch import load_file

    from converter import derive

    hf = tiny_models("nvidia/Nemotron-H-56B-Base-8K")
    out = convert(hf, tmp_path / "mc", dtype="fp32", progress=False)
    assert verify(hf, out)["rel_err"] < 1e-5
    t = load_file(hf / "model.safetensors")
    for case, limit in (("published", [0.0, math.inf]), ("floor", [1e-3, math.inf])):
        low = shutil.copytree(hf, tmp_path / case)
        cfg = json.loads((low / "config.json").read_text())
        (low / "config.json").write_text(json.dumps({**cfg, "time_step_min": 1e-3, "time_step_limit": limit}))
        save_file({k: torch.full_like(v, -7.0) if k.endswith("dt_bias") else v for k, v in t.items()},
                  str(low / "model.safetensors"), metadata={"format": "pt"})
        said = [w for w in derive(low).warnings if w.startswith("time_step_limit:")]
        assert said or case == "published", case
        out = convert(low, tmp_path / f"mc-{case}", dtype="fp32", progress=False)
        err = verify(low, out)["rel_err"]
        if said:
            assert "[0.001, inf]" in said[0] and "9e-7" in said[0] and "4e-3" in said[0], said
            assert 1e-3 < err < 1.6e-2 and said[0] in (out / "megatron_args.sh").read_text(), (case, err)
        else:
            assert err < 1e-5, (case, err)
