"""ModelSpec: everything Megatron needs to know about one HF model, and the three views of it
(Megatron-LM flags, megatron-core TransformerConfig, the GPTModel itself)."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConversionError

# Megatron-core's llama3 rope scaling hard-codes these (rotary_pos_embedding._apply_scaling defaults).
MCORE_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class RopeSpec:
    kind: str = "rope"  # rope | llama3 | yarn
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
    activation: str = "swiglu"  # swiglu | geglu | clamped_swiglu (gpt-oss: quick-GELU gate, up + 1, clamped)
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
    warnings: tuple[str, ...] = ()
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    # ---- derived views -------------------------------------------------------------------
    def padded_vocab_size(self, tp: int = 1) -> int:
        """HF's row count, padded only when TP does not divide it (export drops the padding)."""
        return math.ceil(self.vocab_size / tp) * tp

    def megatron_args(self, tp: int = 1) -> dict[str, Any]:
        """Megatron-LM flags (name without dashes, '-' -> '_'); value True for value-less flags."""
        a: dict[str, Any] = {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_attention_heads": self.num_attention_heads,
        }
        if self.mla is None:
            a["kv_channels"] = self.kv_channels
            if self.num_query_groups != self.num_attention_heads:
                a["group_query_attention"] = True
                a["num_query_groups"] = self.num_query_groups
        a.update(normalization="RMSNorm", norm_epsilon=self.norm_epsilon)
        if self.activation == "clamped_swiglu":
            a.update(quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=_num(self.glu_clamp))
        else:
            a["swiglu" if self.activation == "swiglu" else "geglu"] = True
        if self.window:
            a["window_size"] = f"{self.window - 1},0"
            if self.window_layers:
                a["window_attn_skip_freq"] = _pattern(self.window_layers)
        if self.attention_sinks:
            a["softmax_type"] = "learnable"
        if self.nope_layers:
            a["no_rope_freq"] = _pattern(self.nope_layers)
        if self.qk_l2_norm:
            a["qk_l2_norm"] = True
        if not self.add_bias_linear:
            a["disable_bias_linear"] = True
        if self.add_qkv_bias:
            a["add_qkv_bias"] = True
        if self.qk_layernorm:
            a["qk_layernorm"] = True
        if not self.tie_word_embeddings:
            a["untie_embeddings_and_output_weights"] = True
        r = self.rope
        a["position_embedding_type"] = "yarn" if r.kind == "yarn" and self.mla is None else "rope"
        a["rotary_base"] = _num(r.theta)
        a["rotary_percent"] = _num(r.percent)
        if r.kind == "llama3":
            a["use_rope_scaling"] = True
            a["rope_scaling_factor"] = _num(r.factor)
        if r.interleaved:
            a["rotary_interleaved"] = True
        if r.kind == "yarn":
            a.update(rotary_scaling_factor=_num(r.factor), original_max_position_embeddings=r.original_max_position_embeddings,
                     beta_fast=_num(r.beta_fast), beta_slow=_num(r.beta_slow), mscale=_num(r.mscale),
                     mscale_all_dim=_num(r.mscale_all_dim))
        a["max_position_embeddings"] = self.max_position_embeddings
        a["seq_length"] = min(self.max_position_embeddings, 4096)
        if self.mla is not None:
            m = self.mla
            a["multi_latent_attention"] = True
            if m.q_lora_rank:
                a["q_lora_rank"] = m.q_lora_rank
            a.update(kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
                     qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim)
        if self.moe is not None:
            e = self.moe
            a.update(num_experts=e.num_experts, moe_ffn_hidden_size=e.ffn_hidden_size, moe_router_topk=e.topk)
            if any(p == 0 for p in e.layer_pattern):
                a["moe_layer_freq"] = _pattern(e.layer_pattern)
            if e.shared_expert_size:
                a["moe_shared_expert_intermediate_size"] = e.shared_expert_size
            if e.shared_expert_gate:
                a["moe_shared_expert_gate"] = True
            if e.probs_on_input:
                a["moe_apply_probs_on_input"] = True
            a["moe_router_score_function"] = e.score_function
            if e.pre_softmax:
                a["moe_router_pre_softmax"] = True
            if e.expert_bias:
                a["moe_router_enable_expert_bias"] = True
            if e.num_groups:
                a["moe_router_num_groups"] = e.num_groups
                a["moe_router_group_topk"] = e.group_topk
            if e.topk_scaling_factor is not None:
                a["moe_router_topk_scaling_factor"] = _num(e.topk_scaling_factor)
        # Pinned so the Megatron vocabulary is HF's at this TP (no 128*TP default padding).
        a["padded_vocab_size"] = self.padded_vocab_size(tp)
        a["make_vocab_size_divisible_by"] = 1
        return a

    def transformer_config(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                           dtype: torch.dtype = torch.float32, **overrides):
        """The megatron-core TransformerConfig (MLATransformerConfig for MLA) for this model."""
        import torch.nn.functional as F
        from megatron.core.transformer import MLATransformerConfig, TransformerConfig

        kw: dict[str, Any] = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size, ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads, num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels, normalization="RMSNorm", layernorm_epsilon=self.norm_epsilon,
            gated_linear_unit=True, add_bias_linear=self.add_bias_linear, add_qkv_bias=self.add_qkv_bias,
            qk_layernorm=self.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0,
            bias_activation_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
            masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
            use_cpu_initialization=True, perform_initialization=False,
            params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp,
            sequence_parallel=False,
        )
        kw["activation_func"] = F.silu if self.activation == "swiglu" else (
            lambda x: F.gelu(x, approximate="tanh"))
        if self.activation == "clamped_swiglu":
            from megatron.core.fusions.fused_bias_geglu import quick_gelu

            kw.update(activation_func=quick_gelu, glu_linear_offset=1.0, activation_func_clamp_value=self.glu_clamp)
        if self.window:  # megatron-core counts the keys before the query: HF's window includes the query itself
            kw.update(window_size=(self.window - 1, 0),
                      window_attn_skip_freq=list(self.window_layers) if self.window_layers else None)
        if self.attention_sinks:
            kw["softmax_type"] = "learnable"
        if self.nope_layers:
            kw["no_rope_freq"] = list(self.nope_layers)
        kw.update(qk_l2_norm=self.qk_l2_norm, rotary_interleaved=self.rope.interleaved)
        if self.moe is not None:
            e = self.moe
            kw.update(num_moe_experts=e.num_experts, moe_ffn_hidden_size=e.ffn_hidden_size, moe_router_topk=e.topk,
                      moe_layer_freq=list(e.layer_pattern), moe_router_score_function=e.score_function,
                      moe_router_pre_softmax=e.pre_softmax, moe_router_enable_expert_bias=e.expert_bias,
                      moe_router_num_groups=e.num_groups, moe_router_group_topk=e.group_topk,
                      moe_router_topk_scaling_factor=e.topk_scaling_factor, moe_grouped_gemm=False,
                      moe_token_dispatcher_type="alltoall" if torch.cuda.is_available() else "allgather",
                      moe_router_load_balancing_type="none",
                      moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
                      moe_shared_expert_intermediate_size=e.shared_expert_size or None,
                      moe_shared_expert_gate=e.shared_expert_gate, moe_apply_probs_on_input=e.probs_on_input)
        cls = TransformerConfig
        if self.mla is not None:
            m, r = self.mla, self.rope
            cls = MLATransformerConfig
            kw.pop("kv_channels")
            kw.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
                      qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
                      rotary_base=r.theta, rope_type="yarn" if r.kind == "yarn" else "rope")
            if r.kind == "yarn":
                kw.update(rotary_scaling_factor=r.factor,
                          original_max_position_embeddings=r.original_max_position_embeddings,
                          beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale,
                          mscale_all_dim=r.mscale_all_dim)
        kw.update(overrides)
        try:
            config = cls(**kw)
        except (AssertionError, ValueError) as exc:
            raise ConversionError(f"megatron-core rejects the derived config at tp={tp} pp={pp} ep={ep}: {exc}") from exc
        if self.mla is None and self.rope.kind == "yarn":  # GPTModel reads these attributes; they are not fields
            r = self.rope
            for k, v in dict(rotary_scaling_factor=r.factor, original_max_position_embeddings=r.original_max_position_embeddings,
                             beta_fast=r.beta_fast, beta_slow=r.beta_slow, mscale=r.mscale,
                             mscale_all_dim=r.mscale_all_dim, correction_range_round_to_int=r.truncate).items():
                setattr(config, "yarn_" + k, v)
        return config

    def check_parallel(self, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None) -> None:
        """Explain, before any work, why the model cannot be split this way."""
        problems = []
        etp = etp or tp
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by tp={tp}")
        if self.mla is None and self.num_query_groups % tp:
            problems.append(f"num_key_value_heads={self.num_query_groups} is not divisible by tp={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"intermediate_size={self.ffn_hidden_size} is not divisible by tp={tp}")
        if self.num_layers < pp:
            problems.append(f"num_hidden_layers={self.num_layers} is smaller than pp={pp}")
        if self.moe is None and ep > 1:
            problems.append(f"ep={ep} needs a MoE model; this one has no experts")
        if self.moe is not None:
            if self.moe.num_experts % ep:
                problems.append(f"num_experts={self.moe.num_experts} is not divisible by ep={ep}")
            if self.moe.ffn_hidden_size % etp:
                problems.append(f"moe_intermediate_size={self.moe.ffn_hidden_size} is not divisible by etp={etp}")
        if problems:
            raise ConversionError("cannot split the model: " + "; ".join(problems))

    def build_model(self, device: str = "meta", dtype: torch.dtype = torch.float32, *, pre_process: bool | None = None,
                    post_process: bool | None = None, vp_stage: int | None = None, **config_overrides):
        """The megatron-core GPTModel this converter targets (local spec, per-expert MoE).

        Uses the current parallel state; starts a process group of one when none exists.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        from .runtime import cpu_patches, ensure_distributed

        if not ps.model_parallel_is_initialized():
            ensure_distributed()
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        ep, etp = ps.get_expert_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
        self.check_parallel(tp, pp, ep, etp)
        config = self.transformer_config(tp, pp, ep, etp, dtype=dtype, **config_overrides)
        if pre_process is None:
            pre_process = ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        if post_process is None:
            post_process = ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                                vp_stage=vp_stage)
        if self.mla is not None or self.qk_l2_norm:
            layer_spec = self._local_layer_specs(layer_spec, config, vp_stage)
        r = self.rope
        custom_llama3 = r.kind == "llama3" and (r.low_freq_factor, r.high_freq_factor,
                                                r.original_max_position_embeddings) != tuple(MCORE_LLAMA3.values())
        kwargs = dict(position_embedding_type="yarn" if r.kind == "yarn" and self.mla is None else "rope",
                      rotary_base=r.theta, rotary_percent=r.percent,
                      rope_scaling=r.kind == "llama3" and not custom_llama3,
                      rope_scaling_factor=r.factor if r.kind == "llama3" else 8.0)
        # MLA's yarn embedding asks torch.cuda for a device even with use_cpu_initialization.
        with torch.device("cpu" if device == "cpu" else device), cpu_patches():
            model = GPTModel(config=config, transformer_layer_spec=layer_spec,
                             vocab_size=self.padded_vocab_size(tp), max_sequence_length=self.max_position_embeddings,
                             pre_process=pre_process, post_process=post_process,
                             share_embeddings_and_output_weights=self.tie_word_embeddings,
                             parallel_output=False, vp_stage=vp_stage, **kwargs)
        if custom_llama3:
            # megatron-core's llama3 scaling takes only the factor; apply HF's other constants with its own code
            rope = model.rotary_pos_emb
            rope.inv_freq = rope._apply_scaling(rope.inv_freq, factor=r.factor, low_freq_factor=r.low_freq_factor,
                                                high_freq_factor=r.high_freq_factor,
                                                original_max_position_embeddings=r.original_max_position_embeddings)
        if device != "cpu":  # some buffers (the router's expert_bias) ignore the device context
            model = model.to(device)
        return model

    def _local_layer_specs(self, block_spec, config, vp_stage):
        """Per-layer edits megatron-core's local block spec needs (it shares one spec object among its layers,
        so each layer gets its own copy): MLA's core attention, which the local DotProductAttention cannot be
        (separate k/v head sizes), without a q norm when q is not compressed (DeepSeek-V2-Lite); and Llama 4's
        weightless q/k norms, which HF applies only on the layers that rotate."""
        from megatron.core.transformer.identity_op import IdentityOp
        from megatron.core.transformer.torch_norm import L2Norm
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        from .mla_attention import LocalMLACoreAttention, LocalMLASelfAttention

        block_spec = copy.copy(block_spec)
        block_spec.layer_specs = [copy.deepcopy(layer) for layer in block_spec.layer_specs]
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)  # this stage's first global layer
        for i, layer in enumerate(block_spec.layer_specs):
            attn = layer.submodules.self_attention.submodules
            if self.mla is not None:
                layer.submodules.self_attention.module = LocalMLASelfAttention
                attn.core_attention = LocalMLACoreAttention
                if self.mla.q_lora_rank is None:
                    attn.q_layernorm = IdentityOp
            if self.qk_l2_norm:
                nope = bool(self.nope_layers and self.nope_layers[offset + i])
                attn.q_layernorm = attn.k_layernorm = IdentityOp if nope else L2Norm
        return block_spec

    def replace(self, **kw) -> "ModelSpec":
        return dataclasses.replace(self, **kw)


def _num(x: float):
    """Print 500000.0 as 500000 in argument files, keep real fractions."""
    return int(x) if float(x).is_integer() else x


def _pattern(layers) -> str:
    """A per-layer 0/1 list as Megatron-LM parses it, e.g. [1,0,1,0]."""
    return "[" + ",".join(map(str, layers)) + "]"
