"""Multi-latent attention on megatron-core's local (non-Transformer-Engine) layer spec.

Two gaps in megatron-core 0.19 without Transformer Engine: its MLA hands the core attention different head sizes
for keys (nope + rope dims) and values (`k_channels`, `v_channels`), which the local DotProductAttention does not
take; and with `qk_layernorm` but no q compression (q_lora_rank None, e.g. DeepSeek-V2-Lite) it insists on a
norm fused into linear_q_proj, which HF's model does not have (it normalises only the compressed kv there).
"""
from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class LocalMLASelfAttention(MLASelfAttention):
    """MLA that builds exactly the projections and norms its spec names (the spec follows the HF model)."""

    def _resolve_qk_norm_config(self, submodules):
        return {k: getattr(submodules, k) for k in
                ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "q_layernorm", "kv_layernorm")}


class LocalMLACoreAttention(MegatronModule):
    """causal softmax(q k^T * softmax_scale) v per head, with separate key and value head sizes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, softmax_scale=None, k_channels=None,
                 v_channels=None, cp_comm_type=None, pg_collection=None, attention_dropout=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("LocalMLACoreAttention: context parallelism needs Transformer Engine")
        # Attention.__init__ first builds one with the generic arguments; MLA then replaces it with its own sizes
        self.softmax_scale = softmax_scale or (k_channels or config.kv_channels) ** -0.5
        self.hidden_size_per_attention_head_v = v_channels

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, packed_seq_params=None, **_):
        """query/key [s, b, heads, k_channels], value [s, b, heads, v_channels] -> [s, b, heads * v_channels].

        attention_mask: megatron's boolean mask (True = masked) or None for plain causal attention."""
        if packed_seq_params is not None:
            raise ValueError("LocalMLACoreAttention: packed sequences need Transformer Engine")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if attention_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
