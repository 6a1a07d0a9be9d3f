"""`tensorgate package` end to end: real frameworks → packaged folders → two real Tritons from the wheel
(one in explicit model-control mode loading by name, one loading the whole repository) → the real
gateway, queried with tritonclient. Answers are compared with the framework that trained the model."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
onnx = pytest.importorskip("onnx")
sklearn_datasets = pytest.importorskip("sklearn.datasets")
joblib = pytest.importorskip("joblib")

from onnx import TensorProto, helper  # noqa: E402
from sklearn.ensemble import RandomForestClassifier  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from gateway.cli import main as cli_main  # noqa: E402
from gateway.local.triton import LocalTriton  # noqa: E402
from gateway.packaging import PackageRequest, package, parse_tensor_option, verify_version  # noqa: E402
from gateway.packaging.dockerfile import write_build_context  # noqa: E402
from gateway.testing import GatewayThread  # noqa: E402
from tests.waiting import wait_until  # noqa: E402

try:
    import torch
except ImportError as error:  # torch==2.13.0 (CPU) is in the `package` extra; only a machine without it skips
    torch = None
    TORCH_MISSING = f"torch cannot be imported here ({error}); it comes with tensorgate[package]"

pytestmark = pytest.mark.timeout(900)

IRIS_X, IRIS_Y = sklearn_datasets.load_iris(return_X_y=True)
IRIS_X32 = IRIS_X.astype(np.float32)
CALLABLE_MODULE = "tg_packaged_callable"
CALLABLE_SOURCE = '''
"""A plain NumPy function packaged as a model."""
import numpy as np

def score(features, weights):
    scaled = (features - 1.0) * weights
    return {"scaled": scaled, "total": scaled.sum(axis=1, keepdims=True).astype(np.float64)}
'''


def _onnx_helper_model() -> bytes:
    """y = relu(x @ W + b), built node by node with onnx.helper."""
    weights = np.array([[1.0, -2.0], [0.5, 0.25], [-1.0, 3.0]], dtype=np.float32)
    bias = np.array([0.1, -0.2], dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["pre"]),
         helper.make_node("Relu", ["pre"], ["y"])],
        "dense_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [3, 2], weights.ravel()),
                     helper.make_tensor("b", TensorProto.FLOAT, [2], bias)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


if torch is not None:
    class _TinyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.linear(features), dim=1)


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """Every kind of source packaged into one repository; what each should answer."""
    repo = tmp_path_factory.mktemp("repository")
    work = tmp_path_factory.mktemp("sources")
    expected: dict[str, dict] = {}

    lr = LogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    joblib.dump(lr, work / "lr.joblib")
    # Through the command line, as a user runs it.
    assert cli_main(["package", str(work / "lr.joblib"), "--name", "iris_lr", "--repo", str(repo),
                     "--max-batch-size", "256", "--dynamic-batching"]) == 0
    expected["iris_lr"] = {"model": lr}

    rf = RandomForestClassifier(n_estimators=25, random_state=0).fit(IRIS_X, IRIS_Y)
    joblib.dump(rf, work / "rf.pkl")
    package(PackageRequest(source=str(work / "rf.pkl"), name="iris_rf", repository=repo, max_batch_size=256))
    expected["iris_rf"] = {"model": rf}

    (work / "dense.onnx").write_bytes(_onnx_helper_model())
    package(PackageRequest(source=str(work / "dense.onnx"), name="dense", repository=repo))

    (work / f"{CALLABLE_MODULE}.py").write_text(textwrap.dedent(CALLABLE_SOURCE))
    np.savez(work / "callable_example.npz", features=np.ones((2, 3), np.float32), weights=np.ones((2, 3), np.float32))
    sys.path.insert(0, str(work))
    try:
        package(PackageRequest(source=f"{CALLABLE_MODULE}:score", name="scorer", repository=repo,
                               example=work / "callable_example.npz"))
        import importlib

        expected["scorer"] = {"function": importlib.import_module(CALLABLE_MODULE).score}
    finally:
        sys.path.remove(str(work))

    import lightgbm
    import xgboost

    for name, booster in (("iris_xgb", xgboost.XGBClassifier(n_estimators=10, max_depth=3)),
                          ("iris_lgbm", lightgbm.LGBMClassifier(n_estimators=10, verbose=-1))):
        booster.fit(IRIS_X, IRIS_Y)
        joblib.dump(booster, work / f"{name}.joblib")
        package(PackageRequest(source=str(work / f"{name}.joblib"), name=name, repository=repo, max_batch_size=256))
        expected[name] = {"model": booster}

    if torch is not None:
        scripted = torch.jit.script(_TinyNet().eval())
        scripted.save(str(work / "tiny.pt"))
        np.save(work / "tiny_example.npy", IRIS_X32[:5])
        package(PackageRequest(source=str(work / "tiny.pt"), name="tiny_torch", repository=repo,
                               example=work / "tiny_example.npy"))
        expected["tiny_torch"] = {"module": scripted}
    return repo, expected


@pytest.fixture(scope="module")
def serving(packaged, tmp_path_factory):
    repo, expected = packaged
    logs = tmp_path_factory.mktemp("triton-logs")
    names = sorted(p.name for p in repo.iterdir() if p.is_dir())
    # One loads each model by name (explicit model control, as a rollout does), one loads the repository.
    explicit = LocalTriton(repo, name="pkg-explicit", log_dir=logs, model_control="explicit", load_models=names)
    whole = LocalTriton(repo, name="pkg-none", log_dir=logs)
    for server in (explicit, whole):
        server.start(timeout=240)
    config = {"listen": "127.0.0.1:0", "health": {"interval_s": 0.5},
              "pools": {"first": {"backends": [explicit.grpc_address]}, "second": {"backends": [whole.grpc_address]}}}
    with GatewayThread(config) as gateway:
        yield {"gateway": gateway.address, "tritons": [explicit.grpc_address, whole.grpc_address], "expected": expected}
    for server in (explicit, whole):
        server.stop()


def _infer(address: str, model: str, inputs: dict[str, np.ndarray], deadline_s: float = 60.0):
    client = grpcclient.InferenceServerClient(address)
    tensors = []
    for name, array in inputs.items():
        from tritonclient.utils import np_to_triton_dtype

        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)

    def answer():  # the gateway learns the models at its first health checks: until then, UNAVAILABLE
        try:
            return client.infer(model, tensors)
        except InferenceServerException as error:
            text = str(error).lower()
            if error.status() == "StatusCode.UNAVAILABLE" or "unknown model" in text or "not found" in text:
                return error
            raise

    return wait_until(answer, f"{model} to answer at {address}", deadline_s, step=0.2,
                      accept=lambda answered: not isinstance(answered, InferenceServerException))


def _addresses(serving) -> list[str]:
    return [serving["gateway"], *serving["tritons"]]


@pytest.mark.parametrize("name", ["iris_lr", "iris_rf", "iris_xgb", "iris_lgbm"])
def test_iris_classifiers_match_scikit_learn(serving, name):
    model = serving["expected"][name]["model"]
    for address in _addresses(serving):
        result = _infer(address, name, {"input": IRIS_X32})
        probabilities = result.as_numpy("probabilities")
        assert probabilities.shape == (150, 3)
        np.testing.assert_allclose(probabilities, model.predict_proba(IRIS_X), atol=1e-5, rtol=0)
        labels = result.as_numpy("label")
        assert labels.shape == (150, 1)  # a [batch] output is dims [1] in Triton's config
        assert np.array_equal(labels.ravel(), model.predict(IRIS_X)), address


def test_onnx_helper_model_matches_onnxruntime(serving, packaged):
    import onnxruntime

    repo, _ = packaged
    x = np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32)
    session = onnxruntime.InferenceSession(str(repo / "dense" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (direct,) = session.run(["y"], {"x": x})
    for address in _addresses(serving):
        assert np.array_equal(_infer(address, "dense", {"x": x}).as_numpy("y"), direct)


def test_python_callable_matches_the_function(serving):
    score = serving["expected"]["scorer"]["function"]
    rng = np.random.default_rng(2)
    features, weights = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    direct = score(features, weights)
    for address in _addresses(serving):
        result = _infer(address, "scorer", {"features": features, "weights": weights})
        assert np.array_equal(result.as_numpy("scaled"), direct["scaled"])
        assert result.as_numpy("total").dtype == np.float64
        assert np.array_equal(result.as_numpy("total"), direct["total"])


@pytest.mark.skipif(torch is None, reason=TORCH_MISSING if torch is None else "")
def test_torchscript_module_matches_torch(serving):
    module = serving["expected"]["tiny_torch"]["module"]
    x = IRIS_X32[:9]
    with torch.no_grad():
        direct = module(torch.from_numpy(x)).numpy()
    for address in _addresses(serving):
        assert np.array_equal(_infer(address, "tiny_torch", {"features": x}).as_numpy("output__0"), direct)


def test_packaged_config_carries_the_digest_triton_serves(serving, packaged):
    """The digest in the manifest is what Triton reports in the model's config parameters."""
    repo, _ = packaged
    manifest = verify_version(repo / "iris_lr", 1)
    client = grpcclient.InferenceServerClient(serving["tritons"][0])
    parameters = client.get_model_config("iris_lr").config.parameters
    assert parameters["tensorgate.digest.1"].string_value == manifest["digest"]
    config = client.get_model_config("iris_lr").config
    assert (config.max_batch_size, config.backend, config.HasField("dynamic_batching")) == (256, "tensorgate_onnx", True)


