"""Gated rollouts through the real gateway, on two real Triton servers in explicit model-control mode,
under steady loopback load from stock tritonclient: a good candidate is loaded, shifted and promoted
with zero failed requests; three bad candidates are each rolled back automatically with their
evidence in the audit log and never get more than their canary share; a restarted gateway restores
the split; the CLI drives it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from gateway.audit.log import AuditLog, verify_chain
from gateway.local.triton import LocalTriton
from gateway.testing import GatewayThread
from tests.waiting import wait_until

MODEL = "rollout_scale"
FIXTURE = Path(__file__).parent / "fixtures" / "models" / MODEL


@pytest.fixture(scope="module")
def explicit_tritons(tmp_path_factory):
    """Two Tritons in explicit model-control mode with version 1 of rollout_scale loaded."""
    repository = tmp_path_factory.mktemp("rollout-repository")
    shutil.copytree(FIXTURE, repository / MODEL)
    servers = [LocalTriton(repository, name=f"rollout-{i}", log_dir=tmp_path_factory.mktemp("rollout-logs"),
                           model_control="explicit", load_models=[MODEL]) for i in range(2)]
    for server in servers:
        server.start()
    yield servers
    for server in servers:
        server.stop()


def _loaded(server: LocalTriton) -> list[str]:
    client = grpcclient.InferenceServerClient(server.grpc_address)
    return sorted((m.version for m in client.get_model_repository_index().models if m.name == MODEL and m.state == "READY"),
                  key=int)


@pytest.fixture
def tritons_at_v1(explicit_tritons):
    """Every test starts with only version 1 loaded on both servers."""
    for server in explicit_tritons:
        if _loaded(server) != ["1"]:
            client = grpcclient.InferenceServerClient(server.grpc_address)
            config = client.get_model_config(MODEL, as_json=True)["config"]
            config["version_policy"] = {"specific": {"versions": [1]}}
            client.load_model(MODEL, config=json.dumps(config))
    wait_until(lambda: [(_loaded(server), grpcclient.InferenceServerClient(server.grpc_address).is_server_ready())
                        for server in explicit_tritons],
               "version 1 alone loaded, and every server ready", 60, step=0.2,
               accept=lambda states: all(state == (["1"], True) for state in states))
    return explicit_tritons


def _config(tritons, tmp_path, **rollout) -> dict:
    return {
        "listen": "127.0.0.1:0",
        "pools": {"cpu": {"backends": [t.grpc_address for t in tritons]}},
        "models": {MODEL: {"pools": ["cpu"], "latency_slo_ms": 250}},
        "health": {"interval_s": 0.5},
        "rollout": {"state_file": str(tmp_path / "rollout-state.json"), "audit_log": str(tmp_path / "audit.jsonl"),
                    "steps": [5, 25, 50], "step_seconds": 1.5, "min_requests": 30, "check_interval_s": 0.2,
                    "min_evidence": 20, "min_latency_evidence": 30, "min_output_values": 320, "load_timeout_s": 120, **rollout},
    }


class Load:
    """Steady traffic from stock tritonclient (4 threads, one channel each): answers by version, failures.
    With `sticky`, each thread sends its own sticky key (metadata `tensorgate-sticky-key`) and the
    versions each key was answered by are kept in order."""

    def __init__(self, address: str, threads: int = 4, sticky: bool = False) -> None:
        self.address = address
        self.sticky = sticky
        self.by_key: dict[str, list[str]] = {}
        self.versions: dict[str, int] = {}
        self.failures: list[str] = []
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(f"key-{n}",), daemon=True) for n in range(threads)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, key: str) -> None:
        client = grpcclient.InferenceServerClient(self.address)
        headers = {"tensorgate-sticky-key": key} if self.sticky else None
        data = np.arange(32, dtype=np.float32).reshape(2, 16) / 7.0
        while not self._stop.is_set():
            tensor = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
            tensor.set_data_from_numpy(data)
            try:
                result = client.infer(MODEL, [tensor], client_timeout=30, headers=headers)
                version = result.get_response().model_version
                with self._lock:
                    self.sent += 1
                    self.versions[version] = self.versions.get(version, 0) + 1
                    seen = self.by_key.setdefault(key, [])
                    if not seen or seen[-1] != version:
                        seen.append(version)
            except Exception as error:  # noqa: BLE001 — every failure is what the test counts
                with self._lock:
                    self.sent += 1
                    self.failures.append(str(error)[:200])


def _wait_status(gateway: GatewayThread, wanted: set[str], timeout: float = 180.0) -> dict:
    return _wait_for(gateway, MODEL, wanted, timeout)


def test_a_good_candidate_is_loaded_shifted_and_promoted_with_no_failed_request(tritons_at_v1, tmp_path):
    config = _config(tritons_at_v1, tmp_path)
    with GatewayThread(config) as gateway, Load(gateway.address) as load:
        time.sleep(1.0)
        gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, "2", actor="test", reason="a good candidate"))
        seen_steps = set()

        def note_step(state: dict) -> None:
            if state["status"] == "canary":
                seen_steps.add(state["step"])

        state = _wait_for(gateway, MODEL, {"promoted", "rolled-back", "failed"}, 240, step=0.05, each=note_step)
        assert state["status"] == "promoted", state["reason"]
        time.sleep(1.0)
        promoted_at = dict(load.versions)
        time.sleep(1.5)
        after = {v: load.versions.get(v, 0) - promoted_at.get(v, 0) for v in load.versions}
    assert load.failures == [], load.failures[:5]
    assert seen_steps == {0, 1, 2}
    # Each step's split of the requests: within 4σ of its share (binomial), over at least 30 candidate requests.
    assert [h["step"] for h in state["history"]] == ["canary 5 %", "canary 25 %", "canary 50 %"]
    for step, share in zip(state["history"], (0.05, 0.25, 0.5)):
        got, total = step["requests"]["candidate"], step["requests"]["candidate"] + step["requests"]["live"]
        assert got >= 30 and abs(got - share * total) <= 4 * math.sqrt(total * share * (1 - share)), (step, share)
    assert state["live"] == "2" and state["previous"] == "1" and state["weights"] == {"2": 1.0}
    assert after.get("1", 0) == 0 and after["2"] > 0  # after promotion every request is answered by v2
    assert state["backends"] == {t.grpc_address: ["1", "2"] for t in tritons_at_v1}  # v1 kept for a rollback
    actions = [record["action"] for record in AuditLog(tmp_path / "audit.jsonl").records()]
    assert actions == ["deploy", "shift", "shift", "shift", "promote"]
    assert verify_chain(tmp_path / "audit.jsonl").records == 5


@pytest.mark.parametrize(("version", "failing_check"), [("3", "error_rate"), ("4", "latency_p99_ms"), ("5", "output_psi")])
def test_a_bad_candidate_is_rolled_back_within_its_canary_share(tritons_at_v1, tmp_path, version, failing_check):
    """Errors (v3), answers past the 250 ms objective and the live p99 (v4: 1 s), drifted outputs (v5): each rolled back at
    the first 5 % step by the check that catches it, with the evidence in the audit log; the
    candidate got no more than its 5 % share of requests (a 4σ binomial bound), and every request
    after the rollback is answered by v1."""
    config = _config(tritons_at_v1, tmp_path, step_seconds=60)
    with GatewayThread(config) as gateway, Load(gateway.address) as load:
        time.sleep(1.0)
        gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, version, actor="test"))
        state = _wait_status(gateway, {"rolled-back", "failed", "promoted"})
        # Triton unloads the candidate once the requests it had in flight (v4: 1 s each) are done.
        final = _wait_unloaded(gateway, tritons_at_v1, version)
        records = _audit_until(tmp_path / "audit.jsonl", "unload")
        rolled_back_at = dict(load.versions)
        time.sleep(1.5)
        after = {v: load.versions.get(v, 0) - rolled_back_at.get(v, 0) for v in load.versions}
        sent = load.sent
    assert state["status"] == "rolled-back", state
    assert state["live"] == "1" and state["weights"] == {"1": 1.0}
    assert failing_check in state["reason"], state["reason"]
    failing = [c for c in state["evidence"]["checks"] if c["ok"] is False]
    assert [c["check"] for c in failing] == [failing_check]
    given = state["evidence"]["candidate"]["requests"]  # what the candidate got while it was in the split
    total = given + state["evidence"]["live"]["requests"]
    bound = 0.05 * total + 4 * math.sqrt(total * 0.05 * 0.95)
    assert 0 < given <= bound, (given, total)
    assert after.get(version, 0) == 0 and after.get("1", 0) > 0
    # Only the candidate's own requests may fail: v3's answers are errors, and a request v4 still holds
    # (1 s each) when it is taken out of rotation and unloaded may come back UNAVAILABLE naming it.
    # v5 answers wrongly but answers: nothing fails.
    assert len(load.failures) <= 0.05 * sent + 4 * math.sqrt(sent * 0.05 * 0.95), (len(load.failures), sent)
    if version == "3":
        assert load.failures and {f.split("] ", 1)[1] for f in load.failures} == {"rollout_scale: version 3 is broken on purpose"}
    elif version == "4":
        assert all(f.startswith("[StatusCode.UNAVAILABLE]") and "version 4" in f for f in load.failures), load.failures
    else:
        assert load.failures == []
    assert final == {t.grpc_address: ["1"] for t in tritons_at_v1}  # the candidate unloaded everywhere
    rollback = [r for r in records if r["action"] == "rollback"]
    assert len(rollback) == 1 and rollback[0]["version"] == int(version) and rollback[0]["actor"] == "gateway"
    assert any(c["check"] == failing_check and c["ok"] is False for c in rollback[0]["evidence"]["checks"])
    assert [r["action"] for r in records] == ["deploy", "shift", "rollback", "unload"]
    verify_chain(tmp_path / "audit.jsonl")


def _audit_until(path: Path, action: str, timeout: float = 60.0) -> list[dict]:
    """The audit log's records once its last action is `action` (written after the backends unload),
    or as they are after `timeout`."""
    return wait_until(lambda: list(AuditLog(path).records()), f"the audit log's last action to be {action}", timeout,
                      step=0.2, accept=lambda records: records and records[-1]["action"] == action,
                      raise_on_timeout=False)


def _wait_unloaded(gateway, tritons, version: str) -> dict:
    """{backend: versions loaded} once no backend has `version` loaded, or as it is after 60 s."""
    return wait_until(lambda: {t.grpc_address: _loaded(t) for t in tritons}, f"version {version} unloaded everywhere",
                      60, step=0.2, accept=lambda loaded: all(version not in versions for versions in loaded.values()),
                      raise_on_timeout=False)


def test_a_sticky_key_stays_on_one_version_while_the_canary_grows(tritons_at_v1, tmp_path):
    """Twelve clients, each with its own sticky key, through a 10 → 50 % rollout to promotion: a key
    moves at most once, from v1 to v2 (newer versions take their share of the key space first, so a
    growing canary only gains keys), and at the 50 % step some keys are on each version."""
    config = _config(tritons_at_v1, tmp_path, steps=[10, 50], step_seconds=2.0, min_requests=20)
    with GatewayThread(config) as gateway, Load(gateway.address, threads=12, sticky=True) as load:
        time.sleep(0.5)
        gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, "2", actor="test"))
        at_half = None

        def note_half(state: dict) -> None:
            nonlocal at_half
            if state["status"] == "canary" and state["step"] == 1 and at_half is None:
                time.sleep(1.0)
                with load._lock:
                    at_half = {key: seen[-1] for key, seen in load.by_key.items()}

        state = _wait_for(gateway, MODEL, {"promoted", "rolled-back", "failed"}, 240, step=0.05, each=note_half)
        time.sleep(1.0)
    assert state["status"] == "promoted", state["reason"]
    assert load.failures == []
    assert len(load.by_key) == 12
    for key, seen in load.by_key.items():
        assert seen in (["1"], ["1", "2"], ["2"]), (key, seen)  # never back, never between
        assert seen[-1] == "2", (key, seen)  # after the promotion every key is on v2
    assert at_half is not None and set(at_half.values()) == {"1", "2"}, at_half


def test_the_previous_version_is_unloaded_after_a_promotion_when_asked(tritons_at_v1, tmp_path):
    """With `unload_previous`, v1 is unloaded from every backend once v2 is promoted, with no failed
    request, and the audit log records the unload."""
    config = _config(tritons_at_v1, tmp_path, steps=[50], step_seconds=0.5, min_requests=10, unload_previous=True)
    with GatewayThread(config) as gateway, Load(gateway.address) as load:
        gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, "2", actor="test"))
        state = _wait_status(gateway, {"promoted", "rolled-back", "failed"})
        records = _audit_until(tmp_path / "audit.jsonl", "unload")
        final = _wait_unloaded(gateway, tritons_at_v1, "1")
    assert state["status"] == "promoted", state["reason"]
    assert load.failures == []
    assert final == {t.grpc_address: ["2"] for t in tritons_at_v1}
    assert [r["action"] for r in records] == ["deploy", "shift", "promote", "unload"] and records[-1]["version"] == 1


def test_a_failed_load_changes_nothing(tritons_at_v1, tmp_path):
    """Version 9 does not exist in the repository: the load fails, the rollout ends failed, v1 keeps
    every request, no split is left behind, and the audit log says why."""
    config = _config(tritons_at_v1, tmp_path)
    with GatewayThread(config) as gateway, Load(gateway.address) as load:
        time.sleep(0.5)
        gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, "9", actor="test"))
        state = _wait_status(gateway, {"failed", "rolled-back", "promoted"})
        split = gateway.call(lambda: gateway.gateway.traffic.snapshot()).get(MODEL, {}).get("split")
        time.sleep(0.5)
    assert state["status"] == "failed" and "loading version 9 failed" in state["reason"], state
    assert split is None
    assert load.failures == [] and set(load.versions) == {"1"}
    assert [t for t in tritons_at_v1 if _loaded(t) != ["1"]] == []
    records = list(AuditLog(tmp_path / "audit.jsonl").records())
    assert [r["action"] for r in records] == ["deploy"] and records[0]["evidence"] == {"failed": True}


def test_a_restarted_gateway_restores_the_split_and_resumes(tritons_at_v1, tmp_path):
    """Stopped in a canary step, a new gateway with the same state file applies the saved split at
    once (before any request) and carries the rollout on, with the rollout's own step length, to
    its promotion."""
    config = _config(tritons_at_v1, tmp_path, step_seconds=4)
    with GatewayThread(config) as gateway:
        with Load(gateway.address):
            gateway.call(lambda: gateway.gateway.rollouts.begin(MODEL, "2", actor="test"))
            state = _wait_status(gateway, {"canary", "failed", "rolled-back"})
    assert state["status"] == "canary"
    saved = json.loads((tmp_path / "rollout-state.json").read_text())[MODEL]
    assert saved["status"] == "canary" and saved["candidate"] == "2" and saved["live"] == "1"
    assert saved["weights"] == {"1": 1.0 - saved["steps"][saved["step"]] / 100, "2": saved["steps"][saved["step"]] / 100}
    with GatewayThread(config) as gateway:
        split = gateway.call(lambda: gateway.gateway.traffic.snapshot())[MODEL]["split"]
        assert split["weights"] == saved["weights"]
        with Load(gateway.address) as load:
            state = _wait_status(gateway, {"promoted", "rolled-back", "failed"})
    assert state["status"] == "promoted", state["reason"]
    assert load.failures == []


def test_rollout_rollback_and_status_from_the_command_line(tritons_at_v1, tmp_path):
    """`tensorgate rollout --wait` follows a rollout to its promotion (exit 0); `tensorgate status`
    shows the versions per backend and the split; `tensorgate rollback` goes back to v1."""
    config = _config(tritons_at_v1, tmp_path, step_seconds=0.5, min_requests=10)
    with GatewayThread(config) as gateway, Load(gateway.address) as load:
        cli = [sys.executable, "-m", "gateway"]
        rollout = subprocess.run([*cli, "rollout", MODEL, "2", "--gateway", gateway.address, "--wait",
                                  "--steps", "10,50", "--reason", "from the CLI"], capture_output=True, text=True, timeout=240)
        assert rollout.returncode == 0, rollout.stdout + rollout.stderr
        assert "promoted" in rollout.stdout
        status = subprocess.run([*cli, "status", "--gateway", gateway.address], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert f"{MODEL}: promoted — live v2" in status.stdout and "versions 1, 2" in status.stdout
        back = subprocess.run([*cli, "rollback", MODEL, "--gateway", gateway.address, "--reason", "test"],
                              capture_output=True, text=True, timeout=120)
        assert back.returncode == 0, back.stderr
        assert f"{MODEL}: rolled-back — live v1" in back.stdout
        time.sleep(1.0)
        before = dict(load.versions)
        time.sleep(1.0)
        assert load.versions.get("2", 0) == before.get("2", 0)
        again = subprocess.run([*cli, "rollout", MODEL, "9x", "--gateway", gateway.address], capture_output=True,
                               text=True, timeout=60)
        assert again.returncode == 1 and "INVALID_ARGUMENT" in again.stderr
    assert load.failures == []
    actions = [r["action"] for r in AuditLog(tmp_path / "audit.jsonl").records()]
    assert actions == ["deploy", "shift", "shift", "promote", "rollback"]


# ------------------------------------------------------------------ packaged versions: digests, tampering

def _dense_onnx(bias: float) -> bytes:
    from onnx import TensorProto, helper

    weights = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0]], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [3, 2], weights.ravel()),
                     helper.make_tensor("b", TensorProto.FLOAT, [2], np.full(2, bias, np.float32))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_packaged_versions_roll_out_with_their_digests_and_a_tampered_one_is_refused(tmp_path):
    """`tensorgate package` writes versions 1, 2 and 3 of an ONNX model, 2 with its training rows as
    drift reference; the rollout of 2 records its digest in the state and the audit log, and on
    promotion the drift stage takes the packaged reference and notes the digest serving (what a
    retraining capture records); version 3, changed on disk after packaging, is refused before
    anything is loaded."""
    from gateway.packaging import PackageRequest, package, read_manifest

    repository = tmp_path / "repository"
    training = np.random.default_rng(7).normal(5.0, 2.0, (3000, 3)).astype(np.float32)
    np.save(tmp_path / "train.npy", training)
    for version, bias in ((1, 0.0), (2, 0.001), (3, 0.002)):
        (tmp_path / f"dense{version}.onnx").write_bytes(_dense_onnx(bias))
        package(PackageRequest(source=str(tmp_path / f"dense{version}.onnx"), name="dense", repository=repository,
                               reference=tmp_path / "train.npy" if version == 2 else None))
    manifest = read_manifest(repository / "dense", 2)
    onnx_file = next((repository / "dense" / "3").rglob("*.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")  # one byte changed after packaging
    (repository / "dense" / "config.pbtxt").write_text(
        (repository / "dense" / "config.pbtxt").read_text().replace("version_policy", "# version_policy")
        + "\nversion_policy: { specific { versions: [ 1 ] } }\n")
    servers = [LocalTriton(repository, name=f"packaged-{i}", model_control="explicit", load_models=["dense"],
                           log_dir=tmp_path / "logs") for i in range(2)]
    for server in servers:
        server.start()
    try:
        config = {
            "listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [s.grpc_address for s in servers]}},
            "models": {"dense": {"pools": ["cpu"]}}, "health": {"interval_s": 0.5},
            "drift": {"models": {"dense": {"inputs": ["x"], "reference": {"learn_rows": 100000}}}},
            "rollout": {"repository": str(repository), "audit_log": str(tmp_path / "audit.jsonl"),
                        "steps": [50], "step_seconds": 0.5, "min_requests": 10, "check_interval_s": 0.2,
                        "min_evidence": 5, "min_output_values": 20},
        }
        with GatewayThread(config) as gateway:
            stop = threading.Event()

            def traffic():
                client = grpcclient.InferenceServerClient(gateway.address)
                while not stop.is_set():
                    tensor = grpcclient.InferInput("x", [4, 3], "FP32")
                    tensor.set_data_from_numpy(np.random.default_rng().standard_normal((4, 3)).astype(np.float32))
                    client.infer("dense", [tensor])

            thread = threading.Thread(target=traffic, daemon=True)
            thread.start()
            gateway.call(lambda: gateway.gateway.rollouts.begin("dense", "3", actor="test"))
            refused = _wait_for(gateway, "dense", {"failed", "rolled-back", "promoted"})
            gateway.call(lambda: gateway.gateway.rollouts.begin("dense", "2", actor="test"))
            promoted = _wait_for(gateway, "dense", {"failed", "rolled-back", "promoted"})
            stop.set()
            thread.join(timeout=30)
            serving = gateway.call(lambda: dict(gateway.gateway.drift.serving))
            reference = gateway.call(lambda: gateway.gateway.drift.monitors["dense"].tensors[("input", "x")].reference)
    finally:
        for server in servers:
            server.stop()
    assert refused["status"] == "failed" and "refused" in refused["reason"] and "model.onnx" in refused["reason"], refused
    assert promoted["status"] == "promoted", promoted["reason"]
    assert promoted["digests"] == {"2": manifest["digest"]}
    assert serving == {"dense": {"version": "2", "digest": manifest["digest"]}}
    # The packaged 3,000 training rows became the reference (learning it from traffic would take 100,000).
    assert reference is not None and reference.sum(axis=1).tolist() == [3000] * 3
    records = list(AuditLog(tmp_path / "audit.jsonl").records())
    assert records[0]["action"] == "deploy" and records[0]["version"] == 3 and records[0]["evidence"] == {"failed": True}
    assert {r["digest"] for r in records[1:]} == {manifest["digest"]}


def _wait_for(gateway: GatewayThread, model: str, wanted: set[str], timeout: float = 180.0, step: float = 0.1,
              each=None) -> dict:
    """`model`'s rollout state once its status is one of `wanted`; `each(state)` sees every state read."""
    def read() -> dict:
        state = gateway.call(lambda: gateway.gateway.rollouts.states(model))[model]
        if each is not None:
            each(state)
        return state

    return wait_until(read, f"{model}'s rollout to be {' or '.join(sorted(wanted))}", timeout, step,
                      accept=lambda state: state["status"] in wanted)
