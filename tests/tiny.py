"""Tiny random HF models with the architecture and flags of a real config (small sizes), saved as safetensors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

# ../shared beside the checkout (as CI lays it out), else the workplace's copy
CONFIGS = next((p for p in (Path(os.environ.get("HF2MCORE_HF_CONFIGS", "/nonexistent")),
                            Path(__file__).resolve().parents[1].parent / "shared" / "hf_configs",
                            Path("/work/shared/hf_configs")) if p.is_dir()), Path("shared/hf_configs"))


# optional features a family's defaults leave off, switched on so the tests see them
OVERRIDES = {"transformers:glm4_moe:Glm4MoeForCausalLM": {"attention_bias": True, "use_qk_norm": True,
                                                          "routed_scaling_factor": 2.5},
             # Kimi-K2's rope_scaling (its config.json is DeepSeek-V3's with these values)
             "deepseek-ai/DeepSeek-V3#kimi-k2": {"rope_scaling": {"type": "yarn", "factor": 32.0, "beta_fast": 1.0,
                                                                  "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                                                                  "original_max_position_embeddings": 4096}},
             "meta-llama/Llama-2-7b-hf#biases": {"attention_bias": True, "mlp_bias": True},
             # Phi-3-mini-128k / Phi-3.5-mini's longrope (one factor per rotary frequency), its contexts shrunk: the
             # tests' sequences outgrow the original one (HF's long factors) and the written --seq-length too
             "microsoft/Phi-3-mini-4k-instruct#longrope": {
                 "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.7],
                                  "long_factor": [1.2, 2.0, 5.0, 9.0]},
                 "max_position_embeddings": 256, "original_max_position_embeddings": 64},
             # Gemma 2's soft caps (50 on scores, 30 on logits) are far above the tiny model's: caps these reach
             "google/gemma-2-2b": {"attn_logit_softcapping": 0.25, "final_logit_softcapping": 2.0},
             # position interpolation (deepseek-coder, Llama-2 long-context fine-tunes)
             "meta-llama/Llama-2-7b-hf#linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
             # Qwen's long-context recipe (rope_scaling added to config.json), truncated as HF's yarn is by default
             "Qwen/Qwen3-8B#yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 64},
                                    "max_position_embeddings": 256},
             # the latent norms' eps (transformers fixes 1e-6) apart from the other norms'
             "deepseek-ai/DeepSeek-V3#eps": {"rms_norm_eps": 1e-5},
             "openai/gpt-oss-20b#short-context": {"rope_scaling": {
                 "rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                 "original_max_position_embeddings": 64}},
             "transformers:nemotron_h:NemotronHForCausalLM#nemotron-3": {"n_group": 2, "topk_group": 1,
                                                                         "routed_scaling_factor": 2.5},
             "Qwen/Qwen3-Next-80B-A3B-Thinking": {"mlp_only_layers": [1]},  # a dense MLP layer too
             # transformers' Qwen2MoeConfig defaults are Qwen1.5-MoE-A2.7B's: its shared expert small, a dense layer
             "transformers:qwen2_moe:Qwen2MoeForCausalLM": {"shared_expert_intermediate_size": 48,
                                                           "mlp_only_layers": [1]},
             # two layers: one NoPE, one dense
             "meta-llama/Llama-4-Scout-17B-16E-Instruct:text": {"no_rope_layer_interval": 2,
                                                                "interleave_moe_layer_step": 2}}


def tiny_config(name: str) -> dict:
    """The tests' tiny config of `name` (FAMILY_CONFIGS): shrunk, with the variant's OVERRIDES."""
    return {**shrink(real_config(name)), **OVERRIDES.get(name, {})}


def real_config(name: str) -> dict:
    """A config of ../shared/hf_configs; `transformers:<model_type>:<Architecture>` takes transformers' class
    defaults instead (for families without a config there; e.g. Glm4MoeConfig's defaults are GLM-4.5's);
    `name#variant` is that config (OVERRIDES say what the variant changes)."""
    name = name.split("#")[0]
    if name.endswith(":text"):  # the language model of a multimodal checkpoint, as a causal LM of its own
        cfg = json.loads((CONFIGS / name.removesuffix(":text") / "config.json").read_text())["text_config"]
        arch = cfg.get("architectures") or [f"{cfg['model_type'].removesuffix('_text').capitalize()}ForCausalLM"]
        return {**cfg, "architectures": arch}
    if name.startswith("transformers:"):
        from transformers import AutoConfig

        _, model_type, arch = name.split(":")
        return {**AutoConfig.for_model(model_type).to_dict(), "architectures": [arch]}
    return json.loads((CONFIGS / name / "config.json").read_text())


def shrink(cfg: dict, layers: int = 2, experts: int = 4) -> dict:
    """Same architecture and flags, small sizes; GQA ratio and head_dim != hidden/heads are kept."""
    c = dict(cfg)
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    ratio = max(1, heads // kv)
    # at least 2 kv heads (when the real model has several) so TP=2 tests can split query groups
    c.update(hidden_size=64, num_attention_heads=8, num_key_value_heads=max(min(kv, 2), 8 // ratio),
             intermediate_size=96, vocab_size=384, num_hidden_layers=layers)
    if "head_dim" in c:
        c["head_dim"] = 16  # 8 heads * 16 = 128 != hidden 64, as in Qwen3
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if c.get(k):
            c[k] = experts
    if c.get("layer_types"):
        c["layer_types"] = c["layer_types"][: c["num_hidden_layers"]]
    if c.get("linear_num_key_heads"):  # Gated DeltaNet (Qwen3-Next): 2 key heads of 4 value heads each pair
        c.update(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                 num_hidden_layers=max(layers, 4))  # three DeltaNet layers, then gated attention
    if c.get("mamba_num_heads"):  # hybrid: one layer of each kind, in the order the real model first has them
        for key in ("hybrid_override_pattern", "layers_block_type"):
            if c.get(key):
                kinds = list(dict.fromkeys(c[key]))
                c[key] = "".join(kinds) if isinstance(c[key], str) else kinds
                c["num_hidden_layers"] = len(c[key])
        c.update(mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, head_dim=16,
                 attention_head_dim=16, chunk_size=32)
    if c.get("sliding_window"):  # shorter than the test text, so the window shows
        c["sliding_window"] = 16
    if (c.get("n_group") or 1) > 1:  # grouped routing: groups must divide the (fewer) experts
        c["n_group"], c["topk_group"] = 2, 1
    if c.get("num_experts_per_tok"):
        c["num_experts_per_tok"] = min(c["num_experts_per_tok"], 2, experts)
    if c.get("intermediate_size_mlp"):
        c["intermediate_size_mlp"] = 128
    if c.get("moe_intermediate_size"):
        c["moe_intermediate_size"] = 32
    if c.get("first_k_dense_replace"):
        c["first_k_dense_replace"] = 1
        c["num_hidden_layers"] = layers + 1
    if c.get("mlp_only_layers"):
        c["mlp_only_layers"] = [0]
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(c.get(k), int) and c[k] >= c["vocab_size"]:
            c[k] = c["vocab_size"] - 1
        elif isinstance(c.get(k), list):
            c[k] = [min(t, c["vocab_size"] - 1) for t in c[k]]
    c.pop("quantization_config", None)
    return c


def make_model(cfg: dict, out: Path, dtype=torch.float32, seed: int = 0) -> Path:
    """Instantiate with random weights (norms and biases perturbed too, so a swapped tensor shows) and save. Norm
    weights move around their initial value: 1, or 0 where the norm scales by 1 + weight (Qwen3-Next)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    config.architectures = cfg.get("architectures")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if "correction_bias" in name:  # DeepSeek-V3's expert bias is a buffer: make it visible too
                b.copy_(0.1 * torch.randn_like(b))
    model.to(dtype).save_pretrained(out, safe_serialization=True)
    return out