def test_build_context_entrypoint_serves_the_package(packaged, tmp_path):
    """The CPU image's launcher and its configs/cpu.pbtxt, run from the extracted context against the
    wheel's Triton (what the image runs, without the image): the model answers as packaged."""
    import subprocess
    import tarfile

    from gateway.local.triton import find_free_ports

    _, expected = packaged
    # Packaged for production (Triton's onnxruntime backend, which the wheel's Triton lacks): the CPU
    # image serves the same folder through configs/cpu.pbtxt and tensorgate's Python-based backend.
    joblib.dump(expected["iris_rf"]["model"], tmp_path / "rf.joblib")
    repo = tmp_path / "repository"
    package(PackageRequest(source=str(tmp_path / "rf.joblib"), name="iris_rf", repository=repo, backend="onnxruntime",
                           max_batch_size=256))
    context = tmp_path / "iris.context.tar"
    write_build_context(repo / "iris_rf", 1, context)
    root = tmp_path / "image"
    with tarfile.open(context) as archive:
        archive.extractall(root, filter="data")
    backends = tmp_path / "backends"
    subprocess.run([sys.executable, str(root / "launch_triton.py"), "--prepare", str(backends)], check=True)
    # As `COPY backends/ /opt/tensorgate/backends/` does, on top of the prepared python/.
    for model_py in (root / "backends").rglob("model.py"):
        target = backends / model_py.relative_to(root / "backends")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(model_py.read_bytes())
    http, grpc_port, metrics = find_free_ports(3)
    entrypoint = ["--backend-directory=" + str(backends), f"--model-repository={root / 'models'}",
                  "--load-model=iris_rf", "--model-config-name=cpu", f"--http-port={http}", f"--grpc-port={grpc_port}",
                  f"--metrics-port={metrics}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
                  "--metrics-address=127.0.0.1"]
    health = {"TENSORGATE_HEALTH_URL": f"http://127.0.0.1:{http}/v2/health/ready"}
    import os

    log = open(tmp_path / "image.log", "wb")
    server = subprocess.Popen([sys.executable, str(root / "launch_triton.py"), *entrypoint], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:

        def ready() -> bool:
            if subprocess.run([sys.executable, str(root / "launch_triton.py"), "--health"],
                              env={**os.environ, **health}).returncode == 0:
                return True
            assert server.poll() is None, (tmp_path / "image.log").read_text()[-3000:]
            return False

        wait_until(ready, "the context's Triton to be ready", 120, step=0.5)
        result = _infer(f"127.0.0.1:{grpc_port}", "iris_rf", {"input": IRIS_X32})
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected["iris_rf"]["model"].predict_proba(IRIS_X),
                                   atol=1e-5, rtol=0)
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        config = client.get_model_config("iris_rf").config
        assert config.backend == "tensorgate_onnx"  # configs/cpu.pbtxt was the one loaded, not config.pbtxt
        assert list(config.version_policy.specific.versions) == [1]
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)
        log.close()


