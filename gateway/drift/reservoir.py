"""A bounded uniform sample of recent rows (reservoir sampling), kept as evidence for retraining."""

from __future__ import annotations

import math
import random

import numpy as np


class Reservoir:
    """Up to `capacity` rows of each tensor, a uniform sample of every row offered.

    Li's Algorithm L: once full, the index of the next row to keep is drawn ahead, so a request
    whose rows are all skipped costs one comparison — this runs once per monitored request.
    Rows of one request are kept together across tensors (the same slot in each), so inputs and
    outputs of a sampled row stay paired.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self._random = random.Random(seed)
        self._weight = 0.0
        self._next_kept = 0  # 1-based index of the next row to keep, once full
        self._rows: dict[str, list] = {}

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def offer(self, tensors: dict[str, np.ndarray]) -> None:
        """Offer the rows of one request: {tensor name: array [rows, ...]}, same rows in each."""
        rows = next(iter(tensors.values())).shape[0] if tensors else 0
        first = self.seen  # rows before this request
        self.seen += rows
        if self.seen > self.capacity and self._next_kept > self.seen:
            return  # the common case once full: nothing of this request is kept
        for row in range(max(0, min(rows, self.capacity - first))):  # still filling
            self._store(tensors, row, first + row)
        if self.seen <= self.capacity:
            return
        if not self._next_kept:
            self._weight = math.exp(math.log(self._random.random()) / self.capacity)
            self._next_kept = self.capacity
            self._advance()
        while self._next_kept <= self.seen:
            self._store(tensors, self._next_kept - first - 1, self._random.randrange(self.capacity))
            self._weight *= math.exp(math.log(self._random.random()) / self.capacity)
            self._advance()

    def _advance(self) -> None:
        self._next_kept += int(math.log(self._random.random()) / math.log(1 - self._weight)) + 1

    def _store(self, tensors: dict[str, np.ndarray], row: int, slot: int) -> None:
        for name, array in tensors.items():
            kept = self._rows.setdefault(name, [None] * self.capacity)
            kept[slot] = np.array(array[row], copy=True)

    def arrays(self) -> dict[str, np.ndarray]:
        count = len(self)
        return {name: np.stack(rows[:count]) for name, rows in self._rows.items() if count and rows[0] is not None}
