"""Rendezvous (highest-random-weight) hashing: the same backend for a sequence in every process.

Each candidate backend gets a weight from a stable 64-bit hash of (model, sequence id) mixed with a
stable hash of the backend's address; the highest weight wins. Every gateway worker (and every
replica) computes the same winner from the same healthy set, with no table to share, so a
sequence whose client reconnects to another worker lands on the backend that holds its state.
When a backend leaves, only the sequences it won move (each to its runner-up); the others stay.

Python's `hash()` is salted per process (PYTHONHASHSEED), so the hashes here are BLAKE2b (8 bytes)
of the UTF-8 text, and the mix is SplitMix64's finalizer: the same numbers on every machine.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Sequence

_MASK = (1 << 64) - 1


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text` that is the same in every process, run and machine."""
    return int.from_bytes(blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _mix(value: int) -> int:
    """SplitMix64's finalizer: spreads the bits of key ^ backend so neighbouring inputs score apart."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
    return value ^ (value >> 31)


def sequence_key(model: str, sequence_id: object) -> int:
    """The hash of a sequence: its model and id (an int and the same digits as a string differ)."""
    kind = "s" if isinstance(sequence_id, str) else "i"
    return stable_hash(f"{model}\x00{kind}\x00{sequence_id}")


class Rendezvous:
    """Scores candidates by address; caches each address's hash (a backend's address never changes)."""

    def __init__(self) -> None:
        self._address_hashes: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"<Rendezvous addresses={len(self._address_hashes)}>"

    def _address_hash(self, address: str) -> int:
        value = self._address_hashes.get(address)
        if value is None:
            value = self._address_hashes[address] = stable_hash(address)
        return value

    def weight(self, key: int, address: str) -> int:
        return _mix(key ^ self._address_hash(address))

    def ranked(self, key: int, candidates: Sequence) -> list:
        """`candidates` (objects with an `address`) from the highest weight to the lowest."""
        return sorted(candidates, key=lambda backend: self.weight(key, backend.address), reverse=True)

    def pick(self, key: int, candidates: Sequence):
        """The candidate with the highest weight for `key` (ties, impossible in practice, by address)."""
        best, best_weight = None, -1
        for backend in candidates:
            weight = self.weight(key, backend.address)
            if weight > best_weight or (weight == best_weight and backend.address < best.address):
                best, best_weight = backend, weight
        return best
