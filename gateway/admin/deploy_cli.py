"""`tensorgate rollout NAME VERSION`, `tensorgate rollback NAME`, `tensorgate status`: the DeployService
and the gateway's snapshot from the command line."""

from __future__ import annotations

import getpass
import json
import sys
import time

import grpc

from gateway.admin.deploy_service import SERVICE, messages
from gateway.admin.gateway_service import SERVICE as GATEWAY_SERVICE
from gateway.admin.gateway_service import Snapshot, SnapshotRequest

FINAL = {"promoted": 0, "rolled-back": 1, "failed": 1}


def _call(address: str, service: str, method: str, request, response_type, timeout: float = 30.0):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=response_type.FromString)
        return call(request, timeout=timeout)


def _states(address: str, model: str = "") -> dict:
    m = messages()
    return json.loads(_call(address, SERVICE, "GetRollout", m["GetRolloutRequest"](model=model), m["RolloutState"]).json)


def _line(state: dict) -> str:
    weights = ", ".join(f"v{v} {w * 100:.0f}%" for v, w in sorted(state["weights"].items(), key=lambda i: int(i[0])))
    return (f"{state['model']}: {state['status']} — live v{state['live']}"
            + (f", candidate v{state['candidate']}" if state.get("candidate") else "")
            + (f", split [{weights}]" if weights else "") + f" — {state['reason']}")


def cmd_rollout(args) -> int:
    m = messages()
    steps = [float(step) for step in args.steps.split(",")] if args.steps else []
    request = m["StartRolloutRequest"](model=args.model, version=str(args.version), steps=steps,
                                        step_seconds=args.step_seconds or 0.0, min_requests=args.min_requests or 0,
                                        actor=args.actor or getpass.getuser(), reason=args.reason or "",
                                        shadow_first=args.shadow_first)
    try:
        state = json.loads(_call(args.gateway, SERVICE, "StartRollout", request, m["RolloutState"]).json)[args.model]
        print(_line(state))
        if not args.wait:
            return 0
        last = None
        while state["status"] not in FINAL:
            time.sleep(1.0)
            state = _states(args.gateway, args.model)[args.model]
            line = _line(state)
            if line != last:
                print(line)
                last = line
    except grpc.RpcError as error:
        print(f"tensorgate rollout: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    return FINAL[state["status"]]


def cmd_rollback(args) -> int:
    m = messages()
    request = m["RollbackRequest"](model=args.model, actor=args.actor or getpass.getuser(), reason=args.reason or "")
    try:
        state = json.loads(_call(args.gateway, SERVICE, "Rollback", request, m["RolloutState"]).json)[args.model]
    except grpc.RpcError as error:
        print(f"tensorgate rollback: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(_line(state))
    return 0


def cmd_status(args) -> int:
    """Backends and their health; models with their versions per backend, digests, splits, rollouts."""
    try:
        snapshot = json.loads(_call(args.gateway, GATEWAY_SERVICE, "GetSnapshot", SnapshotRequest(), Snapshot).json)
        states = _states(args.gateway)
    except grpc.RpcError as error:
        print(f"tensorgate status: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"backends": snapshot["backends"], "traffic": snapshot.get("traffic", {}), "rollouts": states},
                         indent=1))
        return 0
    print("backends:")
    for address, backend in sorted(snapshot["backends"].items()):
        print(f"  {address:<22} pool {backend['pool']:<8} {backend['health']:<10} {backend['detail']}")
    print("models:")
    for model, split in sorted(snapshot.get("traffic", {}).items()):
        if model not in states:
            weights = (split.get("split") or {}).get("weights") or {}
            print(f"  {model}: split {weights}")
    for model, state in sorted(states.items()):
        print("  " + _line(state))
        for address, versions in sorted(state.get("backends", {}).items()):
            print(f"      {address:<22} versions {', '.join(versions) or '-'}")
        for version, digest in sorted(state.get("digests", {}).items()):
            print(f"      v{version} digest {digest}")
    return 0


def add_commands(commands) -> None:
    rollout = commands.add_parser("rollout", help="roll a model version out through a running gateway, in checked steps")
    rollout.add_argument("model")
    rollout.add_argument("version")
    rollout.add_argument("--gateway", required=True, help="the gateway's address (host:port)")
    rollout.add_argument("--steps", help="candidate traffic percentages, e.g. 5,25,50 (default: the gateway's rollout.steps)")
    rollout.add_argument("--step-seconds", type=float, help="least duration of a step (default: rollout.step_seconds)")
    rollout.add_argument("--min-requests", type=int, help="candidate requests a step needs (default: rollout.min_requests)")
    rollout.add_argument("--shadow-first", action="store_true", help="copy live traffic to the candidate for one step first")
    rollout.add_argument("--actor", help="who asks, for the audit log (default: the user)")
    rollout.add_argument("--reason", help="why, for the audit log")
    rollout.add_argument("--wait", action="store_true",
                         help="follow the rollout until it is promoted (exit 0) or rolled back (exit 1)")
    rollout.set_defaults(run=cmd_rollout)
    rollback = commands.add_parser("rollback", help="stop a rollout, or go back to the version live before the last promotion")
    rollback.add_argument("model")
    rollback.add_argument("--gateway", required=True)
    rollback.add_argument("--actor")
    rollback.add_argument("--reason")
    rollback.set_defaults(run=cmd_rollback)
    status = commands.add_parser("status", help="backends, models, versions, digests, splits and rollouts of a gateway")
    status.add_argument("--gateway", required=True)
    status.add_argument("--json", action="store_true", help="print it as JSON")
    status.set_defaults(run=cmd_status)
