"""`AuditLog`: append hash-chained records to a JSONL file under a file lock; `verify_chain` checks them.

One record per line, written as canonical JSON (keys sorted, no spaces, UTF-8):

    seq        1, 2, 3, … — the line number
    time       when it was appended, ISO 8601 UTC with microseconds
    actor      who did it (a person, a CI job, "gateway" for automatic decisions)
    action     what was done: package, deploy, shift, promote, rollback, unload, … (lower case)
    model      the model's name
    version    the model version it concerns (an int), or null
    digest     that version's content digest ("sha256:…"), or null
    reason     why, in words
    evidence   the figures behind the decision (a JSON object: latency, error rate, drift, …)
    prev_hash  the previous record's `hash` (64 zeros for the first)
    hash       sha256 of the canonical JSON of every other field of this record

Editing any field of any line changes its hash (or breaks the link to the next line), so
`verify_chain` finds the first line that no longer fits. What the chain cannot show by itself is a
cut-off tail: keep `AuditLog.head()` somewhere else (the rollout state does) to detect that.

Appends are safe across threads and processes: each holds an exclusive `flock` on the file while it
reads the last record and writes its own, and fsyncs before letting go.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import getpass
import hashlib
import json
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

GENESIS_HASH = "0" * 64
FIELDS = ("seq", "time", "actor", "action", "model", "version", "digest", "reason", "evidence", "prev_hash", "hash")
_ACTION = re.compile(r"^[a-z][a-z0-9_-]*$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TAIL_CHUNK = 64 * 1024
ENVIRONMENT_VARIABLE = "TENSORGATE_AUDIT_LOG"
DEFAULT_NAME = "tensorgate-audit.jsonl"


class AuditError(ValueError):
    """The audit log cannot be appended to or read (bad arguments, an incomplete last line)."""


class AuditChainBroken(AuditError):
    """A line of the log does not fit the chain; `line` is its 1-based number, `why` what is wrong."""

    def __init__(self, path: Path, line: int, why: str) -> None:
        super().__init__(f"{path}: line {line}: {why}")
        self.path = path
        self.line = line
        self.why = why


@dataclass(frozen=True)
class ChainReport:
    """A verified log: how many records, and the hash of the last one (the head)."""

    path: Path
    records: int
    head: str


def default_audit_path(repository: os.PathLike | str | None = None) -> Path:
    """$TENSORGATE_AUDIT_LOG if set; else `tensorgate-audit.jsonl` in the model repository (or here)."""
    override = os.environ.get(ENVIRONMENT_VARIABLE)
    if override:
        return Path(override)
    return Path(repository or ".") / DEFAULT_NAME


def default_actor() -> str:
    """$TENSORGATE_ACTOR, else user@host."""
    actor = os.environ.get("TENSORGATE_ACTOR")
    if actor:
        return actor
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container's numeric uid)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _plain(value: Any, where: str) -> Any:
    """`value` as plain JSON types: numpy scalars and arrays, tuples and paths converted; a float
    that is not finite becomes the string JSON's own parsers would not accept as a number."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return _plain(tolist(), where)
    raise AuditError(f"{where}: {type(value).__name__} is not JSON (expected numbers, strings, lists, dicts)")


