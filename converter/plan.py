"""spec + family rules -> the tensor plan: for every Megatron tensor, the HF tensors it is built from and how.

The same plan runs forwards (import) and backwards (export). Building it checks completeness both ways: every
Megatron tensor has a rule and its sources, every HF tensor is used exactly once, and every shape agrees
(transforms are first run on meta tensors, so a mismatch stops before any byte is written).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

# the module, not its names: mappings imports converter.transforms, so either package may load first
import mappings

from .errors import ConversionError
from .spec import ModelSpec
from .transforms import Ctx


@dataclass(frozen=True)
class Job:
    mcore: str
    sources: tuple[str, ...]
    rule: mappings.base.Rule
    ctx: Ctx

    def to_mcore(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return self.rule.transform.to_mcore(tensors, self.ctx)

    def to_hf(self, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.sources, self.rule.transform.to_hf(tensor, self.ctx)))


@dataclass(frozen=True)
class Plan:
    jobs: dict[str, Job]  # Megatron tensor name -> job, in model order
    ignored: tuple[str, ...] = ()  # HF tensors deliberately left out
    copies: dict[str, str] = dataclasses.field(default_factory=dict)  # HF tensor -> the HF tensor it repeats

    def hf_names(self) -> list[str]:
        return [s for j in self.jobs.values() for s in j.sources]

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Megatron tensor `name` as its HF tensors, each followed by the copies that repeat it."""
        out = []
        for hf_name, t in self.jobs[name].to_hf(tensor):
            out += [(hf_name, t), *((c, t.clone()) for c, s in self.copies.items() if s == hf_name)]
        return out


