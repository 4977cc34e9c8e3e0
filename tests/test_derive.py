"""derive(): Megatron settings from config.json, checked against transformers and against the hand-written confs."""
import glob
import json
import math
import os
import subprocess
import sys

import pytest

from converter import ConversionError, derive
from converter import megatron_fields
from converter.derive import hf_param_count, mcore_param_count
from converter.model import transformer_config
from tiny import CONFIGS, real_config

ALL = sorted(p.split("hf_configs/")[1].removesuffix("/config.json")
             for p in glob.glob(str(CONFIGS / "*" / "*" / "config.json")))


@pytest.mark.parametrize("name", ALL)
def test_param_count_matches_hf_or_refused_by_name(name):
    try:
        spec = derive(CONFIGS / name)
        megatron = mcore_param_count(spec.replace(mtp_layers=0))  # transformers' models have no MTP layers
    except ConversionError as exc:
        # a refusal must name what is unsupported, never be a bare failure
        assert "not supported" in str(exc) or "cannot" in str(exc), str(exc)
        return
    assert megatron == hf_param_count(spec)


def test_mtp_layer_parameters():
    """DeepSeek-V3's MTP layer in Megatron: one decoder layer like the last, enorm, hnorm, eh_proj (2H -> H) and its
    final norm; the embedding and head are shared (the release's copies of them are dropped)."""
    cfg = json.loads((CONFIGS / "deepseek-ai/DeepSeek-V3" / "config.json").read_text())
    spec, h = derive(cfg), cfg["hidden_size"]
    assert spec.mtp_layers == 1 and spec.megatron_namespace()["mtp_num_layers"] == 1
    layer = hf_param_count(derive({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1})) - hf_param_count(spec)
    assert mcore_param_count(spec) - mcore_param_count(spec.replace(mtp_layers=0)) == layer + 3 * h + 2 * h * h


def test_all_configs_are_covered():
    assert len(ALL) == 29


def _args(name, tp=1):
    return derive(CONFIGS / name).megatron_namespace(tp)


# Architectural flags of Megatron-LM's examples/post_training/modelopt/conf files, with HF's values where the
# conf is wrong (docs/derivation.md lists each such case).
CONF = {
    "meta-llama/Llama-3.1-8B-Instruct": dict(
        num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, group_query_attention=True,
        num_query_groups=8, kv_channels=128, normalization="RMSNorm", layernorm_epsilon=1e-5, swiglu=True,
        untie_embeddings_and_output_weights=True, add_bias_linear=False, position_embedding_type="rope",
        rotary_base=500000, use_rope_scaling=True, rope_scaling_factor=8, padded_vocab_size=128256),
    "meta-llama/Llama-3.2-1B-Instruct": dict(  # conf says rope factor 8; HF says 32
        num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32, num_query_groups=8,
        kv_channels=64, layernorm_epsilon=1e-5, rotary_base=500000, use_rope_scaling=True, rope_scaling_factor=32),
    "Qwen/Qwen2.5-7B-Instruct": dict(  # conf leaves eps at 1e-5; HF says 1e-6
        num_layers=28, hidden_size=3584, ffn_hidden_size=18944, num_attention_heads=28, num_query_groups=4,
        add_qkv_bias=True, layernorm_epsilon=1e-6, rotary_base=1000000, untie_embeddings_and_output_weights=True,
        padded_vocab_size=152064),
    "Qwen/Qwen3-8B": dict(
        num_layers=36, hidden_size=4096, ffn_hidden_size=12288, num_attention_heads=32, num_query_groups=8,
        kv_channels=128, qk_layernorm=True, layernorm_epsilon=1e-6, rotary_base=1000000, padded_vocab_size=151936),
    "Qwen/Qwen3-30B-A3B": dict(
        num_layers=48, hidden_size=2048, num_attention_heads=32, num_query_groups=4, kv_channels=128,
        qk_layernorm=True, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768,
        moe_router_score_function="softmax", layernorm_epsilon=1e-6, moe_layer_freq=1),
    "deepseek-ai/DeepSeek-V2-Lite": dict(
        num_layers=27, hidden_size=2048, ffn_hidden_size=10944, num_attention_heads=16,
        multi_latent_attention=True, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
        num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
        moe_layer_freq=[0] + [1] * 26, moe_router_pre_softmax=True),
    "deepseek-ai/DeepSeek-V3": dict(
        num_layers=61, multi_latent_attention=True, q_lora_rank=1536, num_experts=256, moe_router_topk=8,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=8,
        moe_router_group_topk=4, moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=2048),
}


