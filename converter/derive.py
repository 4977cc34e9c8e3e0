"""config.json -> ModelSpec. Reads the raw JSON (transformers 4 and 5 spellings, multimodal `text_config`,
remote-code configs), fills what a field leaves out from transformers' own defaults for that model type, and
refuses, by field name, what megatron-core cannot express."""
from __future__ import annotations

import importlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

# the module, not its names: mappings imports converter.transforms, so either package may load first
import mappings

from .errors import ConversionError
from .spec import MCORE_LLAMA3, GDNSpec, MambaSpec, MLASpec, MoESpec, ModelSpec, RopeSpec

# Field aliases, first match wins (HF spellings across model families).
ALIASES = {
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "ffn_hidden_size": ("intermediate_size_mlp", "intermediate_size", "ffn_hidden_size", "n_inner"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_query_groups": ("num_key_value_heads", "num_kv_heads", "n_head_kv"),
    "head_dim": ("head_dim", "kv_channels", "attention_head_dim"),
    "norm_epsilon": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_epsilon"),
    # (Gemma's MLP reads hidden_activation; its early configs also carry an unread hidden_act, "gelu")
    "activation": ("mlp_hidden_act", "hidden_activation", "hidden_act", "activation_function"),
    "num_experts": ("n_routed_experts", "num_local_experts", "num_experts"),
    "topk": ("num_experts_per_tok", "experts_per_token", "moe_topk"),
    "moe_ffn": ("moe_intermediate_size",),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "seq_length"),
}
DEFAULTED = ("tie_word_embeddings", "rms_norm_eps", "layer_norm_epsilon", "rope_theta", "attention_bias",
             "mlp_bias", "norm_topk_prob", "hidden_act", "max_position_embeddings", "use_sliding_window",
             "scoring_func", "topk_method", "routed_scaling_factor", "decoder_sparse_step", "qkv_bias")
GATED_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh"}
PLAIN_ACTIVATIONS = {"relu2": "squared_relu"}  # MLPs without a gate (the family says: "mlp": "plain")
# Hybrid layer kinds: transformers' layers_block_type names (4.x and 5.x) -> megatron-core's pattern symbols
HYBRID_SYMBOLS = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                  "moe": "E"}
# Sizes beyond these are not a model but a broken or hostile config: refused before anything is built from them
# (the largest public models stay far below: 126 layers, hidden 16384, 256k vocabulary, 384 experts).
BOUNDS = {"num_layers": 4096, "hidden_size": 1 << 18, "ffn_hidden_size": 1 << 20, "num_attention_heads": 4096,
          "num_query_groups": 4096, "head_dim": 1 << 14, "vocab_size": 1 << 24, "num_experts": 1 << 16,
          "topk": 1 << 16, "moe_ffn": 1 << 20, "max_position_embeddings": 1 << 32}


# transformers (5) saves a float JSON cannot hold as {"__float__": "Infinity"} (Nemotron-H's time_step_limit)
TAGGED_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _tagged_float(obj: dict) -> Any:
    tag = obj.get("__float__") if len(obj) == 1 else None
    return TAGGED_FLOATS[tag] if isinstance(tag, str) and tag in TAGGED_FLOATS else obj


