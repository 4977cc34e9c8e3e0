"""The vocabulary of a family file: a Rule maps one Megatron tensor to the HF tensors it is built from."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from converter.transforms import COPY, GATE_UP, QKV, VOCAB, Transform


@dataclass(frozen=True)
class Rule:
    """`mcore` and `hf` are name patterns; `{i}` is the layer, `{e}` the expert."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform = COPY

    def match(self, name: str) -> dict | None:
        m = _compile(self.mcore).fullmatch(name)
        return m.groupdict() if m else None

    def sources(self, fields: dict) -> list[str]:
        return [p.format(**fields) for p in self.hf]


_CACHE: dict[str, re.Pattern] = {}


def _compile(pattern: str) -> re.Pattern:
    if pattern not in _CACHE:
        rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
        _CACHE[pattern] = re.compile(rx)
    return _CACHE[pattern]


@dataclass(frozen=True)
class Family:
    name: str
    # HF architecture class -> spec fields its modeling code implies (fields the config does not carry), and what
    # derive asks that code (reads_sliding_window, reads_partial_rotary, reads_resid_pdrop: fields it reads;
    # mamba_mixer: its Mamba-2 mixer class)
    architectures: dict[str, dict]
    rules: tuple[Rule, ...] = ()
    # HF tensors that are not model weights (regexes)
    ignore: tuple[str, ...] = (r".*rotary_emb\.inv_freq",)
    # HF tensors that stack every expert of a layer (regexes); rules name one expert's slice as `<name>[{e}]`
    packed: tuple[str, ...] = ()
    # HF tensors that repeat another one, by the Megatron tensor whose source they repeat (`{i}`: the HF layer):
    # checked equal when read, written again on export (DeepSeek-V3's MTP layers carry their own copies of the
    # embedding and the output head, which megatron-core's MTP shares with the main model)
    copies: dict[str, str] = field(default_factory=dict)
    # Non-empty: the family is known but cannot be converted; the text names the features
    refuse: str = ""
    notes: dict = field(default_factory=dict)


def rule(mcore: str, *hf: str, transform: Transform = COPY) -> Rule:
    return Rule(mcore, tuple(hf), transform)


# ---- building blocks shared by the Llama-like families --------------------------------------------
L = "decoder.layers.{i}."


def embeddings(hf_prefix: str = "model.", lm_head: str = "lm_head.weight") -> list[Rule]:
    return [
        rule("embedding.word_embeddings.weight", hf_prefix + "embed_tokens.weight", transform=VOCAB),
        rule("output_layer.weight", lm_head, transform=VOCAB),
        rule("decoder.final_layernorm.weight", hf_prefix + "norm.weight"),
    ]


def gqa_attention(attn: str = "model.layers.{i}.self_attn.", norm: str = "model.layers.{i}.input_layernorm.") -> list[Rule]:
    """q/k/v/o projections (+ biases and q/k norms where the model has them)."""
    qkv = [attn + p for p in ("q_proj", "k_proj", "v_proj")]
    return [
        rule(L + "input_layernorm.weight", norm + "weight"),
        rule(L + "self_attention.linear_qkv.weight", *(p + ".weight" for p in qkv), transform=QKV),
        rule(L + "self_attention.linear_qkv.bias", *(p + ".bias" for p in qkv), transform=QKV),
        rule(L + "self_attention.linear_proj.weight", attn + "o_proj.weight"),
        rule(L + "self_attention.linear_proj.bias", attn + "o_proj.bias"),
        rule(L + "self_attention.q_layernorm.weight", attn + "q_norm.weight"),
        rule(L + "self_attention.k_layernorm.weight", attn + "k_norm.weight"),
    ]


def gated_mlp(mcore: str, hf: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> list[Rule]:
    """linear_fc1 = [gate; up], linear_fc2 = down (+ their biases where the model has them)."""
    return [
        rule(mcore + "linear_fc1.weight", f"{hf}{gate}.weight", f"{hf}{up}.weight", transform=GATE_UP),
        rule(mcore + "linear_fc1.bias", f"{hf}{gate}.bias", f"{hf}{up}.bias", transform=GATE_UP),
        rule(mcore + "linear_fc2.weight", f"{hf}{down}.weight"),
        rule(mcore + "linear_fc2.bias", f"{hf}{down}.bias"),
    ]


def mtp(hf: str = "model.layers.{i}.") -> list[Rule]:
    """Multi-token prediction (DeepSeek-V3 report, §2.2) as HF checkpoints store it: MTP layer m is HF layer
    num_layers + m, which plan.py names `mtp.layers.{i}.` (its decoder layer as `decoder.layers.{i}.`)."""
    m = "mtp.layers.{i}."
    return [rule(m + "enorm.weight", hf + "enorm.weight"), rule(m + "hnorm.weight", hf + "hnorm.weight"),
            rule(m + "eh_proj.weight", hf + "eh_proj.weight"),
            rule(m + "final_layernorm.weight", hf + "shared_head.norm.weight")]


MTP_COPIES = {"model.layers.{i}.embed_tokens.weight": "embedding.word_embeddings.weight",
              "model.layers.{i}.shared_head.head.weight": "output_layer.weight"}


def pre_mlp_norm(hf: str = "model.layers.{i}.post_attention_layernorm.weight") -> list[Rule]:
    return [rule(L + "pre_mlp_layernorm.weight", hf)]
