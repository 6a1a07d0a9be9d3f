"""The audit log: an append-only hash chain that verifies, and breaks at the first edited line."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from gateway.audit import AuditChainBroken, AuditError, AuditLog, canonical_json, record_hash, verify_chain
from gateway.audit.log import FIELDS, GENESIS_HASH
from gateway.cli import main as cli_main


def _filled(path: Path, count: int = 5) -> AuditLog:
    log = AuditLog(path)
    for i in range(count):
        log.append(action=["package", "deploy", "shift", "promote", "rollback"][i % 5], actor="ci", model="iris",
                   version=i + 1, digest=f"sha256:{i:064x}", reason=f"step {i}",
                   evidence={"error_rate": 0.01 * i, "p99_ms": [1.5, 2.5], "drift": {"psi": 0.02}})
    return log


def test_appended_records_chain_and_verify(tmp_path):
    log = _filled(tmp_path / "audit.jsonl")
    records = list(log.records())
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == GENESIS_HASH
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(records, records[1:]))
    assert all(set(r) == set(FIELDS) for r in records)
    report = verify_chain(log.path)
    assert (report.records, report.head) == (5, records[-1]["hash"])
    assert log.head() == records[-1]["hash"]


def _edit(path: Path, line: int, field: str) -> None:
    """Change one field of one line, keeping the line canonical JSON (as a careful forger would)."""
    lines = path.read_text().splitlines()
    record = json.loads(lines[line - 1])
    changed = {
        "seq": record["seq"] + 10, "time": "2020-01-01T00:00:00.000000Z", "actor": "mallory", "action": "unload",
        "model": "other", "version": 99, "digest": "sha256:" + "f" * 64, "reason": "nothing to see",
        "evidence": {**record["evidence"], "error_rate": 0.5}, "prev_hash": "a" * 64, "hash": "b" * 64,
    }[field]
    assert changed != record[field]
    record[field] = changed
    lines[line - 1] = canonical_json(record)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("line", [1, 3, 5])
def test_editing_any_field_of_any_line_breaks_the_chain(tmp_path, field, line):
    log = _filled(tmp_path / "audit.jsonl")
    verify_chain(log.path)
    _edit(log.path, line, field)
    with pytest.raises(AuditChainBroken) as caught:
        verify_chain(log.path)
    assert caught.value.line == line, caught.value.why


def test_a_rehashed_edit_still_breaks_the_link_to_the_next_line(tmp_path):
    """Recomputing the edited line's own hash does not help: the next line points at the old one."""
    log = _filled(tmp_path / "audit.jsonl")
    lines = log.path.read_text().splitlines()
    record = json.loads(lines[1])
    record["reason"] = "rewritten"
    record["hash"] = record_hash(record)
    lines[1] = canonical_json(record)
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditChainBroken) as caught:
        verify_chain(log.path)
    assert caught.value.line == 3 and "prev_hash" in caught.value.why


@pytest.mark.parametrize("damage, line", [
    ("delete", 2), ("swap", 2), ("reformat", 4), ("truncate", 5), ("garbage", 3),
])
def test_deleted_reordered_reformatted_or_cut_lines_break_the_chain(tmp_path, damage, line):
    log = _filled(tmp_path / "audit.jsonl")
    lines = log.path.read_text().splitlines(keepends=True)
    if damage == "delete":
        del lines[1]
    elif damage == "swap":
        lines[1], lines[2] = lines[2], lines[1]
    elif damage == "reformat":
        lines[3] = json.dumps(json.loads(lines[3]), indent=None) + "\n"  # same content, spaces added
    elif damage == "truncate":
        lines[4] = lines[4][:-20]
    elif damage == "garbage":
        lines[2] = "not json\n"
    log.path.write_text("".join(lines))
    with pytest.raises(AuditChainBroken) as caught:
        verify_chain(log.path)
    assert caught.value.line == line, caught.value.why


def test_append_refuses_to_extend_a_broken_tail(tmp_path):
    log = _filled(tmp_path / "audit.jsonl", 2)
    with open(log.path, "ab") as stream:
        stream.write(b'{"half": ')
    with pytest.raises(AuditError, match="incomplete"):
        log.append(action="deploy", model="iris")
    _filled(tmp_path / "edited.jsonl", 2)
    _edit(tmp_path / "edited.jsonl", 2, "reason")
    with pytest.raises(AuditError, match="does not match"):
        AuditLog(tmp_path / "edited.jsonl").append(action="deploy", model="iris")


def test_evidence_is_made_plain_json(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    record = log.append(action="rollback", model="iris", evidence={
        "p99_ms": np.float32(12.5), "counts": np.arange(3), "psi": float("nan"), "path": tmp_path})
    assert record["evidence"] == {"p99_ms": 12.5, "counts": [0, 1, 2], "psi": "NaN", "path": str(tmp_path)}
    verify_chain(log.path)
    with pytest.raises(AuditError, match="evidence.thing"):
        log.append(action="deploy", model="iris", evidence={"thing": object()})
    with pytest.raises(AuditError, match="lower-case"):
        log.append(action="Deploy!", model="iris")


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(path)
    for i in range(count):
        log.append(action="shift", actor=f"worker-{worker}", model="iris", version=1, evidence={"i": i})


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    workers, each = 4, 25
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_append_many, args=(str(path), w, each)) for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    report = verify_chain(path)
    assert report.records == workers * each
    actors = [r["actor"] for r in AuditLog(path).records()]
    assert {a: actors.count(a) for a in set(actors)} == {f"worker-{w}": each for w in range(workers)}


def test_cli_verify_and_show(tmp_path, capsys):
    log = _filled(tmp_path / "audit.jsonl")
    assert cli_main(["audit", "verify", "--file", str(log.path)]) == 0
    assert "5 records, chain intact" in capsys.readouterr().out
    assert cli_main(["audit", "show", "--file", str(log.path), "--last", "2"]) == 0
    shown = capsys.readouterr().out
    assert "promote" in shown and "rollback" in shown and "step 0" not in shown
    assert cli_main(["audit", "show", "--file", str(log.path), "--json", "--model", "iris"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 5
    _edit(log.path, 4, "digest")
    assert cli_main(["audit", "verify", "--file", str(log.path)]) == 1
    assert "BROKEN at line 4" in capsys.readouterr().err
    assert cli_main(["audit", "verify", "--file", str(tmp_path / "absent.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
