"""Pure tensor transforms between HF and Megatron-Core layouts, each with its inverse.

`to_mcore(sources, ctx)` takes the HF tensors in the order a rule lists them and returns the Megatron tensor;
`to_hf(tensor, ctx)` returns the HF tensors in that same order. `ctx` carries the spec and the target shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Ctx:
    heads: int
    groups: int
    head_dim: int
    shape: tuple[int, ...]  # Megatron tensor shape (vocab rows may be padded)
    hf_rows: int = 0  # HF row count for vocab tensors
    delta_heads: tuple[int, int, int, int] = (0, 0, 0, 0)  # Gated DeltaNet: key heads, key dim, value heads, value dim


@dataclass(frozen=True)
class Transform:
    name: str
    to_mcore: Callable[[list[torch.Tensor], Ctx], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Ctx], list[torch.Tensor]]
    rowwise: bool = True  # moves whole rows (dim 0): a part of the result needs only some source rows


def _cat(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat as copies into one allocation. On meta tensors (the plan's up-front shape check) torch.cat runs
    a Python meta kernel that imports torch._dynamo: about 1.2 s of every conversion's start-up."""
    shape = list(parts[0].shape)
    for p in parts:  # what torch.cat checks and copy_'s broadcasting would let through
        if p.dim() != len(shape) or any(n != m for d, (n, m) in enumerate(zip(p.shape, shape)) if d != dim):
            raise RuntimeError(f"cannot concatenate shapes {[tuple(q.shape) for q in parts]} along dim {dim}")
    shape[dim] = sum(p.shape[dim] for p in parts)
    out = parts[0].new_empty(shape)
    at = 0
    for p in parts:
        out.narrow(dim, at, p.shape[dim]).copy_(p)
        at += p.shape[dim]
    return out


def _qkv_merge(src, c: Ctx):
    q, k, v = src
    per = c.heads // c.groups
    rest = q.shape[1:]  # () for biases, (h,) for weights
    grouped = [q.reshape(c.groups, per * c.head_dim, *rest), k.reshape(c.groups, c.head_dim, *rest),
               v.reshape(c.groups, c.head_dim, *rest)]
    return _cat(grouped, dim=1).reshape(-1, *rest)


def _qkv_split(w, c: Ctx):
    per = c.heads // c.groups
    rest = w.shape[1:]
    g = w.reshape(c.groups, (per + 2) * c.head_dim, *rest)
    q, k, v = torch.split(g, [per * c.head_dim, c.head_dim, c.head_dim], dim=1)
    return [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]


def _fused_qkv_merge(src, c: Ctx):
    q, k, v = torch.split(src[0], [c.heads * c.head_dim, c.groups * c.head_dim, c.groups * c.head_dim])
    return _qkv_merge([q, k, v], c)


def _fused_qkv_split(w, c: Ctx):
    return [torch.cat(_qkv_split(w, c))]


def _gated_qkv_merge(src, c: Ctx):
    """HF's q_proj holds each head's query then its output gate: Megatron's linear_qkv is, per query group, the
    group's queries, their gates, its key and its value."""
    q, k, v = src
    rest = q.shape[1:]
    both = q.reshape(c.heads, 2, c.head_dim, *rest)
    return _qkv_merge([_cat([both[:, 0].reshape(c.groups, -1, *rest), both[:, 1].reshape(c.groups, -1, *rest)],
                            dim=1).reshape(-1, *rest), k, v], _gated(c))


def _gated_qkv_split(w, c: Ctx):
    qg, k, v = _qkv_split(w, _gated(c))
    rest = w.shape[1:]
    per = c.heads // c.groups
    g = qg.reshape(c.groups, 2, per, c.head_dim, *rest)  # per group: queries, then gates
    return [torch.stack([g[:, 0], g[:, 1]], dim=2).reshape(-1, *rest), k, v]


def _gated(c: Ctx) -> Ctx:
    """The attention seen by _qkv_merge when each query head carries its gate: twice the heads per group."""
    return Ctx(heads=2 * c.heads, groups=c.groups, head_dim=c.head_dim, shape=c.shape)


def _delta_merge(src, c: Ctx):
    """HF's Gated DeltaNet projections, per key head [q, k, v..., z...] and [b..., a...] -> Megatron's in_proj
    [q; k; v; z; beta; alpha], each over all heads in order."""
    qkvz, ba = src
    nk, dk, nv, dv = c.delta_heads
    rest = qkvz.shape[1:]
    r = nv // nk
    q, k, v, z = qkvz.reshape(nk, -1, *rest).split([dk, dk, r * dv, r * dv], dim=1)
    b, a = ba.reshape(nk, 2 * r, *rest).split([r, r], dim=1)
    return _cat([t.reshape(-1, *rest) for t in (q, k, v, z, b, a)])


def _delta_split(w, c: Ctx):
    nk, dk, nv, dv = c.delta_heads
    rest = w.shape[1:]
    q, k, v, z, b, a = w.split([nk * dk, nk * dk, nv * dv, nv * dv, nv, nv])
    per_head = lambda *ts: _cat([t.reshape(nk, -1, *rest) for t in ts], dim=1).reshape(-1, *rest)  # noqa: E731
    return [per_head(q, k, v, z), per_head(b, a)]


def _pad_rows(src, c: Ctx):
    t = src[0]
    if t.shape[0] == c.shape[0]:
        return t
    return _cat([t, t.new_zeros(c.shape[0] - t.shape[0], *t.shape[1:])])


def _interleaved_to_halves(src, c: Ctx):
    """Rows stored gate,up,gate,up,... (gpt-oss) -> [gate; up]."""
    t = src[0]
    return _cat([t[0::2], t[1::2]])


def _halves_to_interleaved(w, c: Ctx):
    g, u = w.chunk(2)
    return [torch.stack([g, u], dim=1).reshape(w.shape)]


COPY = Transform("copy", lambda s, c: s[0], lambda w, c: [w])
QKV = Transform("qkv", _qkv_merge, _qkv_split)
FUSED_QKV = Transform("fused_qkv", _fused_qkv_merge, _fused_qkv_split)
GATED_QKV = Transform("gated_qkv", _gated_qkv_merge, _gated_qkv_split)
DELTA_IN_PROJ = Transform("delta_in_proj", _delta_merge, _delta_split)
GATE_UP = Transform("gate_up", lambda s, c: _cat(s), lambda w, c: list(w.chunk(2)))
VOCAB = Transform("vocab", _pad_rows, lambda w, c: [w[: c.hf_rows]])
INTERLEAVED_GATE_UP = Transform("interleaved_gate_up", _interleaved_to_halves, _halves_to_interleaved)
TRANSPOSE = Transform("transpose", lambda s, c: s[0].t(), lambda w, c: [w.t()], rowwise=False)
# gpt-oss experts: HF [hidden, 2 * ffn] with gate and up interleaved along the columns
INTERLEAVED_GATE_UP_T = Transform("interleaved_gate_up_t", lambda s, c: _interleaved_to_halves([s[0].t()], c),
                                  lambda w, c: [_halves_to_interleaved(w, c)[0].t()], rowwise=False)