def with_values(hf: Path, out: Path, values: dict) -> Path:
    """A copy of the model in `hf` whose single-file weights hold `values` ({tensor name: (index, value)})."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(hf, out)
    t = load_file(out / "model.safetensors")
    for name, (index, value) in values.items():
        t[name][index] = value
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    return out


def add_mtp(hf: Path, seed: int = 1) -> Path:
    """Give a tiny model one multi-token-prediction layer as DeepSeek-V3 and GLM-4.5 releases store it: HF layer
    num_hidden_layers holds enorm, hnorm, eh_proj, a decoder layer shaped like the last one, shared_head.norm, and
    copies of the embedding and the output head."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((hf / "config.json").read_text())
    n, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    t = load_file(hf / "model.safetensors")
    last = f"model.layers.{n - 1}."
    for k, v in list(t.items()):
        if k.startswith(last):
            noise = torch.randn(v.shape, generator=g)
            norm = v.ndim == 1 and "norm" in k
            t[f"model.layers.{n}." + k.removeprefix(last)] = ((1 + 0.2 * noise) if norm else 0.08 * noise).to(v.dtype)
    dt = t["model.embed_tokens.weight"].dtype
    p = f"model.layers.{n}."
    t.update({p + "enorm.weight": (1 + 0.2 * torch.randn(h, generator=g)).to(dt),
              p + "hnorm.weight": (1 + 0.2 * torch.randn(h, generator=g)).to(dt),
              p + "shared_head.norm.weight": (1 + 0.2 * torch.randn(h, generator=g)).to(dt),
              p + "eh_proj.weight": (0.08 * torch.randn(h, 2 * h, generator=g)).to(dt),
              p + "embed_tokens.weight": t["model.embed_tokens.weight"].clone(),
              p + "shared_head.head.weight": t["lm_head.weight"].clone()})
    save_file(t, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}, indent=2))
    return hf