def mcore_shapes(model) -> dict[str, tuple[int, ...]]:
    """Weights of a megatron-core model by state-dict name (buffers such as the expert bias included)."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}


def build_plan(spec: ModelSpec, shapes: dict[str, tuple[int, ...]],
               hf_shapes: dict[str, tuple[int, ...]] | None = None, copies: bool = True) -> Plan:
    """`shapes`: Megatron names at TP=1 (global layer numbers); `hf_shapes`: the source checkpoint's tensors
    (None when exporting without one: then the HF side is whatever the rules name, and the family's copies
    too unless `copies` is False)."""
    family = mappings.FAMILIES[spec.family]
    jobs: dict[str, Job] = {}
    unmapped = []
    for name, shape in shapes.items():
        found = _match(family.rules, _rule_name(spec, name))
        if found is None:
            unmapped.append(name)
            continue
        rule, fields = found
        g = spec.gdn
        ctx = Ctx(heads=spec.num_attention_heads, groups=spec.num_query_groups, head_dim=spec.kv_channels,
                  shape=shape, hf_rows=spec.vocab_size,
                  delta_heads=(g.num_key_heads, g.key_head_dim, g.num_value_heads, g.value_head_dim) if g else (0,) * 4)
        jobs[name] = Job(name, tuple(rule.sources(fields)), rule, ctx)
    if unmapped:
        raise ConversionError(f"family {family.name!r} has no rule for {len(unmapped)} Megatron tensors: "
                              + ", ".join(unmapped[:8]))
    dup = _copies(spec, family, jobs, hf_shapes, copies)
    plan = Plan(jobs, copies=dup)
    used: dict[str, str] = {}
    for j in jobs.values():
        for s in j.sources:
            if s in used:
                raise ConversionError(f"HF tensor {s} would feed both {used[s]} and {j.mcore}")
            used[s] = j.mcore
    if hf_shapes is None:
        return plan
    missing = [s for s in used if s not in hf_shapes]
    if missing:
        raise ConversionError(f"the HF checkpoint lacks {len(missing)} tensors the model needs: "
                              + ", ".join(missing[:8]))
    ignore = [re.compile(p) for p in family.ignore] + _implied_ignores(spec)
    ignored = [n for n in hf_shapes if n not in used and n not in dup and any(p.fullmatch(n) for p in ignore)]
    unused = [n for n in hf_shapes if n not in used and n not in dup and n not in ignored]
    if unused:
        raise ConversionError(f"{len(unused)} HF tensors have no place in the Megatron model: "
                              + ", ".join(unused[:8]))
    for j in jobs.values():
        _check_shapes(j, [hf_shapes[s] for s in j.sources])
    for c, s in dup.items():
        if tuple(hf_shapes[c]) != tuple(hf_shapes[s]):
            raise ConversionError(f"{c} {tuple(hf_shapes[c])} should repeat {s} {tuple(hf_shapes[s])}")
    return Plan(jobs, tuple(ignored), dup)


_MTP = re.compile(r"mtp\.layers\.(\d+)\.(.*)")
_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.*)")


def _rule_name(spec: ModelSpec, name: str) -> str:
    """The name the family rules know a Megatron tensor by: its HF layer's number where one HF layer is several
    Megatron layers (hf_layer_span); MTP layer m is HF layer num_layers + m, and its decoder layer
    (`mtp_model_layer`) is named as a decoder layer of that number."""
    layer = _LAYER.fullmatch(name)
    if layer is not None and spec.hf_layer_span > 1:
        return f"decoder.layers.{int(layer.group(1)) // spec.hf_layer_span}.{layer.group(2)}"
    m = _MTP.fullmatch(name)
    if m is None:
        return name
    i, rest = spec.num_layers + int(m.group(1)), m.group(2)
    if rest.startswith("mtp_model_layer."):
        return f"decoder.layers.{i}.{rest.removeprefix('mtp_model_layer.')}"
    return f"mtp.layers.{i}.{rest}"


def _copies(spec, family, jobs, hf_shapes, wanted: bool) -> dict[str, str]:
    """The family's repeated HF tensors for this model's MTP layers: those the source holds, or (export) all."""
    out = {}
    for i in range(spec.num_layers, spec.num_layers + spec.mtp_layers):
        for pattern, mcore in family.copies.items():
            job = jobs.get(mcore) or jobs.get("embedding.word_embeddings.weight")  # tied: the embedding is the head
            name = pattern.format(i=i)
            if job is not None and (name in hf_shapes if hf_shapes is not None else wanted):
                out[name] = job.sources[0]
    return out


def check_source(spec: ModelSpec, hf_shapes: dict[str, tuple[int, ...]]) -> None:
    """Before anything is built from the config: the weights hold as many layers as it says, and its vocabulary
    and hidden size (a config that says 4000 layers would otherwise build them all before the first mismatch)."""
    family = mappings.FAMILIES[spec.family]
    prefixes = {p.split("{i}")[0] for r in family.rules for p in r.hf if "{i}" in p}
    found = set()
    for name in hf_shapes:
        for prefix in prefixes:
            head, _, _ = name.removeprefix(prefix).partition(".")
            if name.startswith(prefix) and head.isascii() and head.isdigit():
                found.add(int(head))
    extra, layers = _mtp_layers(spec), spec.num_layers // spec.hf_layer_span
    held = max(found, default=-1) + 1
    if not layers <= held <= layers + extra:
        raise ConversionError(f"config.json says {layers} layers; the weights hold {held} "
                              f"(numbered after {' or '.join(sorted(prefixes))})")
    embed = next((r.hf[0] for r in family.rules if r.mcore == "embedding.word_embeddings.weight"), None)
    want = (spec.vocab_size, spec.hidden_size)
    if embed in hf_shapes and tuple(hf_shapes[embed]) != want:
        raise ConversionError(f"config.json says vocab_size={want[0]}, hidden_size={want[1]}; the weights' {embed} "
                              f"is {tuple(hf_shapes[embed])}")


def _mtp_layers(spec: ModelSpec) -> int:
    """Multi-token-prediction layers stored after the last decoder layer."""
    return spec.hf_config.get("num_nextn_predict_layers") or 0


def _match(rules, name):
    for rule in rules:
        fields = rule.match(name)
        if fields is not None:
            return rule, fields
    return None


def _implied_ignores(spec: ModelSpec) -> list[re.Pattern]:
    out = []
    if spec.tie_word_embeddings:  # some tied checkpoints still store the shared matrix twice
        out.append(re.compile(r"lm_head\.weight"))
    left_out = range(spec.num_layers + spec.mtp_layers, spec.num_layers + _mtp_layers(spec))
    if left_out:  # MTP layers that convert was told to leave out (it says so: ModelSpec.warnings)
        layers = "|".join(map(str, left_out))
        out.append(re.compile(rf"model\.layers\.({layers})\..*"))
    return out


def with_source_mtp(spec: ModelSpec, hf_names, keep: bool = True) -> ModelSpec:
    """The spec with the multi-token-prediction layers the weights hold, or none (keep=False: left out on purpose);
    a warning says what is not converted and why."""
    declared = _mtp_layers(spec)
    layers = {n.split(".")[2] for n in hf_names if n.startswith("model.layers.")}
    held = [i for i in range(spec.num_layers, spec.num_layers + declared) if str(i) in layers]
    if held and keep:
        return spec.replace(mtp_layers=declared)  # (a layer missing from the weights is named by build_plan)
    if held:
        why = (f"multi-token-prediction layers left out on purpose (--no-mtp): the tensors of model.layers."
               f"{held[0]}{'-' + str(held[-1]) if len(held) > 1 else ''} are not converted")
    elif declared:
        why = (f"config.json declares {declared} multi-token-prediction layer(s) (num_nextn_predict_layers), but "
               "the weights hold none: converted without them")
    else:
        return spec
    return spec.replace(mtp_layers=0, warnings=(*spec.warnings, why))


def _check_shapes(job: Job, hf_shapes: list[tuple[int, ...]]) -> None:
    fakes = [torch.empty(s, device="meta") for s in hf_shapes]
    try:
        out = tuple(job.to_mcore(fakes).shape)
    except RuntimeError as exc:
        raise ConversionError(f"{job.mcore}: HF shapes {dict(zip(job.sources, hf_shapes))} do not fit "
                              f"the {job.rule.transform.name} transform: {exc}") from None
    if out != job.ctx.shape:
        raise ConversionError(f"{job.mcore}: expects shape {job.ctx.shape}, HF tensors "
                              f"{dict(zip(job.sources, hf_shapes))} give {out}")