def canonical_json(record: dict) -> str:
    """The one serialization a record is hashed and written in."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(record: dict) -> str:
    """sha256 over the canonical JSON of every field but `hash`."""
    body = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class AuditLog:
    """An append-only, hash-chained JSONL file. Cheap to build: nothing is opened until used."""

    def __init__(self, path: os.PathLike | str) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<AuditLog {self.path}>"

    def append(
        self,
        *,
        action: str,
        model: str,
        actor: str | None = None,
        version: int | None = None,
        digest: str | None = None,
        reason: str = "",
        evidence: dict | None = None,
    ) -> dict:
        """Append one record and return it (with its seq, time and hash). Raises AuditError on bad
        arguments or when the file's last line is incomplete (then nothing is written)."""
        if not isinstance(action, str) or not _ACTION.match(action):
            raise AuditError(f"action must be a lower-case word (package, deploy, shift, …), got {action!r}")
        if not isinstance(model, str) or not model:
            raise AuditError(f"model must be a model name, got {model!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise AuditError(f"version must be a non-negative int or None, got {version!r}")
        if digest is not None and not isinstance(digest, str):
            raise AuditError(f"digest must be a string or None, got {digest!r}")
        if evidence is not None and not isinstance(evidence, dict):
            raise AuditError(f"evidence must be a dict, got {type(evidence).__name__}")
        fields = {
            "actor": actor or default_actor(),
            "action": action,
            "model": model,
            "version": version,
            "digest": digest,
            "reason": str(reason),
            "evidence": _plain(evidence or {}, "evidence"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            last = _last_record(fd, self.path)
            record = {
                "seq": 1 if last is None else last["seq"] + 1,
                "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                **fields,
                "prev_hash": GENESIS_HASH if last is None else last["hash"],
            }
            record["hash"] = record_hash(record)
            line = (canonical_json(record) + "\n").encode("utf-8")
            written = os.write(fd, line)
            if written != len(line):  # a full disk: leave no half line for the next writer
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise AuditError(f"{self.path}: short write ({written} of {len(line)} bytes); nothing appended")
            os.fsync(fd)
            return record
        finally:
            os.close(fd)  # closing drops the lock

    def records(self) -> Iterator[dict]:
        """Every record, in order, as written (not verified: see `verify`)."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as stream:
            for number, raw in enumerate(stream, start=1):
                yield _parse(self.path, number, raw)

    def head(self) -> str:
        """The hash of the last record (GENESIS_HASH for an empty or missing log)."""
        if not self.path.exists():
            return GENESIS_HASH
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            last = _last_record(fd, self.path)
        finally:
            os.close(fd)
        return GENESIS_HASH if last is None else last["hash"]

    def verify(self) -> ChainReport:
        return verify_chain(self.path)


def _parse(path: Path, number: int, raw: bytes) -> dict:
    if not raw.endswith(b"\n"):
        raise AuditChainBroken(path, number, "the line is incomplete (no newline at its end: a write cut short?)")
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AuditChainBroken(path, number, f"not JSON ({error})") from None
    if not isinstance(record, dict):
        raise AuditChainBroken(path, number, "not a JSON object")
    return record


def _last_record(fd: int, path: Path) -> dict | None:
    """The last record of the open file, read backwards from its end; None when the file is empty."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    tail = b""
    position = size
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        tail = os.pread(fd, step, position) + tail
        # The last line starts after the last newline that is not the final byte.
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if cut >= 0 or position == 0:
            last = tail[cut + 1:]
            break
    if not last.endswith(b"\n"):
        raise AuditError(f"{path}: the last line is incomplete (a write cut short?); run `tensorgate audit verify --file "
                         f"{path}` and repair the log before appending")
    record = json.loads(last)
    if record.get("hash") != record_hash(record):
        raise AuditError(f"{path}: the last record's hash does not match its content; run `tensorgate audit verify "
                         f"--file {path}`: nothing is appended to a broken chain")
    return record


def verify_chain(path: os.PathLike | str) -> ChainReport:
    """Check every line: canonical JSON with exactly the fields above, seq = line number, prev_hash =
    the previous line's hash, hash = the hash of its content. Raises AuditChainBroken at the first
    line that fails, naming it and what is wrong; FileNotFoundError when there is no log."""
    path = Path(path)
    previous = GENESIS_HASH
    count = 0
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            record = _parse(path, number, raw)
            _check(path, number, raw, record, previous)
            previous = record["hash"]
            count = number
    return ChainReport(path=path, records=count, head=previous)


def _check(path: Path, number: int, raw: bytes, record: dict, previous: str) -> None:
    def broken(why: str) -> AuditChainBroken:
        return AuditChainBroken(path, number, why)

    keys = set(record)
    if keys != set(FIELDS):
        missing, extra = sorted(set(FIELDS) - keys), sorted(keys - set(FIELDS))
        raise broken(f"fields differ from the record format (missing {missing}, unexpected {extra})")
    if record["seq"] != number or isinstance(record["seq"], bool):
        raise broken(f"seq is {record['seq']!r}, expected {number} (the line number)")
    if record["prev_hash"] != previous:
        raise broken(f"prev_hash {record['prev_hash']!r} is not the previous record's hash {previous!r}")
    if not isinstance(record["hash"], str) or not _HEX64.match(record["hash"]):
        raise broken(f"hash {record['hash']!r} is not 64 hex digits")
    expected = record_hash(record)
    if record["hash"] != expected:
        raise broken(f"hash does not match the record's content (expected {expected}): the line was edited")
    if raw.decode("utf-8") != canonical_json(record) + "\n":
        raise broken("the line is not in canonical form (sorted keys, no spaces): it was rewritten")
