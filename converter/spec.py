"""ModelSpec: everything Megatron needs to know about one HF model, and the three views of it
(Megatron-LM's argument namespace, which megatron_fields turns into flags, config and saved args; what no flag
expresses; the GPTModel Megatron-LM builds)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from . import megatron_fields
from .errors import ConversionError
from .layout import HOOK_MODULE

# Megatron-core's llama3 rope scaling hard-codes these (rotary_pos_embedding._apply_scaling defaults).
MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# MLATransformerConfig's yarn defaults, which no Megatron-LM flag changes
MCORE_MLA_YARN = {"beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}
# transformers' DeepSeek attention builds its q_a_layernorm and kv_a_layernorm with this eps, whatever rms_norm_eps says
HF_MLA_LATENT_EPS = 1e-6


@dataclass(frozen=True)
class Gap:
    """Something of the HF model that Megatron-LM's flags cannot express."""
    field: str  # the HF config field
    what: str
    upstream: str  # the smallest Megatron-LM change that would express it
    fix: dict | None  # hook settings that apply it from outside (None: no fix)

    @property
    def measured(self) -> str:
        return MEASURED.get(self.field, "not measured")


# The error each gap causes, measured with Megatron-LM's own loader on tiny random models of the real configs
# (tests/test_megatron_lm.py checks these figures still hold, and that the hook removes the error).
MEASURED = {
    "rope_scaling.factor": "1.5e-3 at 160 tokens (Llama-3.2, factor 32; 5.8e-4 for Llama 4's 16), growing with length",
    "rope_scaling.low_freq_factor/high_freq_factor": "1.0e-1 at 160 tokens (Llama 4: low 1, high 1)",
    "no_rope_layers": "2.4e-1 at 160 tokens (Llama 4, every other layer NoPE)",
    "rope_scaling.beta_fast/beta_slow/original_max_position_embeddings": "4.4e-1 at 160 tokens (Kimi-K2: betas 1, 1)",
    "rope_scaling.short_factor/long_factor": "4.9e-1 at 160 tokens (a tiny Phi-3 with Phi-3-mini-128k's layout, its "
                                             "contexts 64 and 256: the long divisors 1.2 to 9, attention factor 1.15)",
    "rms_norm_eps": "1.3e-4 at 160 tokens (DeepSeek-V3 with rms_norm_eps 1e-5; 1.9e-5 for DeepSeek-V2-Lite's layout)",
}


@dataclass(frozen=True)
class RopeSpec:
    kind: str = "rope"  # rope | linear | llama3 | yarn | longrope | none (no position embedding: Nemotron-H's)
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    interleaved: bool = False
    low_freq_factor: float = 1.0  # llama3 scaling (megatron-core's RotaryEmbedding hard-codes 1, 4 and 8192)
    high_freq_factor: float = 4.0
    percent: float = 1.0  # share of each head's dims that rotate (partial_rotary_factor)
    truncate: bool = True  # yarn: round the correction range to whole dims (rope_scaling.truncate)
    # longrope (Phi-3/3.5/4-mini long-context): HF's inverse frequencies for sequences up to the original context
    # (its short factors, as transformers computes them) and beyond it (the long ones), and the factor that scales
    # cos and sin
    inv_freq: tuple[float, ...] | None = None
    long_inv_freq: tuple[float, ...] | None = None
    attention_factor: float = 1.0


@dataclass(frozen=True)
class MoESpec:
    num_experts: int
    topk: int
    ffn_hidden_size: int
    layer_pattern: tuple[int, ...]  # 1 = MoE layer, 0 = dense
    shared_expert_size: int = 0
    score_function: str = "softmax"  # softmax | sigmoid
    pre_softmax: bool = False  # True: softmax over all experts, then top-k, no renormalisation
    expert_bias: bool = False
    num_groups: int | None = None
    group_topk: int | None = None
    topk_scaling_factor: float | None = None
    shared_expert_gate: bool = False
    probs_on_input: bool = False  # routing weight scales the expert's input, not its output (Llama 4)


@dataclass(frozen=True)
class MLASpec:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_head_dim: int
    qk_pos_emb_head_dim: int
    v_head_dim: int


