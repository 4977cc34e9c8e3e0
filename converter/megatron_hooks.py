"""The layer spec hf2mcore hands Megatron-LM through its own `--spec MODULE FUNCTION` hook.

`convert` copies this file into the checkpoint as `hf2mcore_spec.py`, with its settings beside it in
`hf2mcore_spec.json`, and `megatron_args.sh` names it (`--spec hf2mcore_spec layer_spec`, the checkpoint directory
on PYTHONPATH). It imports nothing from hf2mcore, so the training cluster needs only Megatron-LM. hf2mcore builds
its own models through the same function, with the settings passed in, so both build the same model.

Megatron-LM's GPTModelBuilder calls `layer_spec(model_config, vp_stage=...)` before it builds GPTModel, with the
GPTModelConfig (which proxies the TransformerConfig). What the settings may hold:
- "mla": build multi-latent attention on the local spec (megatron-core 0.19 cannot without Transformer Engine):
  a local core attention with separate key and value head sizes, and no q norm where q is not compressed.
  Needed: Megatron-LM cannot build the model otherwise. With MTP layers, the same for them: GPTModelBuilder
  builds those from megatron-core's default decoder spec, not from this hook, so this makes its call of
  `get_gpt_mtp_block_spec` (process-wide) take this spec's last layer instead.
The rest are fixes for what Megatron-LM's flags cannot express; convert writes them only with --exact:
- "rope_scaling_factor": llama3 rope factor (gpt_config_from_args drops --rope-scaling-factor: always 8).
- "llama3": low/high frequency factors and original context of llama3 rope (megatron-core fixes 1, 4, 8192).
  This one is process-wide: megatron-core's RotaryEmbedding takes no such arguments.
- "rope_inv_freq", "rope_attention_factor", "rope_long": longrope's inverse frequencies (HF's, from its short
  factors) in place of megatron-core's, also process-wide, and the factor that scales cos and sin. HF takes those
  from its long factors ("rope_long") for a sequence longer than the original context; a model here has one set:
  the long ones where the training sequence (Megatron-LM's --seq-length) is longer.
- "qk_l2_norm_layers": 1/0 per layer: the weightless q/k L2 norm only on the layers that rotate (Llama 4).
- "mla_config": MLATransformerConfig fields no flag reaches (yarn beta_fast, beta_slow, original context).
Gemma 2's layers, which no Megatron-LM spec builds (so always written where the model has them):
- "activation": "gelu_tanh": a gated MLP on GELU's tanh approximation (Megatron-LM's gated MLPs are SwiGLU and
  quick-GELU).
- "embedding_scale": the embeddings times this (sqrt(hidden_size), in their dtype), at the first layer's input.
- "post_norms": a norm on the attention's and the MLP's output before each residual add (`post_layernorm` of
  linear_proj and of linear_fc2).
- "attn_logit_softcap", "final_logit_softcap": scores, and the output logits (process-wide), as cap * tanh(x / cap).
- "softmax_scale": the attention's scale where it is not 1/sqrt(kv_channels).

Hybrid models (Mamba-2, Gated DeltaNet, attention, MLP and MoE layers: pretrain_hybrid.py; setting "hybrid") take
`--spec hf2mcore_spec hybrid_stack_spec`: megatron-core 0.19's own hybrid specs are made of Transformer Engine
modules, and its HybridStack builds a TENorm; this one is megatron-core's local modules, with the same checkpoint keys
as the TE spec (each layer's input norm saved under the name of the TE linear it is fused into there).
"""
from __future__ import annotations

import copy
import functools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.models.hybrid.hybrid_block import HybridStack
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