@pytest.mark.parametrize("name", sorted(CONF))
def test_flags_agree_with_megatron_conf(name):
    got = _args(name)
    for k, v in CONF[name].items():
        assert got.get(k) == v, (k, got.get(k), v)


def test_vocab_is_pinned_at_every_tp():
    for tp in (1, 2, 4, 8):
        assert _args("meta-llama/Llama-3.1-8B", tp)["padded_vocab_size"] == 128256
    assert _args("microsoft/Phi-3-mini-4k-instruct", 128)["padded_vocab_size"] == 32128  # padded only when needed


def test_rope_aliases_transformers4_and_5():
    v4 = real_config("meta-llama/Llama-3.1-8B")
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**v4["rope_scaling"], "rope_theta": v4["rope_theta"]}
    assert derive(v4).rope == derive(v5).rope
    assert derive(v5).rope.kind == "llama3" and derive(v5).rope.theta == 500000


def test_text_config_of_multimodal_wrapper_is_read():
    inner = real_config("meta-llama/Llama-3.1-8B")
    wrapped = {"architectures": ["LlamaForCausalLM"], "model_type": "llava", "text_config": inner}
    assert derive(wrapped).hidden_size == 4096


def test_remote_code_config_with_known_class():
    cfg = real_config("deepseek-ai/DeepSeek-V3")
    cfg["model_type"] = "kimi_k2"  # remote code: transformers does not know it; the class name decides
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    spec = derive(cfg)
    assert spec.mla is not None and spec.moe.num_experts == 256


def test_family_traits():
    assert derive(CONFIGS / "Qwen/Qwen2.5-7B").add_qkv_bias
    q3 = derive(CONFIGS / "Qwen/Qwen3-8B")
    assert q3.qk_layernorm and q3.kv_channels == 128
    mix = derive(CONFIGS / "mistralai/Mixtral-8x7B-v0.1")
    assert mix.moe.num_experts == 8 and mix.moe.topk == 2 and not mix.moe.pre_softmax
    assert mix.moe.ffn_hidden_size == 14336
    assert derive(CONFIGS / "meta-llama/Llama-3.2-1B").tie_word_embeddings
    mistral = derive(CONFIGS / "mistralai/Mistral-7B-v0.1")  # the window includes the query itself
    assert mistral.window == 4096 and mistral.megatron_namespace()["window_size"] == (4095, 0)
    assert "--window-size 4095,0" in " ".join(megatron_fields.flags(mistral.megatron_namespace()))


