"""Which worker a process is, and where its parent's hub listens: passed in the environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

#: The environment variable a worker process finds its role in (JSON of WorkerRole's fields).
ENV_ROLE = "TENSORGATE_WORKER"


@dataclass(frozen=True)
class WorkerRole:
    """One worker of several: its number (0-based), the hub's address (`unix:/path`), how often it reports."""

    worker_id: int
    hub: str
    report_s: float = 0.25

    def environment(self) -> dict[str, str]:
        return {ENV_ROLE: json.dumps({"worker_id": self.worker_id, "hub": self.hub, "report_s": self.report_s})}

    @classmethod
    def from_environment(cls, environ=os.environ) -> "WorkerRole | None":
        """This process's role, or None when it is not a worker (a single gateway, or the parent)."""
        text = environ.get(ENV_ROLE)
        if not text:
            return None
        fields = json.loads(text)
        return cls(int(fields["worker_id"]), str(fields["hub"]), float(fields.get("report_s", 0.25)))
