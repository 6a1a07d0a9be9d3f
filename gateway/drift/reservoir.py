"""A bounded uniform sample of recent rows (reservoir sampling), kept as evidence for retraining."""

from __future__ import annotations

import numpy as np


class Reservoir:
    """Up to `capacity` rows of each tensor, a uniform sample of every row offered (Vitter's R).

    Rows of one request are kept together across tensors (the same slot index in each), so inputs
    and outputs of a sampled row stay paired.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._rows: dict[str, list] = {}

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def offer(self, tensors: dict[str, np.ndarray]) -> None:
        """Offer the rows of one request: {tensor name: array [rows, ...]}, same rows in each."""
        rows = next(iter(tensors.values())).shape[0] if tensors else 0
        for row in range(rows):
            self.seen += 1
            if self.seen <= self.capacity:
                slot = self.seen - 1
            else:
                slot = int(self._rng.integers(0, self.seen))
                if slot >= self.capacity:
                    continue
            for name, array in tensors.items():
                kept = self._rows.setdefault(name, [None] * self.capacity)
                kept[slot] = np.array(array[row], copy=True)

    def arrays(self) -> dict[str, np.ndarray]:
        count = len(self)
        return {name: np.stack(rows[:count]) for name, rows in self._rows.items() if count and rows[0] is not None}