def test_refusals_name_the_feature():
    gemma3 = {**real_config("google/gemma-2-2b"), "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    with pytest.raises(ConversionError, match="rope_local_base_freq"):
        derive(gemma3)


def test_gemma2_traits():
    """Gemma 2's layers are the hook's (always named in the flags: Megatron-LM's specs cannot build them), its
    norms centred on 0 (--apply-layernorm-1p), its window on every other layer from the first."""
    spec = derive(CONFIGS / "google/gemma-2-2b")
    assert spec.hook_settings() == {"activation": "gelu_tanh", "embedding_scale": 2304 ** 0.5, "post_norms": True,
                                    "attn_logit_softcap": 50.0, "final_logit_softcap": 30.0}  # (scalar 256 = head_dim)
    ns = spec.megatron_namespace()
    flags = " ".join(megatron_fields.flags(ns))
    assert "--apply-layernorm-1p" in flags and "--swiglu" not in flags and "--spec hf2mcore_spec layer_spec" in flags
    assert ns["kv_channels"] == 256 and spec.window == 4096 and spec.window_layers[:4] == (1, 0, 1, 0)
    assert derive({**real_config("google/gemma-2-2b"), "query_pre_attn_scalar": 144}).softmax_scale == 144 ** -0.5
    # what other families' modeling code never reads is converted as transformers runs them, and said
    llama = derive({**real_config("meta-llama/Llama-2-7b-hf"), "final_logit_softcapping": 30.0})
    assert llama.hook_settings() is None and any(w.startswith("final_logit_softcapping=30.0") for w in llama.warnings)
    with pytest.raises(ConversionError, match="attention_bias"):
        derive({**real_config("google/gemma-2-2b"), "attention_bias": True})
    with pytest.raises(ConversionError, match="gelu"):
        derive({**real_config("meta-llama/Llama-2-7b-hf"), "hidden_act": "gelu"})


def test_mla_with_rope_interleave_off_is_refused():
    """DeepSeek-V3's modeling code rotates halves instead of interleaved pairs with rope_interleave=false;
    megatron-core's MLA always rotates the pairs: refused by name, not converted wrong."""
    cfg = json.loads((CONFIGS / "deepseek-ai/DeepSeek-V3/config.json").read_text())
    with pytest.raises(ConversionError, match="rope_interleave=false"):
        derive({**cfg, "rope_interleave": False})
    assert derive(cfg).mla is not None  # (true, its default, converts)


def test_nemotron_h_traits(tmp_path):
    """Nemotron-H-56B: the layer pattern as megatron-core's symbols, Mamba-2 sizes, squared-ReLU MLPs, attention
    without position embedding, pretrain_hybrid.py's --spec; what megatron-core's mixer cannot follow is said (a
    dt floor, also as transformers saves infinity: a tagged float)."""
    spec = derive(CONFIGS / "nvidia/Nemotron-H-56B-Base-8K")
    assert spec.num_layers == 118 == len(spec.layer_pattern) and spec.layer_pattern.startswith("M-M-M-M*-")
    assert (spec.mamba.state_dim, spec.mamba.head_dim, spec.mamba.num_groups, spec.mamba.num_heads) == (256, 64, 8, 256)
    flags = " ".join(megatron_fields.flags(spec.megatron_namespace(tp=8)))
    for f in ("--hybrid-layer-pattern M-M-M-M*-", "--mamba-num-heads 256", "--mamba-state-dim 256", "--squared-relu",
              "--position-embedding-type none", "--spec hf2mcore_spec hybrid_stack_spec", "--ffn-hidden-size 32768"):
        assert f in flags, f
    assert "--swiglu" not in flags and "--rotary-base" not in flags
    cfg = json.loads((CONFIGS / "nvidia/Nemotron-H-56B-Base-8K/config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "time_step_min": 0.002,
                                                      "time_step_limit": [0.002, {"__float__": "Infinity"}]}))
    floor = derive(tmp_path).warnings
    assert any(w.startswith("time_step_limit: ") and "[0.002, inf]" in w for w in floor), floor
    spec.check_parallel(tp=8, pp=2)  # Megatron-LM splits a pattern without '|' marks evenly
    with pytest.raises(ConversionError, match="mamba_num_heads"):
        spec.check_parallel(tp=16 * 3)


def test_qwen3_next_traits():
    """Qwen3-Next-80B-A3B: each HF layer is a Gated DeltaNet (or, every 4th, gated attention) layer and then a MoE
    layer; norms centred on 0; the release's MTP module is said to be left out."""
    spec = derive(CONFIGS / "Qwen/Qwen3-Next-80B-A3B-Thinking")
    assert spec.layer_pattern == "GEGEGE*E" * 12 and spec.num_layers == 96 and spec.hf_layer_span == 2
    assert (spec.gdn.num_key_heads, spec.gdn.num_value_heads, spec.gdn.key_head_dim) == (16, 32, 128)
    assert spec.moe.shared_expert_gate and spec.moe.num_experts == 512 and spec.rope.percent == 0.25
    flags = " ".join(megatron_fields.flags(spec.megatron_namespace()))
    for f in ("--apply-layernorm-1p", "--attention-output-gate", "--qk-layernorm", "--linear-num-value-heads 32",
              "--moe-shared-expert-gate", "--rotary-percent 0.25", "--spec hf2mcore_spec hybrid_stack_spec"):
        assert f in flags, f
    assert any("mtp" in w for w in spec.warnings)


def test_nemotron_3_moe_hybrid():
    """transformers' NemotronHConfig defaults (Nemotron 3's layer kinds, with an E layer): sigmoid routing with the
    expert bias, shared expert, non-gated experts; exact parameter count against transformers."""
    spec = derive(real_config("transformers:nemotron_h:NemotronHForCausalLM"))
    assert spec.layer_pattern == "ME*-" and spec.moe.layer_pattern == (0, 1, 0, 0)
    assert spec.moe.score_function == "sigmoid" and spec.moe.expert_bias and spec.moe.shared_expert_size > 0
    ns = spec.megatron_namespace()
    assert "moe_layer_freq" not in ns and ns["squared_relu"]
    assert mcore_param_count(spec) == hf_param_count(spec)


