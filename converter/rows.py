"""Which HF rows make each Megatron row, and reading them straight into place.

Most transforms move whole rows (dim 0): concatenations, the per-group q/k/v interleave, vocabulary padding, the
de-interleaving of gate and up rows. Running one on row numbers instead of weights gives, for each Megatron row,
its HF tensor and row. Runs of consecutive rows are then read from the files straight into the Megatron tensor
(or a box of it), without first building the HF tensors and copying them over.
"""
from __future__ import annotations

import torch

from .errors import ConversionError
from .plan import Job

_SOURCE_BITS = 40  # row numbers are encoded as source_index << 40 | (row + 1); 0 marks a padding row


def readable_by_rows(job: Job, hf) -> bool:
    return job.rule.transform.rowwise and all(len(hf.shape(s)) > 0 for s in job.sources)


def row_sources(job: Job, hf) -> torch.Tensor:
    """For each row of the Megatron tensor, its encoded HF source and row (a readable_by_rows job)."""
    rows = [torch.arange(hf.shape(s)[0]) + 1 + (k << _SOURCE_BITS) for k, s in enumerate(job.sources)]
    return job.to_mcore(rows)


def read_rows(hf, job: Job, rows: torch.Tensor, start: int, out: torch.Tensor,
              cols: tuple[slice, ...] = ()) -> None:
    """Megatron rows [start, start + len(out)) into `out`; `cols` selects columns of them (all when empty)."""
    want = rows[start: start + out.shape[0]]
    if len(want) != out.shape[0]:
        raise ConversionError(f"internal: {job.mcore} has {len(rows)} rows, asked for {start}:{start + out.shape[0]}")
    src, row = want >> _SOURCE_BITS, (want & ((1 << _SOURCE_BITS) - 1)) - 1
    breaks = ((src[1:] != src[:-1]) | (row[1:] != row[:-1] + 1)).nonzero().flatten() + 1
    bounds = [0, *breaks.tolist(), len(want)]
    for a, b in zip(bounds, bounds[1:]):
        r = int(row[a])
        if r < 0:  # vocabulary padding
            out[a:b].zero_()
        elif cols:
            out[a:b].copy_(hf.get_slice(job.sources[int(src[a])], (slice(r, r + b - a), *cols)))
        else:
            hf.read_rows_into(job.sources[int(src[a])], r, out[a:b])
