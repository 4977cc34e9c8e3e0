import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

from converter.imports import interpret_triton_without_gpu

interpret_triton_without_gpu()  # Mamba's Triton kernels on the CPU (before torch imports Triton)
# no records of conversions (replay.py) outside test_replay.py, which sets its own: each test converts through torch,
# and nothing is written to the user's cache
os.environ["HF2MCORE_REPLAY"] = "off"
sys.path.insert(0, str(Path(__file__).parent))
warnings.filterwarnings("ignore")
logging.getLogger("megatron").setLevel(logging.ERROR)

from tiny import add_mtp, make_model, tiny_config  # noqa: E402

# Supported families, each a real config (tiny sizes in tests)
FAMILY_CONFIGS = [
    "meta-llama/Llama-2-7b-hf",
    "meta-llama/Llama-2-7b-hf#biases",  # a bias on every linear layer (attention_bias and mlp_bias)
    "meta-llama/Llama-2-7b-hf#linear",  # linear rope scaling: --rotary-seq-len-interpolation-factor
    "meta-llama/Llama-3.1-8B",  # llama3 rope scaling
    "meta-llama/Llama-3.2-1B",  # tied embeddings
    "mistralai/Mistral-7B-v0.1",
    "Qwen/Qwen2.5-7B",  # qkv bias
    "Qwen/Qwen3-8B",  # qk norm, head_dim != hidden/heads
    "Qwen/Qwen3-8B#yarn",  # yarn rope without MLA, truncated (Megatron-LM's unset round-to-int flag)
    "microsoft/Phi-3-mini-4k-instruct",  # fused qkv and gate_up
    # the hook's layers: norms after the attention and the MLP, scaled embeddings, soft-capped scores and logits,
    # tanh-GELU gate, query_pre_attn_scalar; norms centred on 0, alternating sliding window
    "google/gemma-2-2b",
    "microsoft/Phi-3-mini-4k-instruct#longrope",  # longrope: HF's frequencies and attention factor (--exact)
    "mistralai/Mixtral-8x7B-v0.1",  # MoE
    "Qwen/Qwen3-30B-A3B",  # MoE + qk norm
    "transformers:qwen2_moe:Qwen2MoeForCausalLM",  # Qwen1.5/2-MoE: qkv bias, shared expert with its sigmoid gate
    "deepseek-ai/DeepSeek-V2-Lite",  # MLA without q compression, dense-first layers, shared experts, yarn
    "deepseek-ai/DeepSeek-V3",  # MLA, grouped sigmoid routing with expert bias and routed scaling
    "transformers:glm4_moe:Glm4MoeForCausalLM",  # GLM-4.5: partial rotary, qkv-only bias, sigmoid MoE, shared expert
    "openai/gpt-oss-20b",  # sinks, alternating sliding window, yarn (not truncated), packed experts, clamped GLU
    "meta-llama/Llama-4-Scout-17B-16E-Instruct:text",  # NoPE, L2 q/k norm, llama3 rope (high 1), top-1 on input
    "deepseek-ai/DeepSeek-V3#kimi-k2",  # Kimi-K2: DeepSeek-V3's layout, yarn betas 1, 1
    "deepseek-ai/DeepSeek-V3#eps",  # rms_norm_eps 1e-5: MLA's latent norms keep 1e-6 in HF (a gap the hook closes)
    "openai/gpt-oss-20b#short-context",  # yarn with an original context of 64: the tests' 160 tokens go beyond it
    "nvidia/Nemotron-H-56B-Base-8K",  # hybrid (HybridModel): Mamba-2, squared-ReLU MLP and attention without rope
    # Nemotron 3-style hybrid MoE: Mamba-2, sigmoid-routed non-gated experts in groups, shared expert, attention
    "transformers:nemotron_h:NemotronHForCausalLM#nemotron-3",
    # hybrid: Gated DeltaNet and gated attention (q/k norms, partial rotary), each then MoE (shared expert with its
    # sigmoid gate) or MLP, norms centred on 0
    "Qwen/Qwen3-Next-80B-A3B-Thinking",
]
@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """name -> directory of a tiny fp32 HF model, made once per session."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(name: str, dtype="fp32"):
        import torch

        key = (name, dtype)
        if key not in cache:
            d = root / f"{name.replace('/', '_').replace(':', '_').replace('#', '_')}_{dtype}"
            cache[key] = make_model(tiny_config(name), d, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
        return cache[key]

    return get


# families whose releases carry multi-token-prediction layers (DeepSeek-V3/R1, GLM-4.5)
MTP_CONFIGS = ["deepseek-ai/DeepSeek-V3", "transformers:glm4_moe:Glm4MoeForCausalLM"]


@pytest.fixture(scope="session")
def mtp_models(tiny_models, tmp_path_factory):
    """name -> a copy of the tiny fp32 model with one MTP layer (tiny.add_mtp), made once per session."""
    import shutil

    root, cache = tmp_path_factory.mktemp("mtp"), {}

    def get(name: str):
        if name not in cache:
            cache[name] = add_mtp(shutil.copytree(tiny_models(name), root / name.replace("/", "_").replace(":", "_")))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2():
    from converter.default_model import smollm2_dir

    return smollm2_dir()


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
