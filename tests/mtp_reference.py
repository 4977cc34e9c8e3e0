"""Multi-token prediction written from its published definition (DeepSeek-V3 technical report, section 2.2), as
the reference for megatron-core's MTP logits: transformers has no MTP forward.

Depth k = 1 at position i: the main model's final hidden state h_i (after its last norm) and the embedding of
token i + 1, each RMS-normalised (hnorm, enorm), concatenated embedding first (the order of the released
eh_proj weights, as vLLM and megatron-core use them), projected by eh_proj, passed through one decoder layer of the
main model's architecture (HF layer num_hidden_layers), normalised (shared_head.norm) and projected by the shared
output head: logits for token i + 2. The last position, which has no token i + 1, embeds token 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@torch.no_grad()
def mtp_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, vocab] of MTP depth 1."""
    from transformers import AutoModelForCausalLM

    cfg = json.loads((hf_dir / "config.json").read_text())
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prefix = f"model.layers.{n}."
    w = {k.removeprefix(prefix): v.float() for k, v in load_file(hf_dir / "model.safetensors").items()
         if k.startswith(prefix)}
    h = model.model(ids).last_hidden_state
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1)
    e = model.model.embed_tokens(nxt)
    x = torch.cat([_rms(e, w["enorm.weight"], eps), _rms(h, w["hnorm.weight"], eps)], -1) @ w["eh_proj.weight"].T
    # the MTP decoder layer as transformers loads a layer of this architecture (its own tensor layout): layer n
    # of the same model with one layer more
    layer = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, num_hidden_layers=n + 1).model.layers[n]
    s = ids.shape[1]
    positions = torch.arange(s)[None]
    mask = torch.full((s, s), float("-inf")).triu(1)[None, None]
    out = layer(x, attention_mask=mask, position_ids=positions,
                position_embeddings=model.model.rotary_emb(x, positions))
    x = out[0] if isinstance(out, tuple) else out
    return model.lm_head(_rms(x, w["shared_head.norm.weight"], eps))
