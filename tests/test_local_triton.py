"""gateway.local against real tritonserver processes, and the example models' contract over gRPC."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from gateway.local import (  # noqa: E402
    LocalTriton,
    TritonLaunchError,
    default_model_repository,
    find_free_port,
    triton_binary,
)
from gateway.local.triton import START_ATTEMPTS, _group_members  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

try:
    triton_binary()
except TritonLaunchError as exc:  # the `local` extra is not installed
    pytest.skip(str(exc), allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "examples" / "models"
EXPECTED_MODELS = {
    "accumulate_sequence",
    "add_sub",
    "bytes_reverse",
    "dtypes",
    "fail_on_demand",
    "fixed_cost",
    "fixed_cost_dynbatch",
    "mlp",
    "repeat_decoupled",
    "simple_scale",
    "simple_scale_dynbatch",
    "slow_on_demand",
    "versioned_scale",
}


# ---------------------------------------------------------------------------------------- helpers


def tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def rows(n: int, width: int = 16) -> np.ndarray:
    return np.arange(n * width, dtype=np.float32).reshape(n, width) / 7


def status_of(excinfo: pytest.ExceptionInfo) -> str:
    return str(excinfo.value.status())


def small_repository(tmp_path: Path, *models: str) -> Path:
    """A repository with a few of the example models: starts faster than the whole set."""
    repo = tmp_path / "models"
    for model in models:
        shutil.copytree(MODELS / model, repo / model)
    return repo


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` has exited (a zombie counts as exited), checking at least once."""
    return wait_until(lambda: _is_zombie(pid), f"pid {pid} to exit", timeout, raise_on_timeout=False)