SETTINGS = Path(__file__).with_suffix(".json")
GATED_ACTIVATIONS = {"gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


def layer_spec(config, vp_stage=None, settings: dict | None = None):
    """The decoder block spec for `config` (a GPTModelConfig, or a TransformerConfig), with the settings applied."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.torch_norm import L2Norm
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if settings is None:
        settings = json.loads(SETTINGS.read_text())
    transformer = getattr(config, "transformer", config)
    for k, v in settings.get("mla_config", {}).items():
        setattr(transformer, k, v)
    if "rope_scaling_factor" in settings:
        config.rope_scaling_factor = settings["rope_scaling_factor"]
    # process-wide patches, so set (or undone) on every build: a process may build models of other settings
    base = RotaryEmbedding._apply_scaling = _stock(RotaryEmbedding, "_apply_scaling")
    if "llama3" in settings:
        patched = functools.partialmethod(base, **settings["llama3"])
        patched.hf2mcore_original = base
        RotaryEmbedding._apply_scaling = patched
    long = settings.get("rope_long")
    seq_length = _training_seq_length(config) if long else None
    _rope_inv_freq(RotaryEmbedding, long["inv_freq"] if seq_length and seq_length > long["beyond"]
                   else settings.get("rope_inv_freq"))
    if "rope_attention_factor" in settings:
        # megatron-core's attention scales cos and sin by yarn's concentration factor g(s, m) / g(s, m_all), with
        # g(s, m) = 0.1 m ln s + 1, read from these attributes whatever the rope: s = e and m_all = 0 make it 1 + 0.1 m
        transformer.yarn_rotary_scaling_factor, transformer.yarn_mscale_all_dim = math.e, 0.0
        transformer.yarn_mscale = 10 * (settings["rope_attention_factor"] - 1)
    if "activation" in settings:  # (MLP reads both when it is built)
        transformer.activation_func, transformer.gated_linear_unit = GATED_ACTIVATIONS[settings["activation"]], True
    if "softmax_scale" in settings:
        transformer.softmax_scale = settings["softmax_scale"]
    _output_softcap(GPTModel, settings.get("final_logit_softcap"))
    block = get_gpt_decoder_block_spec(transformer, use_transformer_engine=False,
                                       normalization=transformer.normalization,
                                       qk_l2_norm=transformer.qk_l2_norm, vp_stage=vp_stage)
    # the local block spec shares one spec object among its layers: each layer gets its own copy to edit
    block = copy.copy(block)
    block.layer_specs = [copy.deepcopy(layer) for layer in block.layer_specs]
    offset = get_transformer_layer_offset(transformer, vp_stage=vp_stage)  # this stage's first global layer
    l2 = settings.get("qk_l2_norm_layers")
    if transformer.layernorm_zero_centered_gamma:  # (--apply-layernorm-1p: the local norms refuse it)
        block.layer_norm = Norm
    for i, layer in enumerate(block.layer_specs):
        attn = layer.submodules.self_attention
        if transformer.layernorm_zero_centered_gamma:
            layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = Norm
        if "embedding_scale" in settings and offset + i == 0:
            layer.module, layer.params = ScaledInputLayer, {**layer.params, "scale": settings["embedding_scale"]}
        if settings.get("post_norms"):
            attn.submodules.linear_proj = _submodules(layer.submodules.mlp).linear_fc2 = PostNormRowParallelLinear
        if "attn_logit_softcap" in settings:
            attn.submodules.core_attention = ModuleSpec(module=SoftcapDotProductAttention,
                                                        params={"softcap": settings["attn_logit_softcap"]})
        if settings.get("mla"):
            attn.module = LocalMLASelfAttention
            attn.submodules.core_attention = LocalMLACoreAttention
            if transformer.q_lora_rank is None:
                attn.submodules.q_layernorm = IdentityOp
            if "mla_latent_norm_eps" in settings:
                for norm in ("q_layernorm", "kv_layernorm"):
                    built = getattr(attn.submodules, norm)
                    if built is not IdentityOp:
                        setattr(attn.submodules, norm, FixedEps(built, settings["mla_latent_norm_eps"]))
        if l2 is not None:
            attn.submodules.q_layernorm = attn.submodules.k_layernorm = L2Norm if l2[offset + i] else IdentityOp
    if settings.get("mla") and transformer.mtp_num_layers and block.layer_specs:
        _mtp_from(block.layer_specs[-1])
    return block


def _submodules(spec):
    """A spec's submodules: a ModuleSpec's, or a partial's (megatron-core 0.19's dense MLP spec is one)."""
    return spec.keywords["submodules"] if isinstance(spec, functools.partial) else spec.submodules


def _stock(cls, name: str):
    """megatron-core's own `cls.name`, beneath a patch of this hook's (read from the class's __dict__: a
    partialmethod fetched through the class is a new function, without the attribute)."""
    current = vars(cls)[name]
    return getattr(current, "hf2mcore_original", current)


def _training_seq_length(config) -> int | None:
    """Megatron-LM's --seq-length (its parsed global arguments); else the one the caller's config names as
    `training_seq_length` (hf2mcore's builds), if any. (GPTModelConfig's seq_length is --max-position-embeddings.)"""
    # looked up, not imported: Megatron-LM has imported it by now, and importing it elsewhere pulls in ModelOpt
    args = getattr(sys.modules.get("megatron.training.global_vars"), "_GLOBAL_ARGS", None)
    return args.seq_length if args is not None else getattr(config, "training_seq_length", None)


def _rope_inv_freq(rotary, inv_freq: list | None) -> None:
    """RotaryEmbedding computes its inverse frequencies in __init__ from the base alone: with `inv_freq`, every one
    built in this process takes these instead; without, megatron-core's own again."""
    stock = _stock(rotary, "__init__")
    if inv_freq is None:
        rotary.__init__ = stock
        return

    def __init__(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        if self.inv_freq.numel() != len(inv_freq):
            raise ValueError(f"hf2mcore_spec: {len(inv_freq)} rope frequencies for a rotary embedding of "
                             f"{self.inv_freq.numel()}")
        self.inv_freq = torch.tensor(inv_freq, dtype=self.inv_freq.dtype, device=self.inv_freq.device)

    __init__.hf2mcore_original = stock
    rotary.__init__ = __init__


def _output_softcap(gpt_model, cap: float | None) -> None:
    """With `cap`, every GPTModel built in this process soft-caps its output layer's logits (there is no spec for
    the output layer); without, megatron-core's own again."""
    stock = _stock(gpt_model, "__init__")
    if cap is None:
        gpt_model.__init__ = stock
        return

    def softcap(module, args, out):
        logits, bias = out
        return torch.tanh(logits / cap) * cap, bias

    def __init__(self, *args, **kwargs):
        stock(self, *args, **kwargs)
        if hasattr(self, "output_layer"):
            self.output_layer.register_forward_hook(softcap)

    __init__.hf2mcore_original = stock
    gpt_model.__init__ = __init__


class ScaledInputLayer(TransformerLayer):
    """The first layer, scaling its input (the embeddings, and so the residual too) by `scale` in their dtype,
    as Gemma's embedding does."""

    def __init__(self, *args, scale: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_scale = scale

    def _forward_attention(self, hidden_states, *args, **kwargs):
        scale = torch.tensor(self.input_scale, dtype=hidden_states.dtype, device=hidden_states.device)
        return super()._forward_attention(hidden_states * scale, *args, **kwargs)


class PostNormRowParallelLinear(RowParallelLinear):
    """A row-parallel projection whose (reduced) output is normalised: Gemma 2's norm after the attention and
    after the MLP, before the residual add. Its weight is this module's `post_layernorm.weight`."""

    def __init__(self, input_size, output_size, *args, config, **kwargs):
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self.post_layernorm = Norm(config=config, hidden_size=output_size, eps=config.layernorm_epsilon)

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return self.post_layernorm(out), bias


class SoftcapDotProductAttention(DotProductAttention):
    """megatron-core's local attention with its scaled scores soft-capped (cap * tanh(score / cap)) before the
    mask and the softmax, as Gemma 2's."""

    def __init__(self, *args, softcap: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale_mask_softmax = _Softcapped(self.scale_mask_softmax, softcap)


class _Softcapped(torch.nn.Module):
    def __init__(self, softmax, cap: float):
        super().__init__()
        self.softmax, self.cap = softmax, cap

    def forward(self, scores, *args, **kwargs):
        return self.softmax(torch.tanh(scores / self.cap) * self.cap, *args, **kwargs)


def _mtp_from(layer) -> None:
    """Have megatron-core's get_gpt_mtp_block_spec wrap `layer`, whatever decoder layer spec it is given."""
    from megatron.core.models.gpt import gpt_layer_specs

    stock = getattr(gpt_layer_specs.get_gpt_mtp_block_spec, "hf2mcore_original",
                    gpt_layer_specs.get_gpt_mtp_block_spec)

    def get_gpt_mtp_block_spec(config, spec, use_transformer_engine, vp_stage=None, pp_rank=None):
        return stock(config, layer, use_transformer_engine, vp_stage=vp_stage, pp_rank=pp_rank)

    get_gpt_mtp_block_spec.hf2mcore_original = stock
    gpt_layer_specs.get_gpt_mtp_block_spec = get_gpt_mtp_block_spec


def hybrid_spec():
    """The hybrid stack spec (megatron-core's local modules, the TE spec's checkpoint keys)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer, TransformerLayer,
                                                             TransformerLayerSubmodules)

    class LocalMambaMixer(MambaMixer):
        """megatron-core's Mamba mixer with its gated norm at --norm-epsilon, as transformers' mixer reads
        layer_norm_epsilon (megatron-core fixes 1e-5 there)."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            if self.rmsnorm:
                self.norm.eps = config.layernorm_epsilon

    dense = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    # megatron-core's MoE spec for any expert count (as its TE hybrid spec builds it), local experts
    moe = get_gpt_layer_local_spec(num_experts=8, moe_grouped_gemm=False, normalization="RMSNorm").submodules
    self_attention = copy.deepcopy(dense.self_attention)
    self_attention.submodules.q_layernorm = self_attention.submodules.k_layernorm = Norm  # (LocalHybridStack)
    mixer = ModuleSpec(module=LocalMambaMixer,
                       submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear))
    mamba = MambaLayerSubmodules(norm=Norm, mixer=mixer, mamba_bda=dense.self_attn_bda,
                                 sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})
    delta = ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=ColumnParallelLinear, out_norm=PlainRMSNorm, out_proj=RowParallelLinear))
    gdn = TransformerLayerSubmodules(
        input_layernorm=Norm, self_attention=delta, self_attn_bda=dense.self_attn_bda,
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.in_proj.layer_norm_"})
    attention = TransformerLayerSubmodules(
        input_layernorm=Norm, self_attention=self_attention, self_attn_bda=dense.self_attn_bda,
        sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_"})
    mlp = TransformerLayerSubmodules(pre_mlp_layernorm=Norm, mlp=dense.mlp, mlp_bda=dense.mlp_bda,
                                     sharded_state_dict_keys_map={"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})
    experts = TransformerLayerSubmodules(pre_mlp_layernorm=Norm, mlp=moe.mlp, mlp_bda=moe.mlp_bda)
    return ModuleSpec(module=LocalHybridStack, params={"final_norm": Norm}, submodules=HybridStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=mamba),
        gdn_layer=ModuleSpec(module=TransformerLayer, submodules=gdn),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=attention),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=mlp),
        moe_layer=ModuleSpec(module=MoETransformerLayer, submodules=experts)))


