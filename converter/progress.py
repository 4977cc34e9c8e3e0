"""Progress on long work: tensors and GB done, and the rate (tqdm, to stderr)."""
from __future__ import annotations

from tqdm import tqdm


class Progress:
    def __init__(self, total_items: int, total_bytes: int, what: str, enabled: bool = True, unit: str = "tensors"):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=what,
                        disable=not enabled, dynamic_ncols=True)
        self.total_items, self.items, self.unit = total_items, 0, unit

    def update(self, nbytes: int, name: str = "", items: int = 1) -> None:
        if items:
            self.items += items
            self.bar.set_postfix_str(f"{self.items}/{self.total_items} {self.unit}", refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()
