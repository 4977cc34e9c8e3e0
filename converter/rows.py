"""Which HF rows make each Megatron row, and reading them straight into place.

Most transforms move whole rows (dim 0): concatenations, the per-group q/k/v interleave, vocabulary padding, the
de-interleaving of gate and up rows. Running one on row numbers instead of weights gives, for each Megatron row,
its HF tensor and row. Runs of consecutive rows are then read from the files straight into the Megatron tensor
(or a box of it), without first building the HF tensors and copying them over.
"""
from __future__ import annotations

import functools

import torch

from .errors import ConversionError
from .plan import Job

_SOURCE_BITS = 40  # row numbers are encoded as source_index << 40 | (row + 1); 0 marks a padding row


def readable_by_rows(job: Job, hf) -> bool:
    return job.rule.transform.rowwise and all(len(hf.shape(s)) > 0 for s in job.sources)


def row_sources(job: Job, hf) -> torch.Tensor:
    """For each row of the Megatron tensor, its encoded HF source and row (a readable_by_rows job)."""
    return job.to_mcore(_encoded(_row_counts(job, hf)))


def source_runs(job: Job, hf) -> tuple[tuple[int, int, int], ...]:
    """row_runs(row_sources(job, hf)), made once per transform, target and source row counts: the experts of an
    MoE model (tens of thousands of tensors) share a few, and making them costs a millisecond of torch calls
    each, holding the interpreter lock the writing thread needs (RESULTS.md, session 15)."""
    return _runs(job.rule.transform, job.ctx, _row_counts(job, hf))


@functools.lru_cache(maxsize=1024)
def _runs(transform, ctx, rows: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    return tuple(row_runs(transform.to_mcore(_encoded(rows), ctx)))


def _row_counts(job: Job, hf) -> tuple[int, ...]:
    return tuple(hf.shape(s)[0] for s in job.sources)


def _encoded(rows: tuple[int, ...]) -> list[torch.Tensor]:
    return [torch.arange(n) + 1 + (k << _SOURCE_BITS) for k, n in enumerate(rows)]


def row_runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """Encoded rows (row_sources) as runs (source index, first HF row or -1 for padding, row count) of consecutive
    rows of one source."""
    src, row = rows >> _SOURCE_BITS, (rows & ((1 << _SOURCE_BITS) - 1)) - 1
    pad = row < 0
    joined = (src[1:] == src[:-1]) & ((row[1:] == row[:-1] + 1) | (pad[1:] & pad[:-1]))
    bounds = [0, *((~joined).nonzero().flatten() + 1).tolist(), len(rows)]
    return [(int(src[a]), int(row[a]), b - a) for a, b in zip(bounds, bounds[1:]) if b > a]


def read_rows(hf, job: Job, rows: torch.Tensor, start: int, out: torch.Tensor,
              cols: tuple[slice, ...] = ()) -> None:
    """Megatron rows [start, start + len(out)) into `out`; `cols` selects columns of them (all when empty)."""
    want = rows[start: start + out.shape[0]]
    if len(want) != out.shape[0]:
        raise ConversionError(f"internal: {job.mcore} has {len(rows)} rows, asked for {start}:{start + out.shape[0]}")
    a = 0
    for src, r, n in row_runs(want):
        if r < 0:  # vocabulary padding
            out[a:a + n].zero_()
        elif cols:
            out[a:a + n].copy_(hf.get_slice(job.sources[src], (slice(r, r + n), *cols)))
        else:
            hf.read_rows_into(job.sources[src], r, out[a:a + n])
        a += n