@dataclass(frozen=True)
class MambaSpec:
    """Mamba-2 mixer sizes (megatron-core's MambaMixer; d_conv 4 is fixed there)."""
    state_dim: int
    head_dim: int
    num_groups: int
    num_heads: int


@dataclass(frozen=True)
class GDNSpec:
    """Gated DeltaNet sizes (megatron-core's GatedDeltaNet; Qwen3-Next's linear attention)."""
    conv_kernel: int
    key_head_dim: int
    value_head_dim: int
    num_key_heads: int
    num_value_heads: int


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vocab_size: int
    max_position_embeddings: int
    norm_epsilon: float
    # swiglu | clamped_swiglu (gpt-oss: quick-GELU gate, up + 1, clamped) | squared_relu | geglu_tanh (Gemma: a
    # GELU gate on its tanh approximation; the hook's)
    activation: str = "swiglu"
    glu_clamp: float | None = None
    window: int | None = None  # sliding-window attention: keys per query, itself included
    window_layers: tuple[int, ...] | None = None  # 1 = the layer attends through the window; None = every layer
    attention_sinks: bool = False  # a learned per-head logit in every softmax (gpt-oss)
    nope_layers: tuple[int, ...] | None = None  # 1 = the layer has no rotary embedding (Llama 4)
    qk_l2_norm: bool = False  # weightless RMS normalisation of q and k (Llama 4; HF skips it on NoPE layers)
    add_qkv_bias: bool = False
    add_bias_linear: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    rope: RopeSpec = RopeSpec()
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    mtp_layers: int = 0  # multi-token-prediction layers (their weights follow the last decoder layer in HF)
    # hybrid models (megatron-core's HybridModel): one symbol a layer, M Mamba-2, * attention, - MLP, E MoE
    layer_pattern: str | None = None
    mamba: MambaSpec | None = None
    gdn: GDNSpec | None = None
    hf_layer_span: int = 1  # Megatron layers per HF layer (Qwen3-Next: a mixer layer, then an MLP or MoE layer)
    attention_output_gate: bool = False  # sigmoid gate on the attention output, from a doubled q_proj (Qwen3-Next)
    zero_centered_norm: bool = False  # norms scale by 1 + weight (Qwen3-Next, Gemma; --apply-layernorm-1p)
    # Gemma 2's layers (the hook's): embeddings times sqrt(hidden_size), a norm on the attention's and the MLP's
    # output before each residual add, scores and output logits soft-capped (cap * tanh(x / cap)), and the
    # attention's scale where it is not 1/sqrt(kv_channels) (query_pre_attn_scalar)
    embedding_scale: bool = False
    post_norms: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    softmax_scale: float | None = None
    # training only: HF's attention_dropout, and the residual dropout its modeling code applies (Megatron-LM's
    # defaults are 0.1 for both; its --use-checkpoint-args takes them from the checkpoint)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    warnings: tuple[str, ...] = ()
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived views -------------------------------------------------------------------
    def padded_vocab_size(self, tp: int = 1) -> int:
        """HF's row count, padded only when TP does not divide it (export drops the padding)."""
        return math.ceil(self.vocab_size / tp) * tp

    def megatron_namespace(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                           dtype: torch.dtype = torch.float32, exact: bool = False) -> dict[str, Any]:
        """Megatron-LM's argument namespace for this model (destinations and parsed values): the one translation
        of the spec into Megatron terms; megatron_fields turns it into flags, config, saved args and back.
        `exact`: name the hook module that also applies what no flag expresses (`gaps()`)."""
        a: dict[str, Any] = dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                                 ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads)
        # MLA: Megatron-LM's validate_args sets hidden/heads, unused by MLA's own head sizes
        a["kv_channels"] = self.kv_channels if self.mla is None else self.hidden_size // self.num_attention_heads
        if self.mla is None:
            if self.num_query_groups != self.num_attention_heads:
                a.update(group_query_attention=True, num_query_groups=self.num_query_groups)
        a.update(normalization="RMSNorm", layernorm_epsilon=self.norm_epsilon,
                 layernorm_zero_centered_gamma=self.zero_centered_norm,
                 attention_output_gate=self.attention_output_gate)
        if self.activation == "clamped_swiglu":
            a.update(quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=self.glu_clamp)
        elif self.activation == "squared_relu":  # not gated: linear_fc1 is HF's up_proj
            a["squared_relu"] = True
        elif self.activation == "swiglu":
            a["swiglu"] = True  # (geglu_tanh has no flag: the hook's layers set it)
        if self.window:  # megatron-core counts the keys before the query: HF's window includes the query itself
            a["window_size"] = (self.window - 1, 0)
            if self.window_layers:
                a["window_attn_skip_freq"] = list(self.window_layers)
        if self.attention_sinks:
            a["softmax_type"] = "learnable"
        if self.nope_layers:
            a["no_rope_freq"] = list(self.nope_layers)
        a.update(qk_l2_norm=self.qk_l2_norm, add_bias_linear=self.add_bias_linear, add_qkv_bias=self.add_qkv_bias,
                 qk_layernorm=self.qk_layernorm, untie_embeddings_and_output_weights=not self.tie_word_embeddings,
                 attention_softmax_in_fp32=True,  # as HF's attention computes its softmax
                 attention_dropout=self.attention_dropout, hidden_dropout=self.hidden_dropout)
        r = self.rope
        if r.kind == "none":
            a["position_embedding_type"] = "none"
        else:
            a.update(position_embedding_type="yarn" if r.kind == "yarn" and self.mla is None else "rope",
                     rotary_base=int(r.theta), rotary_percent=r.percent, rotary_interleaved=r.interleaved)
        if r.kind == "linear":
            a["rotary_seq_len_interpolation_factor"] = int(r.factor)
        if r.kind == "llama3":
            a.update(use_rope_scaling=True, rope_scaling_factor=r.factor)
        if r.kind == "yarn":
            a.update(rotary_scaling_factor=r.factor, mscale=r.mscale, mscale_all_dim=r.mscale_all_dim)
            if self.mla is None:
                a.update(yarn_original_max_position_embeddings=r.original_max_position_embeddings,
                         yarn_beta_fast=r.beta_fast, yarn_beta_slow=r.beta_slow,
                         # only the off switch is a flag; Megatron-LM's parsed default is None (= on)
                         yarn_correction_range_round_to_int=None if r.truncate else False)
        a.update(max_position_embeddings=self.max_position_embeddings,
                 seq_length=min(self.max_position_embeddings, 4096))
        if self.mla is not None:
            m = self.mla
            a.update(multi_latent_attention=True, q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank,
                     qk_head_dim=m.qk_head_dim, qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
                     rope_type="yarn" if r.kind == "yarn" else "rope")
        if self.moe is not None:
            e = self.moe
            # all-MoE: the int 1, as Megatron-LM's default, so megatron-core stacks the layers as training does
            # hybrid models place their MoE layers by the E of the layer pattern
            freq = None if self.layer_pattern else 1 if all(e.layer_pattern) else list(e.layer_pattern)
            a.update(num_experts=e.num_experts, moe_ffn_hidden_size=e.ffn_hidden_size, moe_router_topk=e.topk,
                     moe_layer_freq=freq, moe_shared_expert_intermediate_size=e.shared_expert_size or None,
                     moe_shared_expert_gate=e.shared_expert_gate, moe_apply_probs_on_input=e.probs_on_input,
                     moe_router_score_function=e.score_function, moe_router_pre_softmax=e.pre_softmax,
                     moe_router_enable_expert_bias=e.expert_bias, moe_router_num_groups=e.num_groups,
                     moe_router_group_topk=e.group_topk, moe_router_topk_scaling_factor=e.topk_scaling_factor,
                     moe_router_dtype="fp32")  # HF routes in fp32 whatever the weights' dtype
        if self.mtp_layers:
            a["mtp_num_layers"] = self.mtp_layers
        if self.layer_pattern:
            a["hybrid_layer_pattern"] = self.layer_pattern
        if self.mamba is not None:
            m = self.mamba
            a.update(mamba_state_dim=m.state_dim, mamba_head_dim=m.head_dim, mamba_num_groups=m.num_groups,
                     mamba_num_heads=m.num_heads)
        if self.gdn is not None:
            g = self.gdn
            a.update(linear_conv_kernel_dim=g.conv_kernel, linear_key_head_dim=g.key_head_dim,
                     linear_value_head_dim=g.value_head_dim, linear_num_key_heads=g.num_key_heads,
                     linear_num_value_heads=g.num_value_heads)
        # Pinned so the Megatron vocabulary is HF's at this TP (no 128*TP default padding).
        a.update(padded_vocab_size=self.padded_vocab_size(tp), make_vocab_size_divisible_by=1)
        a.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        if self.moe is not None:
            a.update(expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp)
        a.update(bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, transformer_impl="local")
        if self.hook_settings(exact) is not None:  # pretrain_hybrid.py always needs one: its stack spec
            a["spec"] = [HOOK_MODULE, "hybrid_stack_spec" if self.layer_pattern else "layer_spec"]
        return megatron_fields.namespace(**{k: v for k, v in a.items() if v is not None})

    def gaps(self) -> list[Gap]:
        """What Megatron-LM's flags cannot express for this model, each with the fix the hook applies."""
        out, r = [], self.rope
        if r.kind == "llama3" and r.factor != 8.0:
            out.append(Gap("rope_scaling.factor", f"llama3 rope factor {_num(r.factor)}: Megatron-LM's "
                           "gpt_config_from_args never passes --rope-scaling-factor to GPTModel, which uses 8",
                           "gpt_config_from_args: rope_scaling_factor=args.rope_scaling_factor "
                           "(NVIDIA/Megatron-LM#6306)", {"rope_scaling_factor": r.factor}))
        llama3 = dict(low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor,
                      original_max_position_embeddings=r.original_max_position_embeddings)
        if r.kind == "llama3" and tuple(llama3.values()) != tuple(MCORE_LLAMA3.values()):
            out.append(Gap("rope_scaling.low_freq_factor/high_freq_factor", f"llama3 rope {llama3}: megatron-core's "
                           f"RotaryEmbedding fixes {MCORE_LLAMA3}",
                           "RotaryEmbedding: take the llama3 constants from the config (new fields and flags)",
                           {"llama3": llama3}))
        if self.qk_l2_norm and self.nope_layers and any(self.nope_layers):
            out.append(Gap("no_rope_layers", "the q/k L2 norm: Megatron-LM applies it on every layer, HF only on "
                           "the layers that rotate", "get_gpt_decoder_block_spec: no qk_l2_norm on no_rope_freq layers",
                           {"qk_l2_norm_layers": [1 - n for n in self.nope_layers]}))
        if self.mla is not None and r.kind == "yarn":
            want = dict(beta_fast=r.beta_fast, beta_slow=r.beta_slow,
                        original_max_position_embeddings=r.original_max_position_embeddings)
            if want != MCORE_MLA_YARN:
                out.append(Gap("rope_scaling.beta_fast/beta_slow/original_max_position_embeddings",
                               f"MLA yarn {want}: no flag reaches MLATransformerConfig's, which keeps {MCORE_MLA_YARN}",
                               "arguments.py: map --yarn-beta-fast/--yarn-beta-slow/--yarn-original-max-position-"
                               "embeddings onto MLATransformerConfig", {"mla_config": want}))
        if self.mla is not None and self.norm_epsilon != HF_MLA_LATENT_EPS:
            out.append(Gap("rms_norm_eps", f"rms_norm_eps={self.norm_epsilon}: transformers' multi-latent attention "
                           f"normalises the compressed q and kv with eps {HF_MLA_LATENT_EPS}, megatron-core's with "
                           "--norm-epsilon", "MLASelfAttention: an epsilon of its own for q_layernorm and kv_layernorm",
                           {"mla_latent_norm_eps": HF_MLA_LATENT_EPS}))
        if r.kind == "longrope":
            out.append(Gap("rope_scaling.short_factor/long_factor", "longrope: a divisor per rotary frequency, and "
                           f"cos and sin scaled by {_num(r.attention_factor)}: megatron-core's RotaryEmbedding has "
                           "neither", "RotaryEmbedding: per-frequency divisors and an attention factor from the config",
                           {"rope_inv_freq": list(r.inv_freq), "rope_attention_factor": r.attention_factor,
                            "rope_long": {"inv_freq": list(r.long_inv_freq),
                                          "beyond": r.original_max_position_embeddings}}))
        if r.theta != int(r.theta):
            out.append(Gap("rope_theta", f"rope_theta={r.theta}: Megatron-LM's --rotary-base is an integer",
                           "arguments.py: --rotary-base type=float", None))
        return out

    def hook_settings(self, exact: bool = False) -> dict | None:
        """Settings of the --spec hook (megatron_hooks), or None when Megatron-LM's own specs build the model."""
        s: dict[str, Any] = {"mla": True} if self.mla is not None else {}
        if self.layer_pattern:
            s["hybrid"] = True
        if self.activation == "geglu_tanh":
            s["activation"] = "gelu_tanh"
        if self.embedding_scale:
            s["embedding_scale"] = self.hidden_size ** 0.5
        if self.post_norms:
            s["post_norms"] = True
        s.update({k: v for k in ("attn_logit_softcap", "final_logit_softcap", "softmax_scale")
                  if (v := getattr(self, k)) is not None})
        if exact:
            for gap in self.gaps():
                s.update(gap.fix or {})
        return s or None

    def check_parallel(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None) -> None:
        """Explain, before any work, why the model cannot be split this way."""
        sizes = {"tp": tp, "pp": pp, "ep": ep, "etp": etp}
        bad = [f"{k}={v!r}" for k, v in sizes.items() if v is not None and (not isinstance(v, int) or v < 1)]
        if bad:
            raise ConversionError(f"parallel sizes must be positive whole numbers: {', '.join(bad)}")
        problems = []
        etp = etp or tp
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by tp={tp}")
        if self.mla is None and self.num_query_groups % tp:
            problems.append(f"num_key_value_heads={self.num_query_groups} is not divisible by tp={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size} is not divisible by tp={tp}")
        if self.mamba is not None:
            if self.mamba.num_heads % tp or self.mamba.num_groups % tp:
                problems.append(f"mamba_num_heads={self.mamba.num_heads} and n_groups={self.mamba.num_groups} must "
                                f"be divisible by tp={tp}")
        if self.gdn is not None and (self.gdn.num_key_heads % tp or self.gdn.num_value_heads % tp):
            problems.append(f"linear_num_key_heads={self.gdn.num_key_heads} and linear_num_value_heads="
                            f"{self.gdn.num_value_heads} must be divisible by tp={tp}")
        if self.num_layers % pp:  # Megatron-LM's even split (the argument file sets no uneven first/last stage)
            problems.append(f"num_hidden_layers={self.num_layers} is not divisible by pp={pp}")
        if self.moe is None and ep > 1:
            problems.append(f"ep={ep} needs a MoE model; this one has no experts")
        if self.moe is not None:
            if self.moe.num_experts % ep:
                problems.append(f"num_experts={self.moe.num_experts} is not divisible by ep={ep}")
            if self.moe.ffn_hidden_size % etp:
                problems.append(f"moe_intermediate_size={self.moe.ffn_hidden_size} is not divisible by etp={etp}")
        if problems:
            raise ConversionError("cannot split the model: " + "; ".join(problems))

    def build_model(self, device: str = "meta", dtype: torch.dtype = torch.float32, *, exact: bool = True,
                    **kw):
        """The megatron-core GPTModel (HybridModel) that Megatron-LM builds from this model's flags (model.build);
        `exact` (for models built in this process, e.g. the live API): with the hook's fixes for what no flag says."""
        from megatron.core import parallel_state as ps

        from .model import build, parallel_sizes
        from .runtime import ensure_distributed

        if not ps.model_parallel_is_initialized():
            ensure_distributed()
        sizes = parallel_sizes()
        self.check_parallel(*sizes)
        return build(self.megatron_namespace(*sizes, dtype=dtype, exact=exact), self.hook_settings(exact),
                     device=device, **kw)

    def replace(self, **kw) -> "ModelSpec":
        return dataclasses.replace(self, **kw)


def _num(x: float):
    """Print 500000.0 as 500000 in argument files, keep real fractions."""
    return int(x) if float(x).is_integer() else x