def read_config(path: str | Path) -> dict:
    """The raw config dict from a checkpoint directory or a config.json path."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    if not cfg_path.is_file():
        raise ConversionError(f"no config.json at {cfg_path}")
    try:
        raw = json.loads(cfg_path.read_text(), object_hook=_tagged_float)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConversionError(f"{cfg_path} does not hold a JSON object")
    return raw


def derive(path: str | Path | dict, family: str | None = None) -> ModelSpec:
    """Derive the Megatron view of an HF model from its config.json (a directory, a file or a dict). From a
    directory with weights, their tensor names also say which of the declared MTP layers are there."""
    raw = path if isinstance(path, dict) else read_config(path)
    archs = _typed(raw, "architectures", list) or []
    if not all(isinstance(a, str) for a in archs):
        raise ConversionError(f"config field architectures={archs!r:.80} must be a list of class names")
    arch = archs[0] if archs else None
    fam = _family(arch, family)
    if fam.refuse:
        raise ConversionError(f"{arch}: not supported: {fam.refuse}")
    # Multimodal wrappers keep the language model's fields in text_config.
    text = {**raw, **(_typed(raw, "text_config", dict) or {})}
    defaults = _hf_defaults(_typed(text, "model_type", str))
    cfg = {**defaults, **text}
    try:
        spec = _Deriver(cfg, arch or fam.name, fam, frozenset(defaults)).spec()
    except (TypeError, ValueError, AttributeError) as exc:  # a field of a type no check above foresaw
        raise ConversionError(f"config.json has a field of an unexpected type or value: {exc}") from exc
    spec = spec.replace(hf_config=raw)
    if spec.mtp_layers and not isinstance(path, dict) and Path(path).is_dir():
        from .hf_io import HFCheckpoint, has_weights
        from .plan import with_source_mtp

        if has_weights(Path(path)):
            spec = with_source_mtp(spec, HFCheckpoint(path).names())
    return spec


def _typed(cfg: dict, key: str, kind: type | tuple[type, ...]):
    """cfg[key] (None if absent or null), refused by name when it is not of the kind the field has in HF configs."""
    v = cfg.get(key)
    numeric = kind in (int, float, (int, float))
    if v is not None and (not isinstance(v, kind) or (numeric and isinstance(v, bool))):
        want = {dict: "an object", list: "a list", str: "a string", int: "an integer", bool: "true or false",
                (int, float): "a number"}.get(kind, str(kind))
        raise ConversionError(f"config field {key}={v!r:.80} must be {want}")
    return v


def _family(arch: str | None, name: str | None) -> mappings.base.Family:
    if name is not None:
        if name not in mappings.FAMILIES:
            raise ConversionError(f"unknown family {name!r}; known families: {', '.join(mappings.supported())}")
        return mappings.FAMILIES[name]
    if arch is None:
        raise ConversionError("config.json has no 'architectures' field; pass --family NAME "
                              f"(one of: {', '.join(mappings.supported())})")
    if arch not in mappings.BY_ARCHITECTURE:
        raise ConversionError(f"unknown architecture {arch!r}; known families: {', '.join(mappings.supported())} "
                              "(use --family NAME if the model follows one of their layouts and tensor names)")
    return mappings.BY_ARCHITECTURE[arch]


def _hf_defaults(model_type: str | None) -> dict:
    """transformers' defaults for fields a config.json may omit (e.g. tie_word_embeddings, rms_norm_eps).

    Cached per transformers version in the user cache: importing transformers' config classes takes about
    1.5 s, most of a small conversion's start-up.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .default_model import cache_dir

    try:
        # (the fields too: a table cached before a field joined DEFAULTED would lack it for every model type)
        fields = zlib.crc32(" ".join(DEFAULTED).encode())
        path = cache_dir() / f"hf_defaults-transformers-{version('transformers')}-{fields:08x}.json"
    except PackageNotFoundError:
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or unreadable: rebuilt below
        table = None
    table = table if isinstance(table, dict) else {}
    key = str(model_type)
    if not isinstance(table.get(key), dict):
        table[key] = _defaults_from_transformers(model_type)
        try:  # a cache only: a read-only home still converts
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass
    return table[key]


def _defaults_from_transformers(model_type: str | None) -> dict:
    try:
        from transformers import CONFIG_MAPPING

        d = CONFIG_MAPPING[model_type]().to_dict()
    except Exception:  # unknown or remote-code model type: the JSON must then be complete
        return {}
    # Only flags the modeling code reads with a class default; sizes such as head_dim are derived from
    # other fields in the default instance and would contradict the real config.
    return {k: d[k] for k in DEFAULTED if d.get(k) is not None}


