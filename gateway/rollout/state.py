"""Every model's rollout state, and its file: written whole (temp file + rename) after each change.

    live        the version serving traffic (None until a first rollout names it)
    previous    the version live before the last promotion (what `rollback` goes back to)
    candidate   the version being rolled out, while status is loading or canary
    weights     the traffic split the router applies ({version: weight}); {} = no split
    step        index of the current step in `steps` (−1: loading, or shadow first)
    status      idle | loading | shadow | canary | promoted | rolled-back | failed
    reason      why it is in that status (a failed check, an operator's words)
    evidence    the figures behind the last decision
    digests     {version: content digest} of the versions this rollout verified
    history     per finished step: its name, length and the requests each version got in it
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUNNING = ("loading", "shadow", "canary")


@dataclass
class ModelRollout:
    model: str
    live: str | None = None
    previous: str | None = None
    candidate: str | None = None
    weights: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    step: int = -1
    step_seconds: float = 0.0
    min_requests: int = 0
    shadow_first: bool = False
    status: str = "idle"
    reason: str = ""
    actor: str = ""
    evidence: dict = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    started: float = 0.0
    updated: float = field(default_factory=time.time)

    @property
    def running(self) -> bool:
        return self.status in RUNNING

    def as_dict(self) -> dict:
        return asdict(self)


class RolloutStore:
    """The states of every model, in memory and (with a path) in a JSON file."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None
        self.models: dict[str, ModelRollout] = {}
        if self.path is not None and self.path.exists():
            for model, data in json.loads(self.path.read_text()).items():
                known = {name: value for name, value in data.items() if name in ModelRollout.__dataclass_fields__}
                self.models[model] = ModelRollout(**known)

    def __repr__(self) -> str:
        return f"<RolloutStore {self.path} models={sorted(self.models)}>"

    def of(self, model: str) -> ModelRollout:
        state = self.models.get(model)
        if state is None:
            state = self.models[model] = ModelRollout(model)
        return state

    def save(self) -> None:
        """Write every state (atomically: a reader or a crash never sees half a file)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({m: s.as_dict() for m, s in sorted(self.models.items())}, indent=1))
        os.replace(temporary, self.path)
