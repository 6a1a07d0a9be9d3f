"""Sticky routing of stateful models: every request of a sequence goes to the backend that started it."""

from __future__ import annotations

import time

from gateway.upstream.backend import Backend


class SequenceTable:
    """(model, sequence id) → backend, forgotten at sequence end or after the idle timeout."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, object], tuple[Backend, float, float]] = {}

    def __repr__(self) -> str:
        return f"<SequenceTable active={len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, model: str, sequence_id: object) -> Backend | None:
        key = (model, sequence_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        backend, last_used, idle_s = entry
        now = self._clock()
        if now - last_used > idle_s:
            del self._entries[key]
            return None
        self._entries[key] = (backend, now, idle_s)
        return backend

    def bind(self, model: str, sequence_id: object, backend: Backend, idle_s: float) -> None:
        self._entries[(model, sequence_id)] = (backend, self._clock(), idle_s)

    def end(self, model: str, sequence_id: object) -> None:
        self._entries.pop((model, sequence_id), None)

    def rebind(self, successor) -> int:
        """After the fleet was rebuilt (a config reload): move each sequence to `successor(backend)`,
        the new fleet's backend of the same address, or forget it (None: its backend was removed, so
        its state is gone, and its next step is refused as for a backend that died). Returns how
        many were forgotten."""
        forgotten = 0
        for key, (backend, last_used, idle_s) in list(self._entries.items()):
            replacement = successor(backend)
            if replacement is None:
                del self._entries[key]
                forgotten += 1
            else:
                self._entries[key] = (replacement, last_used, idle_s)
        return forgotten

    def expire(self) -> int:
        """Drop idle sequences; returns how many were dropped."""
        now = self._clock()
        stale = [k for k, (_, last, idle) in self._entries.items() if now - last > idle]
        for key in stale:
            del self._entries[key]
        return len(stale)
