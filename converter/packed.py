"""HF tensors that hold every expert of a layer in one array (leading expert axis: gpt-oss, Llama 4), seen one
expert at a time. A family lists such tensors (`Family.packed`); its rules name expert e's slice `<name>[{e}]`.
Reading presents those per-expert tensors; writing stacks them back into the HF array."""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from .errors import ConversionError

VIRTUAL = re.compile(r"(.+)\[(\d+)\]")


class PackedExperts:
    """A checkpoint reader (same interface) that lists `X[e]` for every expert e of each packed tensor X."""

    def __init__(self, hf, patterns: Iterable[str]):
        self.hf = hf
        rx = [re.compile(p) for p in patterns]
        self.packed = {n for n in hf.names() if any(r.fullmatch(n) for r in rx)}

    def __getattr__(self, name):  # file_of and the rest of the wrapped reader
        return getattr(self.hf, name)

    def names(self) -> list[str]:
        out = []
        for n in self.hf.names():
            out += [f"{n}[{e}]" for e in range(self.hf.shape(n)[0])] if n in self.packed else [n]
        return out

    def _split(self, name: str) -> tuple[str, int | None]:
        m = VIRTUAL.fullmatch(name)
        return (m[1], int(m[2])) if m and m[1] in self.packed else (name, None)

    def shape(self, name: str) -> tuple[int, ...]:
        base, e = self._split(name)
        return self.hf.shape(base) if e is None else self.hf.shape(base)[1:]

    def dtype(self, name: str) -> torch.dtype:
        return self.hf.dtype(self._split(name)[0])

    def byte_range(self, name: str) -> tuple[int, int, int] | None:
        base, e = self._split(name)
        whole = self.hf.byte_range(base)
        if whole is None or e is None:
            return whole
        fd, offset, nbytes = whole
        per = nbytes // self.hf.shape(base)[0]
        return fd, offset + e * per, per

    def get(self, name: str) -> torch.Tensor:
        base, e = self._split(name)
        return self.hf.get(base) if e is None else self.hf.get_slice(base, (slice(e, e + 1),))[0]

    def read_rows_into(self, name: str, start: int, out: torch.Tensor) -> None:
        base, e = self._split(name)
        if e is None:
            self.hf.read_rows_into(base, start, out)
        else:
            out.copy_(self.get_slice(name, (slice(start, start + out.shape[0]),)))

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        base, e = self._split(name)
        return self.hf.get_slice(base, index) if e is None else self.hf.get_slice(base, (slice(e, e + 1), *index))[0]


def repack(pairs: Iterable[tuple[str, torch.Tensor]], experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs with `X[e]` pieces stacked into X as soon as all `experts` have arrived."""
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in pairs:
        m = VIRTUAL.fullmatch(name)
        if not m:
            yield name, t
            continue
        got = pending.setdefault(m[1], {})
        got[int(m[2])] = t
        if len(got) == experts:
            yield m[1], torch.stack([got.pop(e) for e in range(experts)])
            del pending[m[1]]
    if pending:
        raise ConversionError(f"packed expert tensors left incomplete: {sorted(pending)[:3]}")