class Norm:
    """The layer norm the config asks for: megatron-core's local one, or for --apply-layernorm-1p (which it refuses)
    an RMSNorm whose weight is stored centred on 0 (it scales by 1 + weight), as Transformer Engine's is."""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        if config.layernorm_zero_centered_gamma and config.normalization == "RMSNorm":
            return ZeroCenteredRMSNorm(hidden_size, eps, config.params_dtype)
        return WrappedTorchNorm(config=config, hidden_size=hidden_size, eps=eps, **kwargs)


class PlainRMSNorm:
    """Gated DeltaNet's output norm with the weight as HF stores it (not centred on 0, whatever --apply-layernorm-1p
    says): hf2mcore's checkpoint keeps Qwen3-Next's values bit for bit. (Megatron-LM's TE spec centres this one too.)"""

    def __new__(cls, config, hidden_size, eps=1e-5, **kwargs):
        return torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm scaling by 1 + weight, in fp32 (as HF's Qwen3-Next norms and TE's zero-centred gamma)."""

    def __init__(self, hidden_size: int, eps: float, dtype):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))

    def forward(self, x):
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class LocalHybridStack(HybridStack):
    """HybridStack with the local final norm (megatron-core 0.19 builds a TENorm there whatever the spec), and q/k
    norms in its attention layers where the config has them (megatron-core refuses a spec that names them else)."""

    def __init__(self, config, submodules, *args, final_norm=None, post_layer_norm=True, post_process=True, **kwargs):
        if not config.qk_layernorm:
            from megatron.core.transformer.identity_op import IdentityOp

            submodules = copy.deepcopy(submodules)
            attention = submodules.attention_layer.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = IdentityOp
        super().__init__(config, submodules, *args, post_layer_norm=False, post_process=post_process, **kwargs)
        self.post_layer_norm = post_layer_norm
        if post_process and post_layer_norm:
            self.final_norm = final_norm(config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon)


class FixedEps:
    """A norm builder that gives its norms `eps`, whatever epsilon the module building them passes."""

    def __init__(self, norm, eps: float):
        self.norm, self.eps = norm, eps

    def __call__(self, *args, **kwargs):
        return self.norm(*args, **{**kwargs, "eps": self.eps})


class LocalMLASelfAttention(MLASelfAttention):
    """MLA that builds exactly the projections and norms its spec names: with q/k norms but no q compression
    (DeepSeek-V2-Lite), megatron-core 0.19 insists on a norm fused into linear_q_proj, which HF does not have."""

    def _resolve_qk_norm_config(self, submodules):
        return {k: getattr(submodules, k) for k in
                ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "q_layernorm", "kv_layernorm")}


class LocalMLACoreAttention(MegatronModule):
    """causal softmax(q k^T * softmax_scale) v per head, with separate key and value head sizes (megatron-core's
    local DotProductAttention takes only one)."""

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


# Megatron-LM's --spec reads a module attribute, not a function: built on import where the settings say hybrid (the
# checkpoint's copy; hf2mcore calls hybrid_spec() once megatron-core's Mamba layer can be imported)
if SETTINGS.exists() and json.loads(SETTINGS.read_text()).get("hybrid"):
    hybrid_stack_spec = hybrid_spec()
