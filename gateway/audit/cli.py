"""`tensorgate audit verify [--file F]` and `tensorgate audit show [--file F] [--model M] [--last N] [--json]`.

The log is --file, else REPO/tensorgate-audit.jsonl with --repo, else $TENSORGATE_AUDIT_LOG, else
./tensorgate-audit.jsonl. Exit codes: 0 the chain holds; 1 it is broken (the first bad line is named);
2 there is no log to read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gateway.audit.log import AuditChainBroken, AuditError, AuditLog, default_audit_path, verify_chain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--file", help="the audit log (JSONL)")
    where.add_argument("--repo", help="a model repository: its tensorgate-audit.jsonl")


def _path(args: argparse.Namespace) -> Path:
    return Path(args.file) if args.file else default_audit_path(args.repo)


def cmd_verify(args: argparse.Namespace) -> int:
    path = _path(args)
    try:
        report = verify_chain(path)
    except FileNotFoundError:
        print(f"tensorgate audit verify: {path} does not exist (give --file or --repo)", file=sys.stderr)
        return 2
    except AuditChainBroken as error:
        print(f"tensorgate audit verify: BROKEN at line {error.line} of {error.path}: {error.why}", file=sys.stderr)
        return 1
    print(f"{path}: {report.records} records, chain intact; head {report.head}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    path = _path(args)
    if not path.exists():
        print(f"tensorgate audit show: {path} does not exist (give --file or --repo)", file=sys.stderr)
        return 2
    try:
        records = [r for r in AuditLog(path).records() if not args.model or r.get("model") == args.model]
    except AuditError as error:
        print(f"tensorgate audit show: {error}", file=sys.stderr)
        return 1
    if args.last:
        records = records[-args.last:]
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
        return 0
    print(f"{'seq':>4}  {'time':<27} {'actor':<18} {'action':<9} {'model':<16} {'ver':>4}  {'digest':<19} reason")
    for r in records:
        digest = (r.get("digest") or "-")[:19]
        version = "-" if r.get("version") is None else str(r["version"])
        print(f"{r.get('seq', '?'):>4}  {r.get('time', ''):<27} {str(r.get('actor', ''))[:18]:<18} "
              f"{r.get('action', ''):<9} {str(r.get('model', ''))[:16]:<16} {version:>4}  {digest:<19} {r.get('reason', '')}")
    print("(not verified here: `tensorgate audit verify` checks the chain)")
    return 0


def add_show_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--model", help="only this model's records")
    parser.add_argument("--last", type=int, help="only the last N records")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
