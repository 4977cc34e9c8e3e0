"""Progress on long work: tensors and GB done, and the rate (tqdm, to stderr)."""
from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, total_tensors: int, total_bytes: int, what: str, enabled: bool = True):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                        disable=not enabled, dynamic_ncols=True)
        self.total_tensors, self.tensors = total_tensors, 0

    def update(self, nbytes: int, name: str = "") -> None:
        self.tensors += 1
        self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()
