"""Alert state of one (tensor, feature, statistic): fires after k windows in a row, clears with hysteresis."""

from __future__ import annotations

OK, WARNING, ALERT = "ok", "warning", "alert"
_RANK = {OK: 0, WARNING: 1, ALERT: 2}


class AlertState:
    """Severity over consecutive windows.

    A level is reached after `consecutive` windows in a row at or above its threshold; once
    raised, it clears only after `clear_after` windows in a row below the warning threshold, so a
    value hovering around a threshold does not flap.
    """

    __slots__ = ("warning", "alert", "consecutive", "clear_after", "level", "_above", "_below")

    def __init__(self, warning: float, alert: float, consecutive: int, clear_after: int) -> None:
        self.warning = warning
        self.alert = alert
        self.consecutive = consecutive
        self.clear_after = clear_after
        self.level = OK
        self._above = {WARNING: 0, ALERT: 0}
        self._below = 0

    def __repr__(self) -> str:
        return f"<AlertState {self.level} warning={self.warning} alert={self.alert}>"

    def observe(self, value: float) -> str | None:
        """Feed one window's value; return the new level if it changed, else None."""
        for level, threshold in ((WARNING, self.warning), (ALERT, self.alert)):
            self._above[level] = self._above[level] + 1 if value >= threshold else 0
        self._below = self._below + 1 if value < self.warning else 0
        new = self.level
        if self._above[ALERT] >= self.consecutive:
            new = ALERT
        elif self._above[WARNING] >= self.consecutive and _RANK[self.level] < _RANK[WARNING]:
            new = WARNING
        elif self.level != OK and self._below >= self.clear_after:
            new = OK
        if new == self.level:
            return None
        self.level = new
        return new