class _Deriver:
    def __init__(self, cfg: dict, arch: str, fam: mappings.base.Family, declared: frozenset = frozenset()):
        self.cfg, self.arch, self.fam = cfg, arch, fam
        self.declared = declared  # fields transformers' config class has (of DEFAULTED)
        self.implied = fam.architectures.get(arch, {})
        self.warnings: list[str] = []

    def get(self, key: str, default: Any = None, required: bool = False, kind: type | tuple | None = None) -> Any:
        """The first alias the config sets (the one transformers' config class has, where the config sets another
        too: Nemotron-H reads layer_norm_epsilon, not a stray rms_norm_eps), else what the architecture implies,
        else default; `kind`: the type the field must have (refused by name otherwise)."""
        names = [n for n in ALIASES.get(key, (key,)) if self.cfg.get(n) is not None]
        if names:
            name = next((n for n in names if n in self.declared), names[0])
            return self.cfg[name] if kind is None else _typed(self.cfg, name, kind)
        for name in ALIASES.get(key, (key,)):  # what the architecture's modeling code fixes
            if name in self.implied:
                return self.implied[name]
        if required:
            raise ConversionError(f"config.json lacks {' / '.join(ALIASES.get(key, (key,)))}")
        return default

    def number(self, key: str, default: float) -> float:
        return float(self.get(key, default, kind=(int, float)))

    def int_field(self, key: str, default: Any = None, required: bool = False) -> int | None:
        v = self.get(key, default, required)
        if v is None:
            return None
        name = ALIASES.get(key, (key,))[0]
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ConversionError(f"config field {name}={v!r:.80} must be a positive integer")
        if v > BOUNDS.get(key, v):
            raise ConversionError(f"config field {name}={v} is beyond any real model (at most {BOUNDS[key]})")
        return v

    def refuse(self, feature: str) -> None:
        raise ConversionError(f"{self.arch}: not supported: {feature}")

    def spec(self) -> ModelSpec:
        g = self.int_field
        hidden, heads = g("hidden_size", required=True), g("num_attention_heads", required=True)
        groups = g("num_query_groups", heads)
        if heads % groups:
            raise ConversionError(f"num_attention_heads={heads} is not divisible by num_key_value_heads={groups}")
        head_dim = g("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ConversionError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                      "and config.json has no head_dim")
            head_dim = hidden // heads
        act = self.get("activation", "silu", kind=str)
        plain = self.implied.get("mlp") == "plain"
        if plain and act not in PLAIN_ACTIVATIONS:
            self.refuse(f"mlp_hidden_act={act!r} (hf2mcore maps relu2 to --squared-relu)")
        if not plain and act not in GATED_ACTIVATIONS:
            self.refuse(f"hidden_act={act!r} (hf2mcore's gated MLPs: silu as --swiglu, gelu_pytorch_tanh through "
                        "its --spec hook)")
        attn_bias, mlp_bias = self.get("attention_bias", False, kind=bool), self.get("mlp_bias", False, kind=bool)
        qkv_bias = attn_bias or self.get("qkv_bias", False, kind=bool)  # (Qwen2-MoE's field: q/k/v only)
        if self.implied.get("attention_bias_is_qkv_only"):  # e.g. GLM-4.5: o_proj never has a bias
            attn_bias = False
        if attn_bias != mlp_bias:
            self.refuse(f"attention_bias={attn_bias} with mlp_bias={mlp_bias}: megatron-core's add_bias_linear "
                        "covers the attention output and MLP projections together")
        softcaps = {f: self.get(f, kind=(int, float)) for f in ("attn_logit_softcapping", "final_logit_softcapping")}
        for f, cap in softcaps.items():
            if cap is not None and not self.implied.get("reads_softcapping"):
                self._unread(f, cap, "it caps no logits")
                softcaps[f] = None
            elif cap is not None and cap <= 0:
                raise ConversionError(f"config field {f}={cap} must be positive")
        if self.implied.get("post_norms") and attn_bias:
            self.refuse("attention_bias with norms after the attention and the MLP (megatron-core adds the output "
                        "projections' bias after them)")
        quant = self.get("quantization_config", kind=dict)
        if quant:
            self.warnings.append(f"source weights are quantized (quantization_config.quant_method="
                                 f"{quant.get('quant_method')!r}); convert reads them dequantized")
        hybrid = self.implied.get("hybrid")  # which layout the family's layer pattern is read from
        pattern = (self._qwen3_next_pattern() if hybrid == "qwen3_next" else self._layer_pattern() if hybrid
                   else None)
        num_layers = len(pattern) if pattern else g("num_layers", required=True)
        fields: dict[str, Any] = dict(
            architecture=self.arch, family=self.fam.name, num_layers=num_layers, hidden_size=hidden,
            ffn_hidden_size=g("ffn_hidden_size", required=True), num_attention_heads=heads,
            num_query_groups=groups, kv_channels=head_dim, vocab_size=g("vocab_size", required=True),
            max_position_embeddings=g("max_position_embeddings", 4096),
            norm_epsilon=self.number("norm_epsilon", 1e-6), **self._dropout(),
            activation=self.implied.get("glu") or (PLAIN_ACTIVATIONS if plain else GATED_ACTIVATIONS)[act],
            glu_clamp=self.get("swiglu_limit", kind=(int, float)),
            add_qkv_bias=qkv_bias, add_bias_linear=attn_bias, **self._qk_norm(),
            attn_logit_softcap=softcaps["attn_logit_softcapping"],
            final_logit_softcap=softcaps["final_logit_softcapping"], softmax_scale=self._softmax_scale(head_dim),
            tie_word_embeddings=self.get("tie_word_embeddings", False, kind=bool),
            rope=self._rope(), moe=self._moe(num_layers, pattern), mla=self._mla(),
            **({} if hybrid else self._window()), nope_layers=self._nope_layers(num_layers), mtp_layers=self._mtp(),
            layer_pattern=pattern, mamba=self._mamba(pattern) if pattern and "M" in pattern else None,
            gdn=self._gdn() if pattern and "G" in pattern else None,
        )
        fields.update({k: self._overruled(k) for k in self.implied if k in ModelSpec.__dataclass_fields__})
        return ModelSpec(**fields, warnings=tuple(self.warnings), hf_config=self.cfg)

    def _softmax_scale(self, head_dim: int) -> float | None:
        """Gemma 2's attention scale, query_pre_attn_scalar ** -0.5; None where that is megatron-core's own."""
        scalar = self.get("query_pre_attn_scalar", kind=(int, float))
        if scalar is None or scalar == head_dim:
            return None
        if not self.implied.get("reads_query_pre_attn_scalar"):
            self._unread("query_pre_attn_scalar", scalar, f"it scales by 1/sqrt(head_dim={head_dim})")
            return None
        if scalar <= 0:
            raise ConversionError(f"config field query_pre_attn_scalar={scalar} must be positive")
        return scalar ** -0.5

    def _qwen3_next_pattern(self) -> str:
        """Qwen3-Next's layers as megatron-core's pattern: each HF layer is its mixer (`G` Gated DeltaNet or `*` gated
        attention, from layer_types or every full_attention_interval-th layer) and then its `E` MoE or `-` MLP
        (mlp_only_layers, decoder_sparse_step)."""
        n = self.int_field("num_layers", required=True)
        kinds = self.get("layer_types", kind=list)
        if kinds is None:
            every = self.int_field("full_attention_interval", 4)
            kinds = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        mixers = {"linear_attention": "G", "full_attention": "*"}
        odd = sorted({str(k) for k in kinds} - set(mixers))
        if odd or len(kinds) != n:
            self.refuse(f"layer_types {odd or len(kinds)} (hf2mcore maps {n} of linear_attention / full_attention)")
        moe = self._moe_pattern(n) if self.int_field("num_experts") else (0,) * n
        self.warnings.append("multi-token-prediction weights (mtp.*) of Qwen3-Next releases are left out, as "
                             "transformers does")
        return "".join(mixers[k] + ("E" if m else "-") for k, m in zip(kinds, moe))

    def _gdn(self) -> GDNSpec:
        g = self.int_field
        gdn = GDNSpec(conv_kernel=g("linear_conv_kernel_dim", 4), key_head_dim=g("linear_key_head_dim", required=True),
                      value_head_dim=g("linear_value_head_dim", required=True),
                      num_key_heads=g("linear_num_key_heads", required=True),
                      num_value_heads=g("linear_num_value_heads", required=True))
        if gdn.num_value_heads % gdn.num_key_heads:
            raise ConversionError(f"linear_num_value_heads={gdn.num_value_heads} is not divisible by "
                                  f"linear_num_key_heads={gdn.num_key_heads}")
        return gdn

    def _layer_pattern(self) -> str | None:
        """A hybrid model's layers as megatron-core's pattern symbols: hybrid_override_pattern (Nemotron-H's
        releases) or layers_block_type (transformers 5)."""
        pattern = self.get("hybrid_override_pattern", kind=str)
        if pattern is None:
            kinds = self.get("layers_block_type", kind=list) or self.get("layer_types", kind=list)
            if not kinds:
                raise ConversionError("config.json lacks hybrid_override_pattern / layers_block_type")
            odd = sorted({str(k) for k in kinds} - set(HYBRID_SYMBOLS))
            if odd:
                self.refuse(f"layers_block_type entries {odd}")
            pattern = "".join(HYBRID_SYMBOLS[k] for k in kinds)
        odd = sorted(set(pattern) - set(HYBRID_SYMBOLS.values()))
        if odd or not pattern:
            self.refuse(f"hybrid_override_pattern={pattern!r:.80} (layer symbols {odd}; hf2mcore maps M, *, - and E)")
        if len(pattern) > BOUNDS["num_layers"]:
            raise ConversionError(f"config field hybrid_override_pattern has {len(pattern)} layers, beyond any real "
                                  f"model (at most {BOUNDS['num_layers']})")
        declared = self.get("num_hidden_layers", kind=int)
        if declared is not None and declared != len(pattern):
            raise ConversionError(f"config.json says num_hidden_layers={declared}, its layer pattern has "
                                  f"{len(pattern)} layers")
        if self.get("num_nextn_predict_layers", 0, kind=int):
            self.refuse("multi-token-prediction layers of a hybrid model (mtp_hybrid_override_pattern)")
        return pattern

    def _mamba(self, pattern: str) -> MambaSpec:
        """Mamba-2 sizes; what megatron-core's MambaMixer fixes is refused or, where only numerics differ, said."""
        g = self.int_field
        m = MambaSpec(state_dim=g("ssm_state_size", required=True), head_dim=g("mamba_head_dim", required=True),
                      num_groups=g("n_groups", 1), num_heads=g("mamba_num_heads", required=True))
        if m.num_heads % m.num_groups:
            raise ConversionError(f"mamba_num_heads={m.num_heads} is not divisible by n_groups={m.num_groups}")
        if g("conv_kernel", 4) != 4:
            self.refuse(f"conv_kernel={self.get('conv_kernel')} (megatron-core's Mamba layer has d_conv 4; no flag)")
        if not self.get("use_conv_bias", True, kind=bool):
            self.refuse("use_conv_bias=false (megatron-core's Mamba layer always has a conv1d bias)")
        for f in ("use_bias", "mamba_proj_bias"):
            if self.get(f, False, kind=bool):
                self.refuse(f"{f}=true (megatron-core's Mamba in_proj and out_proj have no bias)")
        act = self.get("mamba_hidden_act", "silu", kind=str)
        if act not in ("silu", "swish"):
            self.refuse(f"mamba_hidden_act={act!r} (megatron-core's Mamba layer uses silu)")
        if self.get("moe_latent_size") is not None:
            self.refuse("moe_latent_size (Nemotron 3 Super/Ultra: megatron-core 0.19 builds the latent MoE projections "
                        "only from Transformer Engine modules)")
        lo, hi = self._hf_dt_limit(pattern.index("M"))
        if (lo, hi) != (0.0, math.inf):
            self.warnings.append(f"time_step_limit: transformers' Mamba-2 mixer keeps each step size dt within "
                                 f"[{lo}, {hi}], megatron-core's (no flag) only above 0; equal while dt stays "
                                 "inside (measured 9e-7), 4e-3 rel. err. where dt_bias puts it below a floor of "
                                 "1e-3 (a tiny Nemotron-H with dt_bias -7)")
        return m

    def _dropout(self) -> dict:
        """Training only: attention_dropout, as HF's attention reads it; residual dropout where the modeling code
        has one (Phi-3's resid_pdrop; the other families have none)."""
        p = {"attention_dropout": self.number("attention_dropout", 0.0),
             "hidden_dropout": self.number("resid_pdrop", 0.0) if self.implied.get("reads_resid_pdrop") else 0.0}
        for f, v in p.items():
            if not 0 <= v < 1:
                raise ConversionError(f"config field {f}={v} must be at least 0 and below 1")
        if p["hidden_dropout"]:
            self.warnings.append(f"resid_pdrop={p['hidden_dropout']}: megatron-core also drops out the embeddings at "
                                 f"--hidden-dropout, {self.arch} does not (in training only)")
        return p

    def _hf_dt_limit(self, layer: int) -> tuple[float, float]:
        """The range transformers' Mamba-2 mixer clamps dt to, asked of the mixer (built on the meta device): up
        to transformers 5.24 [time_step_min, inf], from 5.25 the config's time_step_limit, as the release's own
        modeling code. The latter where transformers cannot build it."""
        limit = self.get("time_step_limit", [0.0, math.inf], kind=list)
        try:
            import torch

            config = self._hf_config()
            modeling = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
            with torch.device("meta"):
                limit = getattr(modeling, self.implied["mamba_mixer"])(config, layer_idx=layer).time_step_limit
        except Exception:  # (a transformers without the class, or refusing the config: it cannot run the model)
            pass
        if len(limit) != 2 or not all(isinstance(v, (int, float)) for v in limit):
            raise ConversionError(f"config field time_step_limit={limit!r:.60} must be two numbers")
        return float(limit[0]), float(limit[1])

    def _mtp(self) -> int:
        """Multi-token-prediction layers (DeepSeek-V3, GLM-4.5: stored after the last decoder layer)."""
        n = self.get("num_nextn_predict_layers", 0, kind=int)
        if not 0 <= n <= 64:
            raise ConversionError(f"config field num_nextn_predict_layers={n} must be between 0 and 64")
        return n

    def _qk_norm(self) -> dict:
        """use_qk_norm: RMSNorm with weights (GLM), or a weightless L2 norm where the architecture says so (Llama 4)."""
        on = self.get("use_qk_norm", False, kind=bool)
        l2 = on and bool(self.implied.get("qk_norm_is_l2"))
        return {"qk_layernorm": on and not l2, "qk_l2_norm": l2}

    def _nope_layers(self, n: int) -> tuple[int, ...] | None:
        """Layers without rotary embeddings (Llama 4's no_rope_layers: 1 = uses rope; empty = every 4th is NoPE)."""
        if "no_rope_layers" not in self.cfg:
            return None
        interval = self.int_field("no_rope_layer_interval", 4)
        uses = _typed(self.cfg, "no_rope_layers", list) or [int((i + 1) % interval != 0) for i in range(n)]
        if len(uses) != n or not all(u in (0, 1) for u in uses):
            raise ConversionError(f"config field no_rope_layers={uses!r:.80} must be {n} entries of 0 or 1")
        effects = {}
        if self.get("attention_chunk_size"):
            effects["attention_chunk_size"] = "attention is chunked every {} tokens on rope layers"
        if self.get("floor_scale") and self.get("attn_temperature_tuning", True):
            effects["floor_scale"] = "NoPE layers scale queries by position beyond {} tokens"
        for f, what in effects.items():
            self.warnings.append(f"{f}={self.get(f)}: in HF {what.format(self.get(f))}; megatron-core attends "
                                 "causally over the whole sequence, so outputs agree up to that length")
        return tuple(1 - int(u) for u in uses)

    def _window(self) -> dict:
        """sliding_window (every layer, or the `sliding_attention` entries of layer_types)."""
        window = self.get("sliding_window", kind=int)
        if not window or not self.get("use_sliding_window", True):
            return {}
        if not self.implied.get("reads_sliding_window"):
            self._unread("sliding_window", window, "it attends over the whole sequence")
            return {}
        types = self.get("layer_types", kind=list) or self._computed_layer_types()
        if not types:
            return {"window": window}
        odd = sorted(set(types) - {"sliding_attention", "full_attention"})
        if odd:
            self.refuse(f"layer_types {odd}")
        layers = tuple(int(t == "sliding_attention") for t in types)
        return {"window": window, "window_layers": layers} if any(layers) else {}  # (no layer slides: none)

    def _overruled(self, field: str) -> Any:
        """The value the architecture's modeling code fixes for a config field (Nemotron-H never ties its head),
        said where the config says otherwise."""
        fixed = self.implied[field]
        if self.cfg.get(field) not in (None, fixed):
            self._unread(field, self.cfg[field], f"it keeps {field}={fixed}")
        return fixed

    def _unread(self, field: str, value: Any, instead: str) -> None:
        """A field the architecture's modeling code in transformers never reads (the family does not say it
        reads it): converted as HF runs the model, and said."""
        self.warnings.append(f"{field}={value}: {self.arch}'s modeling code in transformers does not read it "
                             f"({instead}): converted as transformers runs the model")

    def _hf_config(self):
        """transformers' config object for this config.json: its class computes what the file leaves out. Imports
        transformers (about 1.5 s): only for a windowed config without layer_types, longrope and Mamba layers."""
        from transformers import AutoConfig

        from .replay import UNREAD  # (no structure: a config class may refuse odd values there, e.g. token ids)

        return AutoConfig.for_model(**{k: v for k, v in self.cfg.items() if k not in UNREAD})

    def _computed_layer_types(self) -> list | None:
        """The layer_types transformers' config class computes where config.json has none, by a rule of each class's
        own (Qwen2's: the layers from max_window_layers, or its default, on; Qwen2-MoE's: every other layer below
        it; gpt-oss: every other layer). None where the class computes none: every layer slides."""
        try:
            types = getattr(self._hf_config(), "layer_types", None)
        except Exception as e:  # (a model type transformers does not know)
            if self.get("max_window_layers") is None:
                return None
            self.refuse(f"max_window_layers={self.get('max_window_layers')} without layer_types: transformers "
                        f"cannot tell which layers use the sliding window ({type(e).__name__}: {e})"[:300])
        return list(types) if types else None

    def _rope(self) -> RopeSpec:
        if self.implied.get("position_embedding") == "none":
            return RopeSpec(kind="none")
        params = {**(self.get("rope_scaling", kind=dict) or {}), **(self.get("rope_parameters", kind=dict) or {})}
        num = lambda k, default: float(_typed(params, k, (int, float)) if k in params else default)  # noqa: E731
        if params and not any(k in params for k in ("rope_type", "type", "rope_theta")):
            self.refuse("per-layer-type rope_parameters")
        theta = num("rope_theta", self.number("rope_theta", 10000.0))
        kind = _typed(params, "rope_type", str) or _typed(params, "type", str) or "default"
        percent = num("partial_rotary_factor", self.number("partial_rotary_factor", 1.0))
        if percent != 1.0 and kind == "default" and not self.implied.get("reads_partial_rotary"):
            self._unread("partial_rotary_factor", percent, "it rotates every dimension of a head")
            percent = 1.0
        if percent != 1.0 and kind not in ("default", "longrope"):
            self.refuse(f"partial_rotary_factor={percent} with {kind} rope scaling")
        if kind == "default":
            return RopeSpec(theta=theta, percent=percent, interleaved=bool(self.get("rope_interleaved", False)))
        factor = num("factor", 1.0)
        if kind == "llama3":
            got = {k: num(k, want) for k, want in MCORE_LLAMA3.items()}
            return RopeSpec(kind="llama3", theta=theta, factor=factor, low_freq_factor=got["low_freq_factor"],
                            high_freq_factor=got["high_freq_factor"],
                            original_max_position_embeddings=int(got["original_max_position_embeddings"]),
                            interleaved=bool(self.get("rope_interleaved", False)))
        if kind == "yarn":
            omp = (_typed(params, "original_max_position_embeddings", int)
                   or self.get("original_max_position_embeddings", kind=int))
            mscale_all_dim = num("mscale_all_dim", 0.0)
            return RopeSpec(kind="yarn", theta=theta, factor=factor, original_max_position_embeddings=omp,
                            truncate=params.get("truncate", True) is not False,
                            beta_fast=num("beta_fast", 32), beta_slow=num("beta_slow", 1),
                            mscale=self._yarn_mscale(params, factor, mscale_all_dim), mscale_all_dim=mscale_all_dim)
        if kind == "longrope":
            if self.implied.get("hybrid") or self.get("kv_lora_rank"):  # (the fix is in layer_spec's GPT path)
                self.refuse("longrope rope_scaling on a hybrid or multi-latent-attention model")
            omp, inv_freq, long_inv_freq, attention_factor = self._hf_longrope()
            self.warnings.append(f"rope_scaling longrope: HF takes the long factors for a sequence longer than "
                                 f"original_max_position_embeddings={omp} tokens, the short ones else; one model "
                                 "has one set: the --exact hook takes the long ones where --seq-length is longer, "
                                 "so outputs agree for sequences on the same side of that length as --seq-length")
            return RopeSpec(kind="longrope", theta=theta, percent=percent, original_max_position_embeddings=omp,
                            inv_freq=inv_freq, long_inv_freq=long_inv_freq, attention_factor=attention_factor)
        if kind == "dynamic":  # (HF's base at init, and at any length up to max_position_embeddings, is theta)
            self.warnings.append(f"rope_scaling dynamic (factor {factor}): in HF the rope base grows with the "
                                 f"sequence beyond max_position_embeddings={self.get('max_position_embeddings')} "
                                 "tokens, megatron-core's stays: outputs agree up to that length")
            return RopeSpec(theta=theta, interleaved=bool(self.get("rope_interleaved", False)))
        if kind == "linear":  # position interpolation: megatron-core divides the positions by the factor
            if not factor.is_integer() or factor < 1:
                self.refuse(f"linear rope_scaling factor={factor} (Megatron-LM's "
                            "--rotary-seq-len-interpolation-factor takes a whole number)")
            if self.get("kv_lora_rank"):
                self.refuse("linear rope_scaling with multi-latent attention (megatron-core's MLA rope has none)")
            return RopeSpec(kind="linear", theta=theta, factor=factor,
                            interleaved=bool(self.get("rope_interleaved", False)))
        self.refuse(f"rope_scaling type {kind!r} (megatron-core has plain, linear, llama3 and yarn rope; dynamic: plain)")

    def _hf_longrope(self) -> tuple[int, tuple[float, ...], tuple[float, ...], float]:
        """Longrope as transformers runs it: the original context (its default where the config has none), the
        inverse frequencies from the short factors (sequences up to that length) and from the long ones (longer),
        and the attention factor (the same for both)."""
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            init, config = ROPE_INIT_FUNCTIONS["longrope"], self._hf_config()
            config.standardize_rope_params()
            omp = int(config.rope_parameters["original_max_position_embeddings"])
            (short, attention_factor), (long, _) = init(config, "cpu"), init(config, "cpu", seq_len=omp + 1)
        except Exception as e:  # (a config transformers refuses: it cannot run the model either)
            self.refuse(f"rope_scaling longrope that transformers cannot compute ({type(e).__name__}: {e})"[:300])
        return omp, tuple(short.tolist()), tuple(long.tolist()), float(attention_factor)

    def _yarn_mscale(self, params: dict, factor: float, mscale_all_dim: float) -> float:
        """megatron-core's yarn scales cos and sin by g(factor, mscale) / g(factor, mscale_all_dim), with
        g(f, m) = 0.1 m ln f + 1; HF by `attention_factor` if given, by that ratio only where mscale and
        mscale_all_dim are both set (DeepSeek's), else by g(factor, 1). The mscale that gives HF's factor (MLA's
        softmax scale takes mscale_all_dim alone, in both)."""
        given, mscale = _typed(params, "attention_factor", (int, float)), _typed(params, "mscale", (int, float))
        if given is None and mscale and mscale_all_dim:
            return float(mscale)
        if given is None and not mscale_all_dim:
            return 1.0
        if given is not None:
            target = float(given)
        else:
            target = 1 + 0.1 * math.log(factor) if factor > 1 else 1.0
        if factor <= 1:  # g is 1 whatever mscale is
            if target != 1.0:
                self.refuse(f"yarn attention_factor={target} with factor={factor} (megatron-core scales by 1 "
                            "for factor <= 1)")
            return 1.0
        return (target * (1 + 0.1 * mscale_all_dim * math.log(factor)) - 1) / (0.1 * math.log(factor))

    def _moe(self, num_layers: int, layers: str | None = None) -> MoESpec | None:
        experts = self.int_field("num_experts")
        if not experts or (layers is not None and "E" not in layers):  # a hybrid model's E layers are its MoE
            return None
        topk = self.int_field("topk", required=True)
        ffn = self.int_field("moe_ffn") or self.int_field("intermediate_size") or self.int_field("ffn_hidden_size")
        pattern = tuple(int(c == "E") for c in layers) if layers else self._moe_pattern(num_layers)
        shared = (self.get("shared_expert_intermediate_size", kind=int)
                  or self.get("moe_shared_expert_intermediate_size", kind=int)
                  or (self.get("n_shared_experts", kind=int) or 0) * ffn)
        score = self.get("scoring_func", "softmax", kind=str)
        if score not in ("softmax", "sigmoid"):
            self.refuse(f"scoring_func={score!r}")
        norm = bool(self._overruled("norm_topk_prob") if "norm_topk_prob" in self.implied else
                    self.get("norm_topk_prob", False, kind=bool))
        if score == "sigmoid" and not norm and topk > 1:
            self.refuse("scoring_func='sigmoid' with norm_topk_prob=false (megatron-core renormalises sigmoid top-k)")
        method = self.get("topk_method", "greedy", kind=str)
        n_group, topk_group = self.int_field("n_group") or 1, self.int_field("topk_group") or 1
        if method not in ("greedy", "noaux_tc"):
            self.refuse(f"topk_method={method!r} (megatron-core's group routing scores groups by their top-2 sum, "
                        "as noaux_tc does)")
        scaling = self.get("routed_scaling_factor", kind=(int, float))
        grouped = method == "noaux_tc" and n_group > 1
        return MoESpec(
            num_experts=experts, topk=topk, ffn_hidden_size=ffn, layer_pattern=pattern, shared_expert_size=shared,
            score_function=score, pre_softmax=score == "softmax" and not norm, expert_bias=method == "noaux_tc",
            # HF's greedy top-k ignores n_group; only noaux_tc routes within groups
            num_groups=n_group if grouped else None, group_topk=topk_group if grouped else None,
            topk_scaling_factor=float(scaling) if scaling not in (None, 1, 1.0) else None,
            shared_expert_gate=bool(self.implied.get("shared_expert_gate", False)),
            probs_on_input=bool(self.implied.get("moe_probs_on_input", False)),
        )

    def _moe_pattern(self, n: int) -> tuple[int, ...]:
        """1 marks a MoE layer: DeepSeek first_k_dense_replace/moe_layer_freq, Qwen decoder_sparse_step/
        mlp_only_layers, Llama-4 interleave_moe_layer_step."""
        first_dense = self.get("first_k_dense_replace", 0, kind=int)
        freq = self.int_field("moe_layer_freq", 1)
        step = self.int_field("decoder_sparse_step") or self.int_field("interleave_moe_layer_step") or 1
        dense_only = self.get("mlp_only_layers", [], kind=list)
        if not all(isinstance(i, int) for i in dense_only):
            raise ConversionError(f"config field mlp_only_layers={dense_only!r:.80} must list layer numbers")
        pattern = tuple(int(i >= first_dense and i % freq == 0 and (i + 1) % step == 0 and i not in dense_only)
                        for i in range(n))
        if not any(pattern):
            self.refuse("an expert count with no MoE layer in the layer pattern")
        return pattern

    def _mla(self) -> MLASpec | None:
        kv_rank = self.int_field("kv_lora_rank")
        if not kv_rank:
            return None
        if self.get("rope_interleave", True) is False:  # DeepSeek-V3's modeling code: rotate_half on q/k_rot
            self.refuse("rope_interleave=false (megatron-core's multi-latent attention rotates the interleaved "
                        "pairs of DeepSeek's weights)")
        g = self.int_field
        return MLASpec(q_lora_rank=g("q_lora_rank"), kv_lora_rank=kv_rank,
                       qk_head_dim=g("qk_nope_head_dim", required=True),
                       qk_pos_emb_head_dim=g("qk_rope_head_dim", required=True),
                       v_head_dim=g("v_head_dim", required=True))


def hf_param_count(spec: ModelSpec) -> int:
    """Parameters of the HF model, instantiated on the meta device from the same config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(spec.hf_config)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def mcore_param_count(spec: ModelSpec) -> int:
    model = spec.build_model(device="meta")
    return sum(p.numel() for p in model.parameters())