@pytest.mark.parametrize("edit,what", [
    ({"conv_kernel": 3}, "conv_kernel"), ({"moe_latent_size": 32}, "moe_latent_size"),
    ({"use_bias": True}, "use_bias"), ({"hybrid_override_pattern": "M*G"}, "layer symbols"),
    ({"num_hidden_layers": 5}, "num_hidden_layers=5"), ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act"),
    ({"num_nextn_predict_layers": 1}, "multi-token-prediction"), ({"mamba_num_heads": 12, "n_groups": 8}, "n_groups"),
])
def test_hybrid_refusals_name_the_field(edit, what):
    cfg = {**json.loads((CONFIGS / "nvidia/Nemotron-H-56B-Base-8K" / "config.json").read_text()),
           "hybrid_override_pattern": "M-M*", "num_hidden_layers": 4, **edit}
    with pytest.raises(ConversionError, match=what):
        derive(cfg)


def test_llama4_traits():
    """Scout (multimodal wrapper, text_config): every 4th layer NoPE, L2 q/k norm, interleaved llama3 rope with
    HF's own factors (a gap: Megatron-LM's flags cannot carry them), top-1 sigmoid on the expert input."""
    spec = derive(CONFIGS / "meta-llama/Llama-4-Scout-17B-16E-Instruct")
    a = spec.megatron_namespace()
    assert spec.family == "llama4_multimodal" and spec.nope_layers[:4] == (0, 0, 0, 1)
    assert a["qk_l2_norm"] and not a["qk_layernorm"] and a["rotary_interleaved"] and a["no_rope_freq"][:4] == [0, 0, 0, 1]
    assert a["moe_router_topk"] == 1 and a["moe_router_score_function"] == "sigmoid" and a["moe_apply_probs_on_input"]
    assert a["moe_shared_expert_intermediate_size"] == 8192 and a["ffn_hidden_size"] == 16384
    assert spec.rope.high_freq_factor == 1.0
    assert {g.field for g in spec.gaps()} == {"rope_scaling.factor", "rope_scaling.low_freq_factor/high_freq_factor",
                                             "no_rope_layers"}
    assert "spec" not in a and spec.megatron_namespace(exact=True)["spec"] == ["hf2mcore_spec", "layer_spec"]
    assert any("attention_chunk_size=8192" in w for w in spec.warnings)


def test_gpt_oss_traits():
    spec = derive(CONFIGS / "openai/gpt-oss-20b")
    a = spec.megatron_namespace()
    assert spec.attention_sinks and a["softmax_type"] == "learnable"
    assert a["window_size"] == (127, 0) and a["window_attn_skip_freq"][:4] == [1, 0, 1, 0]
    assert a["quick_geglu"] and a["glu_linear_offset"] == 1.0 and a["activation_func_clamp_value"] == 7
    assert a["add_bias_linear"] and a["add_qkv_bias"] and not spec.rope.truncate and a["moe_layer_freq"] == 1
    c = transformer_config(a)
    assert c.window_size == (127, 0) and c.window_attn_skip_freq[:2] == [1, 0] and c.add_bias_linear
    assert c.yarn_correction_range_round_to_int is False and c.activation_func_clamp_value == 7.0
    assert "--no-yarn-correction-range-round-to-int" in megatron_fields.flags(a) and not spec.gaps()


def test_glm45_traits_from_transformers_defaults():
    """GLM-4.5 (Glm4MoeConfig's defaults): partial rotary, sigmoid routing with expert bias, shared expert,
    dense-first layer; attention_bias means q/k/v only. Param counts agree with HF on the meta device."""
    cfg = {**real_config("transformers:glm4_moe:Glm4MoeForCausalLM"), "head_dim": 128}  # defaults leave it out
    spec = derive({**cfg, "attention_bias": True})
    a = spec.megatron_namespace()
    assert a["rotary_percent"] == 0.5 and a["add_qkv_bias"] and not a["add_bias_linear"]
    assert a["moe_router_score_function"] == "sigmoid" and a["moe_router_enable_expert_bias"]
    assert a["moe_shared_expert_intermediate_size"] == 1408 and a["moe_layer_freq"][:3] == [0, 1, 1]
    assert mcore_param_count(spec.replace(mtp_layers=0)) == hf_param_count(spec)
    with pytest.raises(ConversionError, match="partial_rotary_factor=0.5 with yarn"):
        derive({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5,
                                           "original_max_position_embeddings": 4096}})


