"""The `tensorgate` command: a malformed config is a clear error and exit code 2; `serve` serves."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from gateway.local.triton import find_free_port

TENSORGATE = [sys.executable, "-m", "gateway"]
# The console script, as the README runs it (.venv/bin/tensorgate).
TENSORGATE_SCRIPT = Path(sys.executable).with_name("tensorgate")


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("listen: 127.0.0.1:8101\n", "pools: required key is missing"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: [nohost]}}\n", "pools.cpu.backends[0]: expected host:port"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: ['h:1']}}\nmodels: {m: {pools: [gpu]}}\n",
         "models.m.pools[0]: unknown pool 'gpu'"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: ['h:1'], weight: 3}}\n", "pools.cpu.weight: unknown key"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: ['h:1']}}\nhealth: {interval_s: -1}\n",
         "health.interval_s: expected a positive number"),
        ("listen: [unclosed\n", "not valid YAML"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: ['h:1']}}\n"
         "auth: {tenants: {a: {tokens: [{env: TENSORGATE_TEST_UNSET_TOKEN}], models: ['*']}}}\n",
         "auth.tenants.a.tokens[0]: environment variable TENSORGATE_TEST_UNSET_TOKEN is not set or empty"),
        ("listen: 127.0.0.1:8101\npools: {cpu: {backends: ['h:1']}}\nserver: {tls: {cert_file: /nonexistent.crt, key_file: k}}\n",
         "server.tls.cert_file: no such file"),
    ],
)
def test_malformed_config_exits_2_naming_the_key(tmp_path, text, fragment):
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    result = subprocess.run([*TENSORGATE, "serve", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = subprocess.run(
        [*TENSORGATE, "serve", "--config", str(tmp_path / "absent.yaml")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr


def test_serve_from_config_file(tmp_path, tritons):
    port = find_free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{port}\n"
        "pools:\n"
        f"  gpu: {{backends: ['{tritons[0].grpc_address}']}}\n"
        f"  cpu: {{backends: ['{tritons[1].grpc_address}']}}\n"
        "models:\n"
        "  simple_scale: {pools: [gpu, cpu]}\n"
    )
    process = subprocess.Popen([*TENSORGATE, "serve", "--config", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving on" in process.stdout.readline()
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
        assert client.infer("simple_scale", [tensor]).as_numpy("OUTPUT0")[0, 0] == 2.0
        # Only the configured model is routed.
        with pytest.raises(triton_grpc.InferenceServerException) as error:
            client.get_model_metadata("add_sub")
        assert error.value.status() == "StatusCode.NOT_FOUND"
        assert [m.name for m in client.get_model_repository_index().models] == ["simple_scale"]
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_example_config_is_valid():
    from pathlib import Path

    from gateway.config import load_config

    config = load_config(Path(__file__).parents[1] / "examples" / "gateway.yaml")
    assert list(config.pools) == ["primary", "standby"]
    assert config.batching.policy_for("fixed_cost").mode == "fixed"
    assert config.batching.policy_for("simple_scale").mode == "adaptive"


def _short_demo(tmp_path, *options: str) -> str:
    """`tensorgate demo` for 6 s: README's promises hold even when the run drives little traffic (a
    short run here, a slow busy machine for `make demo`): failover without failed requests, and the
    drift alert on simple_scale's shifted feature, with its capture. Returns the output."""
    result = subprocess.run(
        [*TENSORGATE, "demo", "--seconds", "6", "--log-dir", str(tmp_path), *options],
        capture_output=True, text=True, timeout=240,
    )
    output = result.stdout.replace("\r", "\n")
    assert result.returncode == 0, output[-3000:] + result.stderr[-3000:]
    assert "primary Triton SIGKILLed" in output
    assert ", 0 failed" in output
    assert "drift alert fired: simple_scale input/INPUT0[3] psi" in output
    assert "capture folder(s), the first" in output
    assert list((tmp_path / "captures" / "simple_scale").iterdir()), "no retraining capture written"
    return output


def test_demo_in_a_short_run_shows_the_drift_alert(tmp_path):
    """The demo serves the gateway on the engine the default config resolves to (h2 where its
    extension is built) and sees it only through the admin API, the metrics endpoint and the capture
    folder."""
    from gateway.server.config import ServerConfig

    engine = ServerConfig().resolved_engine()
    output = _short_demo(tmp_path)
    assert f"\n  engine   {engine} (" in output
    assert f"\nengine     {engine} (" in output  # the summary says it too
    if engine == "envoy":
        assert (tmp_path / "envoy.log").exists()


@pytest.mark.parametrize("engine", ["grpcio", "envoy"])
def test_demo_on_the_other_engines(tmp_path, engine):
    output = _short_demo(tmp_path, "--engine", engine)
    assert f"\n  engine   {engine} (" in output
    assert (tmp_path / "envoy.log").exists() == (engine == "envoy")


def test_demo_refuses_an_unknown_engine():
    result = subprocess.run([*TENSORGATE, "demo", "--engine", "nginx"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid choice: 'nginx'" in result.stderr


def test_local_triton_serves_the_example_models_until_terminated(tmp_path):
    """`tensorgate local-triton --grpc-port N` as the README runs it: one Triton with the example
    models on that port, until SIGTERM (a `kill`, a container stop) ends it cleanly, exit code 0."""
    port = find_free_port()
    process = subprocess.Popen(
        [str(TENSORGATE_SCRIPT), "local-triton", "--grpc-port", str(port), "--name", "readme", "--log-dir", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert f"on 127.0.0.1:{port} (gRPC)" in line, line
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            assert client.is_server_ready()
            models = {m["name"] for m in client.get_model_repository_index(as_json=True)["models"] if m.get("state") == "READY"}
            assert {"simple_scale", "add_sub", "mlp", "fixed_cost", "repeat_decoupled", "accumulate_sequence"} <= models
            tensor = triton_grpc.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.ones((1, 16), np.float32))
            assert client.infer("simple_scale", [tensor]).as_numpy("OUTPUT0")[0, 0] == 2.0
        finally:
            client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # stopped Triton and exited, not killed by the signal
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "Triton still listens after local-triton exited"
    assert (tmp_path / "readme.log").stat().st_size > 0