def test_two_versions_side_by_side_and_back_through_the_load_api(tmp_path):
    """Explicit model control, as a rollout drives it: the live version and a candidate loaded side by
    side with `load_config_json` (both listed in RepositoryIndex, each answering as its own model),
    then back to the live version alone."""
    from gateway.packaging import load_config_json

    live = LogisticRegression(max_iter=1000).fit(IRIS_X, IRIS_Y)
    candidate = LogisticRegression(max_iter=1000, C=0.05).fit(IRIS_X, IRIS_Y)
    repo = tmp_path / "repository"
    for number, model in ((1, live), (2, candidate)):
        joblib.dump(model, tmp_path / f"v{number}.joblib")
        assert package(PackageRequest(source=str(tmp_path / f"v{number}.joblib"), name="iris",
                                      repository=repo, max_batch_size=256)).version == number
    with LocalTriton(repo, name="pkg-versions", log_dir=tmp_path, model_control="explicit") as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_address)
        client.load_model("iris", config=load_config_json(repo / "iris", [1, 2]))
        index = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
        assert index == {("iris", "1"): "READY", ("iris", "2"): "READY"}
        tensor = grpcclient.InferInput("input", [150, 4], "FP32")
        tensor.set_data_from_numpy(IRIS_X32)
        for version, model in (("1", live), ("2", candidate)):
            probabilities = client.infer("iris", [tensor], model_version=version).as_numpy("probabilities")
            np.testing.assert_allclose(probabilities, model.predict_proba(IRIS_X), atol=1e-5, rtol=0)
        assert not np.allclose(live.predict_proba(IRIS_X), candidate.predict_proba(IRIS_X), atol=1e-3)
        client.load_model("iris", config=load_config_json(repo / "iris", [1]))  # the rollback
        with pytest.raises(InferenceServerException):
            client.infer("iris", [tensor], model_version="2")
        np.testing.assert_allclose(client.infer("iris", [tensor], model_version="1").as_numpy("probabilities"),
                                   live.predict_proba(IRIS_X), atol=1e-5, rtol=0)