def test_family_override_for_unknown_architecture():
    cfg = real_config("meta-llama/Llama-3.1-8B")
    cfg["architectures"] = ["MyLlamaForCausalLM"]
    with pytest.raises(ConversionError, match="unknown architecture.*known families: .*llama"):
        derive(cfg)
    assert derive(cfg, family="llama").num_layers == 32


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "converter", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("edit,field", [
    (lambda c: c.update(num_key_value_heads=5), "num_key_value_heads"),
    (lambda c: (c.update(hidden_size=4100)), "head_dim"),
    (lambda c: c.update(architectures=["FooForCausalLM"]), "FooForCausalLM"),
    (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers"),
    (lambda c: c.update(hidden_act="relu"), "hidden_act"),
])
def test_bad_config_gives_one_line_exit_2(tmp_path, edit, field):
    cfg = real_config("meta-llama/Llama-2-7b-hf")
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = _cli("inspect", tmp_path)
    assert r.returncode == 2 and field in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_missing_and_malformed_config(tmp_path):
    r = _cli("inspect", tmp_path)
    assert r.returncode == 2 and "no config.json" in r.stderr
    (tmp_path / "config.json").write_text("{not json")
    r = _cli("inspect", tmp_path)
    assert r.returncode == 2 and "not valid JSON" in r.stderr and "Traceback" not in r.stderr


def test_inspect_json_and_args():
    r = _cli("inspect", CONFIGS / "Qwen/Qwen3-0.6B", "--format", "json")
    out = json.loads(r.stdout)
    assert out["params"]["hf"] == out["params"]["megatron"] == 596049920
    assert out["megatron_args"]["qk_layernorm"] is True
    r = _cli("inspect", CONFIGS / "Qwen/Qwen3-0.6B", "--format", "args", "--tp", "2")
    assert "--qk-layernorm" in r.stdout and "--num-query-groups 8" in r.stdout
    assert "--tensor-model-parallel-size 2" in r.stdout


def test_mappings_import_on_their_own():
    """mappings imports converter.transforms and converter imports mappings: either may be imported first."""
    r = subprocess.run([sys.executable, "-c", "import mappings; print(sorted(mappings.supported()))"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "gpt_oss" in r.stdout, r.stderr[-1500:]


def test_transformers_defaults_are_cached_per_version(tmp_path, monkeypatch):
    from converter.derive import _defaults_from_transformers

    monkeypatch.setenv("HF2MCORE_CACHE", str(tmp_path))
    cfg = real_config("Qwen/Qwen3-30B-A3B")
    spec = derive(cfg)
    (cache,) = tmp_path.glob("hf_defaults-transformers-*.json")
    assert json.loads(cache.read_text())[cfg["model_type"]] == _defaults_from_transformers(cfg["model_type"])
    assert derive(cfg) == spec  # from the cache
    cache.write_text("{not json")
    assert derive(cfg) == spec  # an unreadable cache is rebuilt
    assert cfg["model_type"] in json.loads(cache.read_text())


def test_derive_with_a_warm_cache_does_not_import_transformers(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(real_config("meta-llama/Llama-3.1-8B")))
    code = ("import sys; from converter import derive; derive(sys.argv[1]); "
            "print('transformers' in sys.modules)")
    env = {**os.environ, "HF2MCORE_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "m")], capture_output=True, text=True,
                           env=env, check=True).stdout.split()[-1] for _ in range(2)]
    assert runs == ["True", "False"]


@pytest.mark.parametrize("name", ALL)
def test_flags_parse_back_to_the_namespace(name):
    """megatron_fields: the written flags parse back (with Megatron-LM's destinations and types) to exactly the
    namespace they came from, at a parallel layout too, and with the --exact hook."""
    try:
        spec = derive(CONFIGS / name)
    except ConversionError:
        return  # refused by name (test_param_count_matches_hf_or_refused_by_name)
    for ns in (spec.megatron_namespace(), spec.megatron_namespace(1, 1, 1, None, exact=True)):
        want = {k: v for k, v in ns.items() if not (megatron_fields.BY_DEST[k].kind == "true" and v is False)
                and not (megatron_fields.BY_DEST[k].kind == "false" and v is True)}
        assert megatron_fields.parse_flags(megatron_fields.flags(ns)) == want


@pytest.mark.parametrize("pattern", ["[0]*100000*100000", "[0]+1", "__import__('os')", "[0]*-1", "[0.5]",
                                     "[1]*(2**40)"])
def test_hostile_layer_patterns_are_refused(pattern):
    """A layer pattern from a file is evaluated without eval, and never to more than 100,000 layers."""
    with pytest.raises(ConversionError):
        megatron_fields.parse_flags(["--moe-layer-freq", pattern])


def test_dropout_as_the_modeling_code_applies_it():
    """Megatron-LM's dropouts default to 0.1: megatron_args.sh writes HF's attention_dropout and the residual
    dropout the modeling code has (Phi-3's resid_pdrop; Llama has none, whatever its config says)."""
    def dropout(name, **change):
        spec = derive({**real_config(name), **change})
        ns = megatron_fields.parse_flags(megatron_fields.flags(spec.megatron_namespace()))
        return ns["attention_dropout"], ns["hidden_dropout"], spec.warnings

    assert dropout("meta-llama/Llama-3.1-8B")[:2] == (0.0, 0.0)
    assert dropout("meta-llama/Llama-3.1-8B", attention_dropout=0.25, resid_pdrop=0.5)[:2] == (0.25, 0.0)
    attn, hidden, warnings = dropout("microsoft/Phi-3-mini-4k-instruct", resid_pdrop=0.125)
    assert (attn, hidden) == (0.0, 0.125) and any(w.startswith("resid_pdrop=0.125:") for w in warnings)
    with pytest.raises(ConversionError, match="attention_dropout"):
        derive({**real_config("meta-llama/Llama-3.1-8B"), "attention_dropout": 1.5})


def test_linear_rope_scaling():
    """Position interpolation is Megatron-LM's --rotary-seq-len-interpolation-factor, a whole number: another factor,
    or MLA (whose rope takes none), is refused by name (the logits: the tiny family Llama-2-7b-hf#linear)."""
    linear = lambda f: {"rope_scaling": {"rope_type": "linear", "factor": f}}  # noqa: E731
    spec = derive({**real_config("meta-llama/Llama-2-7b-hf"), **linear(4.0)})
    assert "--rotary-seq-len-interpolation-factor 4" in " ".join(megatron_fields.flags(spec.megatron_namespace()))
    with pytest.raises(ConversionError, match="whole number"):
        derive({**real_config("meta-llama/Llama-2-7b-hf"), **linear(2.5)})
    with pytest.raises(ConversionError, match="multi-latent"):
        derive({**real_config("deepseek-ai/DeepSeek-V2-Lite"), **linear(2.0)})


def test_longrope_is_a_gap_the_hook_closes():
    """Phi-3-mini-128k's longrope (its 4k config, extended): plain rope in the flags, a WARNING gap whose --exact fix
    carries transformers' own inverse frequencies (one per rotary pair) from the short factors and from the long
    ones, the original context that parts them, and the attention factor, and a warning that a model has one set
    (the logits: Phi-3-mini-4k-instruct#longrope and test_convert)."""
    cfg = {**real_config("microsoft/Phi-3-mini-4k-instruct"), "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 16 for i in range(48)],
                            "long_factor": [2.0 + i for i in range(48)]}}
    spec = derive(cfg)
    assert [g.field for g in spec.gaps()] == ["rope_scaling.short_factor/long_factor"]
    fix = spec.hook_settings(exact=True)
    assert len(fix["rope_inv_freq"]) == 48 and fix["rope_inv_freq"][0] == 1.0
    assert abs(fix["rope_attention_factor"] - math.sqrt(1 + math.log(32) / math.log(4096))) < 1e-12
    assert fix["rope_long"]["beyond"] == 4096 and fix["rope_long"]["inv_freq"][0] == 0.5  # (long_factor[0] 2)
    # without original_max_position_embeddings, transformers' default for the class (Phi-3's 4096)
    del cfg["original_max_position_embeddings"]
    assert derive(cfg).hook_settings(exact=True)["rope_long"]["beyond"] == 4096
    assert any("original_max_position_embeddings=4096" in w for w in spec.warnings)
    assert "--rotary-base 10000" in " ".join(megatron_fields.flags(spec.megatron_namespace()))
    with pytest.raises(ConversionError, match="longrope"):  # (the hook's fix is on the GPT layer spec only)
        derive({**real_config("deepseek-ai/DeepSeek-V2-Lite"), "rope_scaling": cfg["rope_scaling"]})