def _is_zombie(pid: int) -> bool:
    """True if `pid` is a zombie or no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    server = LocalTriton(
        default_model_repository(), name="models", log_dir=tmp_path_factory.mktemp("triton-logs")
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(triton: LocalTriton) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(triton.grpc_address)
    yield c
    c.close()


# ------------------------------------------------------------------------------------ the models


def test_every_example_model_is_ready(
    triton: LocalTriton, client: grpcclient.InferenceServerClient
) -> None:
    on_disk = {p.parent.name for p in MODELS.glob("*/config.pbtxt")}
    assert on_disk == EXPECTED_MODELS
    assert client.is_server_live() and client.is_server_ready()
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {m["name"]: m["state"] for m in index} == {name: "READY" for name in EXPECTED_MODELS}
    for name in EXPECTED_MODELS:
        assert client.is_model_ready(name)
    assert triton.is_running and triton.pid is not None
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with no_proxy.open(f"http://{triton.metrics_address}/metrics", timeout=5) as response:
        assert b"nv_inference_request_success" in response.read()
    assert "state=running" in repr(triton) and str(triton.grpc_port) in repr(triton)


@pytest.mark.parametrize("model", ["simple_scale", "simple_scale_dynbatch"])
def test_simple_scale(client: grpcclient.InferenceServerClient, model: str) -> None:
    x = rows(3)
    result = client.infer(model, [tensor("INPUT0", x, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)


def test_add_sub(client: grpcclient.InferenceServerClient) -> None:
    a, b = rows(4), rows(4)[::-1].copy()
    result = client.infer("add_sub", [tensor("INPUT0", a, "FP32"), tensor("INPUT1", b, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)


def test_dtypes(client: grpcclient.InferenceServerClient) -> None:
    f16 = np.array([[0.5, -1.5, 3.0], [2.0, 0.0, -0.25]], dtype=np.float16)
    i64 = np.array([[2**40, -7], [0, 1]], dtype=np.int64)
    flags = np.array([[True, False, True, True], [False, False, True, False]])
    result = client.infer(
        "dtypes",
        [
            tensor("IN_FP16", f16, "FP16"),
            tensor("IN_INT64", i64, "INT64"),
            tensor("IN_BOOL", flags, "BOOL"),
        ],
    )
    assert result.as_numpy("OUT_FP16").dtype == np.float16
    np.testing.assert_array_equal(result.as_numpy("OUT_FP16"), f16 * 2)
    np.testing.assert_array_equal(result.as_numpy("OUT_INT64"), i64 + 1)
    np.testing.assert_array_equal(result.as_numpy("OUT_BOOL"), ~flags)


def test_bytes_reverse(client: grpcclient.InferenceServerClient) -> None:
    text = np.array([[b"hello"], [b""], [b"\x00\xffab"], ["h\u00e9".encode()]], dtype=np.object_)
    result = client.infer("bytes_reverse", [tensor("TEXT", text, "BYTES")])
    assert result.as_numpy("REVERSED").reshape(-1).tolist() == [
        b"olleh",
        b"",
        b"ba\xff\x00",
        b"\xa9\xc3h",
    ]
    np.testing.assert_array_equal(
        result.as_numpy("LENGTH"), np.array([[5], [0], [4], [3]], np.int32)
    )


def _mlp_reference(x: np.ndarray) -> np.ndarray:
    # The weights exactly as mlp/1/model.py draws them.
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32), dtype=np.float32) * np.float32(0.25)
    b1 = rng.standard_normal(32, dtype=np.float32) * np.float32(0.1)
    w2 = rng.standard_normal((32, 4), dtype=np.float32) * np.float32(0.25)
    b2 = rng.standard_normal(4, dtype=np.float32) * np.float32(0.1)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_mlp(client: grpcclient.InferenceServerClient) -> None:
    x = np.random.default_rng(1).standard_normal((5, 16), dtype=np.float32)
    probs = client.infer("mlp", [tensor("INPUT0", x, "FP32")]).as_numpy("PROBS")
    assert probs.shape == (5, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, _mlp_reference(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("model", ["fixed_cost", "fixed_cost_dynbatch"])
def test_fixed_cost_batches_only_with_dynamic_batching(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    def counts() -> tuple[int, int]:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    before = counts()
    done: queue.Queue = queue.Queue()
    x = rows(1)
    n = 24
    for _ in range(n):
        client.async_infer(
            model, [tensor("INPUT0", x, "FP32")], lambda result, error: done.put((result, error))
        )
    for _ in range(n):
        result, error = done.get(timeout=30)
        assert error is None
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    # Triton updates its statistics when a request is released, which may be after the
    # client has its response: wait for the counts to settle.
    inferences, executions = wait_until(
        lambda: tuple(after - b for after, b in zip(counts(), before, strict=True)),
        f"Triton to count {n} more inferences (and the executions)",
        10,
        accept=lambda counted: counted[0] == n,
    )
    if model == "fixed_cost":
        assert executions == n
    else:
        # 24 requests in flight against a 2 ms call: the batcher must have merged some.
        assert executions < n


def test_fail_on_demand_status_codes(client: grpcclient.InferenceServerClient) -> None:
    x = rows(2)

    def call(mode: int):
        return client.infer(
            "fail_on_demand",
            [tensor("INPUT0", x, "FP32"), tensor("MODE", np.full((2, 1), mode, np.int32), "INT32")],
        )

    np.testing.assert_array_equal(call(0).as_numpy("OUTPUT0"), x)
    expected = {
        1: ("StatusCode.INTERNAL", "MODE 1"),
        2: ("StatusCode.INVALID_ARGUMENT", "MODE 2"),
        3: ("StatusCode.INTERNAL", "RuntimeError: fail_on_demand: MODE 3"),
    }
    for mode, (status, text) in expected.items():
        with pytest.raises(InferenceServerException) as excinfo:
            call(mode)
        assert status_of(excinfo) == status and text in excinfo.value.message()


def test_request_errors_carry_actionable_status(client: grpcclient.InferenceServerClient) -> None:
    # The statuses the gateway must reproduce for requests it rejects itself.
    cases = [
        ("nope", [tensor("INPUT0", rows(1), "FP32")], "StatusCode.NOT_FOUND", "unknown model"),
        (
            "simple_scale",
            [tensor("INPUT0", rows(1).astype(np.int32), "INT32")],
            "StatusCode.INVALID_ARGUMENT",
            "data-type is 'INT32', but model 'simple_scale' expects 'FP32'",
        ),
        (
            "simple_scale",
            [tensor("INPUT0", np.zeros((1, 15), np.float32), "FP32")],
            "StatusCode.INVALID_ARGUMENT",
            "Expected [-1,16], got [1,15]",
        ),
        (
            "simple_scale",
            [tensor("INPUT0", np.zeros((65, 16), np.float32), "FP32")],
            "StatusCode.INVALID_ARGUMENT",
            "batch-size must be <= 64",
        ),
        (
            "add_sub",
            [tensor("INPUT0", rows(1), "FP32")],
            "StatusCode.INVALID_ARGUMENT",
            "missing required input",
        ),
        (
            "repeat_decoupled",
            [tensor("IN", np.array([1], np.int32), "INT32")],
            "StatusCode.UNIMPLEMENTED",
            "doesn't support models with decoupled transaction policy",
        ),
    ]
    for model, inputs, status, text in cases:
        with pytest.raises(InferenceServerException) as excinfo:
            client.infer(model, inputs)
        assert status_of(excinfo) == status, (model, excinfo.value)
        assert text in excinfo.value.message()


def _stream(
    client: grpcclient.InferenceServerClient, requests: list[tuple[str, np.ndarray]]
) -> dict:
    """Runs repeat_decoupled requests on one stream; returns, per request id, its messages."""
    messages: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: messages.put((result, error)))
    try:
        for request_id, values in requests:
            client.async_stream_infer(
                "repeat_decoupled",
                [tensor("IN", values, "INT32")],
                request_id=request_id,
                enable_empty_final_response=True,
            )
        by_id: dict = {request_id: [] for request_id, _ in requests}
        finals = 0
        while finals < len(requests):
            result, error = messages.get(timeout=30)
            if error is not None:
                # tritonclient drops the response that carried the error: no id, no flags.
                by_id.setdefault(None, []).append(error)
                continue
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            payload = (
                None if final else (int(result.as_numpy("OUT")[0]), int(result.as_numpy("IDX")[0]))
            )
            by_id[response.id].append(("final", None) if final else ("data", payload))
            finals += final
        return by_id
    finally:
        client.stop_stream()


def test_repeat_decoupled_stream(client: grpcclient.InferenceServerClient) -> None:
    by_id = _stream(
        client,
        [
            ("three", np.array([7, 8, 9], np.int32)),
            ("none", np.array([], np.int32)),
            ("bad", np.array([1, -2, 3], np.int32)),
        ],
    )
    assert by_id["three"] == [("data", (7, 0)), ("data", (8, 1)), ("data", (9, 2)), ("final", None)]
    assert by_id["none"] == [("final", None)]
    # The element before the negative one is delivered, then the error, then the final flag.
    assert by_id["bad"] == [("data", (1, 0)), ("final", None)]
    [error] = by_id[None]
    assert "negative element -2 at index 1" in error.message() and error.status() is None


def test_accumulate_sequence_numeric_and_string_ids(
    client: grpcclient.InferenceServerClient,
) -> None:
    def run(ids: tuple) -> dict:
        sums: dict = {sid: [] for sid in ids}
        for step in range(3):
            for k, sid in enumerate(ids):
                value = np.array([[(step + 1) * 10**k]], np.int32)
                result = client.infer(
                    "accumulate_sequence",
                    [tensor("INPUT", value, "INT32")],
                    sequence_id=sid,
                    sequence_start=step == 0,
                    sequence_end=step == 2,
                )
                sums[sid].append(int(result.as_numpy("OUTPUT")[0, 0]))
        return sums

    assert run((41, 42)) == {41: [1, 3, 6], 42: [10, 30, 60]}
    # Strings sharing their first four characters: they would collide if keyed by CORRID.
    assert run(("session-1", "session-2")) == {"session-1": [1, 3, 6], "session-2": [10, 30, 60]}
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(
            "accumulate_sequence",
            [tensor("INPUT", np.array([[1]], np.int32), "INT32")],
            sequence_id=99,
        )
    assert (
        status_of(excinfo) == "StatusCode.INVALID_ARGUMENT" and "START" in excinfo.value.message()
    )


# -------------------------------------------------------------------------------------- lifecycle


def test_stop_leaves_no_process(tmp_path: Path) -> None:
    server = LocalTriton(small_repository(tmp_path, "simple_scale"), name="lone", log_dir=tmp_path)
    with server:
        pid = server.pid
        assert pid is not None and _group_members(pid)  # the server and its stub
        shm = list(Path("/dev/shm").glob(f"{server._shm_prefix}*"))
        assert shm
    assert not server.is_running and server.pid is None
    assert _group_members(pid) == [] and wait_gone(pid, timeout=0)
    assert not any(p.exists() for p in shm)
    assert "state=exited(0)" in repr(server)
    server.stop()  # idempotent
    assert "Started GRPCInferenceService" in server.log_path.read_text()


def test_kill_then_restart_on_same_ports(tmp_path: Path) -> None:
    server = LocalTriton(
        small_repository(tmp_path, "simple_scale"), name="phoenix", log_dir=tmp_path
    )
    server.start()
    try:
        address = server.grpc_address
        first = grpcclient.InferenceServerClient(address)
        x = rows(1)
        first.infer("simple_scale", [tensor("INPUT0", x, "FP32")])
        pid = server.pid
        server.kill()
        assert not server.is_running and _group_members(pid) == []
        with pytest.raises(InferenceServerException) as excinfo:
            first.infer("simple_scale", [tensor("INPUT0", x, "FP32")], client_timeout=5)
        assert status_of(excinfo) == "StatusCode.UNAVAILABLE"
        server.restart()
        assert server.grpc_address == address and server.pid != pid
        # gRPC shares subchannels between channels to one address: a new client would inherit
        # the old one's reconnect backoff and could fail fast for a moment, unless it has its own.
        second = grpcclient.InferenceServerClient(
            address, channel_args=[("grpc.use_local_subchannel_pool", 1)]
        )
        result = second.infer("simple_scale", [tensor("INPUT0", x, "FP32")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        # The old client reconnects by itself once its backoff has run out.
        wait_until(
            lambda: first.infer("simple_scale", [tensor("INPUT0", x, "FP32")]) is not None,
            "the old client to reconnect",
            10,
            ignore=(InferenceServerException,),
        )
        assert server.log_path.read_text().count("=== tensorgate LocalTriton phoenix") == 2
        with pytest.raises(TritonLaunchError, match="already running"):
            server.start()
    finally:
        server.stop()


def test_broken_repository_raises_with_log(tmp_path: Path) -> None:
    repo = small_repository(tmp_path, "simple_scale")
    (repo / "simple_scale" / "1" / "model.py").write_text(
        textwrap.dedent(
            """
            class TritonPythonModel:
                def initialize(self, args):
                    raise ValueError("deliberately broken model")
            """
        )
    )
    server = LocalTriton(repo, name="broken", log_dir=tmp_path)
    with pytest.raises(TritonLaunchError) as excinfo:
        server.start(timeout=60)
    message = str(excinfo.value)
    assert "deliberately broken model" in message and str(server.log_path) in message
    assert not server.is_running
    assert server.log_path.read_text().count("=== tensorgate LocalTriton broken") == 1  # its own exit: not retried


def test_a_server_aborted_at_start_is_started_again(tmp_path: Path) -> None:
    """Killed by a signal before it is ready (the wheel's Triton aborts at start-up now and then,
    on a loaded machine twice in a row at times): start() launches it again, up to START_ATTEMPTS
    times in all, and returns it serving; an exit of its own is not retried (the broken repository
    above launches once)."""
    assert START_ATTEMPTS == 3
    server = LocalTriton(small_repository(tmp_path, "simple_scale"), name="again", log_dir=tmp_path)
    started = concurrent.futures.ThreadPoolExecutor(1).submit(server.start, 60)
    aborted = []

    def abort_a_new_launch() -> list:
        proc = server._proc
        if proc is not None and proc.pid not in aborted:
            os.kill(proc.pid, signal.SIGABRT)
            aborted.append(proc.pid)
        return aborted

    wait_until(  # abort every launch but the last
        abort_a_new_launch,
        f"{START_ATTEMPTS - 1} launches aborted",
        60,
        step=0.005,
        accept=lambda pids: len(pids) >= START_ATTEMPTS - 1,
    )
    try:
        started.result(timeout=90)
        assert server.is_running and server.pid not in aborted
        x = rows(1)
        result = grpcclient.InferenceServerClient(server.grpc_address).infer("simple_scale", [tensor("INPUT0", x, "FP32")])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x * 2)
        assert server.log_path.read_text().count("=== tensorgate LocalTriton again") == START_ATTEMPTS
    finally:
        server.stop()


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    # Started from a thread that has ended, in a process then SIGKILLed: the server must go too.
    script = textwrap.dedent(
        f"""
        import threading, time
        from gateway.local import LocalTriton
        server = LocalTriton({str(small_repository(tmp_path, "simple_scale"))!r}, name="orphan",
                             log_dir={str(tmp_path)!r})
        thread = threading.Thread(target=server.start)
        thread.start(); thread.join()
        time.sleep(0.5)
        print(server.pid, server.is_running, server._backend_dir, flush=True)
        time.sleep(120)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid_text, running, backend_dir = parent.stdout.readline().split()
        assert running == "True"
        pid = int(pid_text)
        assert not _is_zombie(pid)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # Nobody is left to remove the copied backend: the killed parent would have.
        shutil.rmtree(backend_dir, ignore_errors=True)
    assert wait_gone(pid, timeout=10)
    wait_until(
        lambda: _group_members(pid), f"process group {pid} to empty", 10, accept=lambda members: members == []
    )


# ------------------------------------------------------------------------------------ module API


def test_find_free_port_hands_out_distinct_ports() -> None:
    ports = [find_free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(1024 <= p < 65536 for p in ports)


def test_default_model_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TENSORGATE_MODEL_REPOSITORY", raising=False)
    assert default_model_repository() == MODELS
    monkeypatch.setenv("TENSORGATE_MODEL_REPOSITORY", str(tmp_path))
    assert default_model_repository() == tmp_path
    monkeypatch.setenv("TENSORGATE_MODEL_REPOSITORY", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="TENSORGATE_MODEL_REPOSITORY"):
        default_model_repository()
