"""`tensorgate package` without a server: real frameworks in, immutable versions out — digests, version
numbers, refusals, verification of tampered folders, the drift reference, the build context."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
joblib = pytest.importorskip("joblib")
from sklearn.datasets import load_iris  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

from gateway.audit import AuditLog, verify_chain  # noqa: E402
from gateway.cli import main as cli_main  # noqa: E402
from gateway.packaging import (  # noqa: E402
    PackageConflict,
    PackageRequest,
    SignatureUnknown,
    TamperedPackage,
    package,
    read_manifest,
    verify_model,
    verify_version,
)
from gateway.packaging.dockerfile import CPU_BASE_IMAGE, TRITON_IMAGE, context_files, context_tar, write_build_context  # noqa: E402
from gateway.packaging.reference import FILENAME as REFERENCE_FILE  # noqa: E402

try:
    import torch
except ImportError as error:
    torch = None
    TORCH_MISSING = f"torch cannot be imported here ({error}); it comes with tensorgate[package]"

X, Y = load_iris(return_X_y=True)


@pytest.fixture
def lr_file(tmp_path) -> Path:
    model = LogisticRegression(max_iter=1000).fit(X, Y)
    path = tmp_path / "lr.joblib"
    joblib.dump(model, path)
    return path


def _request(source, repo, **options) -> PackageRequest:
    return PackageRequest(source=str(source), name=options.pop("name", "iris"), repository=repo, **options)


# ------------------------------------------------------------------------------ immutability


def test_the_same_artifact_twice_is_the_same_version(tmp_path, lr_file):
    repo = tmp_path / "repo"
    first = package(_request(lr_file, repo))
    # Dumped again from a fresh load: another file, the same model.
    joblib.dump(joblib.load(lr_file), tmp_path / "again.pkl")
    second = package(_request(tmp_path / "again.pkl", repo))
    assert (first.version, first.created) == (1, True)
    assert (second.version, second.digest, second.created) == (1, first.digest, False)
    assert sorted(p.name for p in (repo / "iris").iterdir() if not p.name.startswith(".")) == ["1", "config.pbtxt"]
    # Only the packaging that wrote something is audited.
    assert [r["action"] for r in AuditLog(repo / "tensorgate-audit.jsonl").records()] == ["package"]


def test_one_changed_weight_is_a_new_version(tmp_path, lr_file):
    repo = tmp_path / "repo"
    first = package(_request(lr_file, repo))
    model = joblib.load(lr_file)
    model.coef_[0, 0] += 1e-3
    joblib.dump(model, tmp_path / "changed.joblib")
    second = package(_request(tmp_path / "changed.joblib", repo))
    assert (second.version, second.created) == (2, True)
    assert second.digest != first.digest
    assert verify_version(repo / "iris", 1)["digest"] == first.digest  # version 1 untouched
    manifests = verify_model(repo / "iris")
    assert {v: m["digest"] for v, m in manifests.items()} == {1: first.digest, 2: second.digest}
    config = (repo / "iris" / "config.pbtxt").read_text()
    assert first.digest in config and second.digest in config
    records = list(AuditLog(repo / "tensorgate-audit.jsonl").records())
    assert [(r["version"], r["digest"]) for r in records] == [(1, first.digest), (2, second.digest)]
    verify_chain(repo / "tensorgate-audit.jsonl")


def test_overwriting_a_version_is_refused_with_exit_2(tmp_path, lr_file, capsys):
    repo = tmp_path / "repo"
    package(_request(lr_file, repo))
    model = joblib.load(lr_file)
    model.intercept_[0] += 0.5
    joblib.dump(model, tmp_path / "other.joblib")
    before = {p: p.read_bytes() for p in (repo / "iris").rglob("*") if p.is_file()}
    code = cli_main(["package", str(tmp_path / "other.joblib"), "--name", "iris", "--repo", str(repo), "--version", "1"])
    assert code == 2
    assert str(repo / "iris" / "1") in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (repo / "iris").rglob("*") if p.is_file()} == before


def test_a_version_that_does_not_fit_the_shared_config_is_refused(tmp_path, lr_file):
    repo = tmp_path / "repo"
    package(_request(lr_file, repo))
    narrow = LogisticRegression(max_iter=1000).fit(X[:, :3], Y)
    joblib.dump(narrow, tmp_path / "narrow.joblib")
    with pytest.raises(PackageConflict) as caught:
        package(_request(tmp_path / "narrow.joblib", repo))
    assert str(repo / "iris" / "config.pbtxt") in caught.value.message and "dims" in caught.value.message
    with pytest.raises(PackageConflict, match="batching"):
        package(_request(lr_file, repo, max_batch_size=8))
    assert [p.name for p in (repo / "iris").iterdir() if p.name.isdigit()] == ["1"]


# ------------------------------------------------------------------------------ verification


def _tamper(folder: Path, how: str) -> None:
    if how == "weights":
        path = folder / "1" / "model.onnx"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "extra_file":
        (folder / "1" / "model.onnx.bak").write_bytes(b"x")
    elif how == "missing_file":
        (folder / "1" / REFERENCE_FILE).unlink()
    elif how == "reference":
        np.save(folder / "1" / "replacement.npy", np.zeros((3, 4)))
        (folder / "1" / "replacement.npy").replace(folder / "1" / REFERENCE_FILE)
    elif how == "manifest_digest":
        path = folder / "1" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["signature"]["inputs"][0]["shape"] = [-1, 5]
        path.write_text(json.dumps(manifest))
    elif how == "config_dims":
        path = folder / "config.pbtxt"
        path.write_text(path.read_text().replace("dims: 4", "dims: 5"))
    elif how == "config_digest":
        path = folder / "config.pbtxt"
        text = path.read_text()
        digest = read_manifest(folder, 1)["digest"]
        path.write_text(text.replace(digest, "sha256:" + "0" * 64))
    elif how == "config_backend":
        path = folder / "config.pbtxt"
        path.write_text(path.read_text().replace('backend: "tensorgate_onnx"', 'backend: "python"'))


@pytest.mark.parametrize("how", ["weights", "extra_file", "missing_file", "reference", "manifest_digest",
                                 "config_dims", "config_digest", "config_backend"])
def test_a_tampered_version_is_refused(tmp_path, lr_file, how, capsys):
    repo = tmp_path / "repo"
    np.save(tmp_path / "train.npy", X.astype(np.float32))
    package(_request(lr_file, repo, reference=tmp_path / "train.npy", backend="python"))
    verify_version(repo / "iris", 1)
    _tamper(repo / "iris", how)
    with pytest.raises(TamperedPackage) as caught:
        verify_version(repo / "iris", 1)
    assert caught.value.path
    assert cli_main(["package-verify", "--repo", str(repo), "--name", "iris"]) == 1
    assert "REFUSED" in capsys.readouterr().err
    # A build context is made only from a version that verifies.
    with pytest.raises(TamperedPackage):
        context_files(repo / "iris", 1)


# ------------------------------------------------------------------------------ signatures and sources


def test_onnx_signature_is_read_from_the_graph(tmp_path, lr_file):
    result = package(_request(lr_file, tmp_path / "repo"))
    assert result.packaged.manifest["signature"] == {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]}


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_gradient_boosting_models_convert_through_onnxmltools(tmp_path, library):
    import onnxruntime

    if library == "xgboost":
        xgboost = pytest.importorskip("xgboost")
        model = xgboost.XGBClassifier(n_estimators=8, max_depth=3).fit(X, Y)
    else:
        lightgbm = pytest.importorskip("lightgbm")
        model = lightgbm.LGBMClassifier(n_estimators=8, verbose=-1).fit(X, Y)
    joblib.dump(model, tmp_path / "model.joblib")
    result = package(_request(tmp_path / "model.joblib", tmp_path / "repo", name=library))
    assert result.packaged.manifest["source"]["kind"] == library
    # Every output's first dimension is the batch (LightGBM's converter writes a fixed 1 for its label).
    assert all(t["shape"][0] == -1 for t in result.packaged.manifest["signature"]["outputs"])
    session = onnxruntime.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    labels, probabilities = session.run(["label", "probabilities"], {"input": X.astype(np.float32)})
    np.testing.assert_allclose(probabilities, model.predict_proba(X), atol=1e-5)
    assert np.array_equal(labels, model.predict(X))
    again = package(_request(tmp_path / "model.joblib", tmp_path / "repo", name=library))
    assert (again.version, again.created) == (1, False)


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_native_gradient_boosting_files_need_kind_and_convert(tmp_path, library, capsys):
    """XGBoost .json and LightGBM .txt model files, in the library's own format, with --kind."""
    import onnxruntime

    if library == "xgboost":
        xgboost = pytest.importorskip("xgboost")
        model = xgboost.XGBClassifier(n_estimators=6, max_depth=3).fit(X, Y)
        path = tmp_path / "model.json"
        model.save_model(path)
    else:
        lightgbm = pytest.importorskip("lightgbm")
        model = lightgbm.LGBMClassifier(n_estimators=6, verbose=-1).fit(X, Y)
        path = tmp_path / "model.txt"
        model.booster_.save_model(str(path))
    repo = tmp_path / "repo"
    assert cli_main(["package", str(path), "--name", library, "--repo", str(repo)]) == 2
    assert "--kind" in capsys.readouterr().err
    assert cli_main(["package", str(path), "--name", library, "--repo", str(repo), "--kind", library]) == 0
    session = onnxruntime.InferenceSession(str(repo / library / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"input": X.astype(np.float32)})
    np.testing.assert_allclose(probabilities, model.predict_proba(X), atol=1e-5)


@pytest.mark.skipif(torch is None, reason=TORCH_MISSING if torch is None else "")
def test_torchscript_without_signature_names_what_to_supply(tmp_path, capsys):
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval())
    module.save(str(tmp_path / "m.pt"))
    code = cli_main(["package", str(tmp_path / "m.pt"), "--name", "m", "--repo", str(tmp_path / "repo")])
    error = capsys.readouterr().err
    assert code == 2
    assert "--example" in error and "--input NAME:DTYPE:DIMS" in error
    assert not (tmp_path / "repo" / "m").exists() or not any(p.name.isdigit() for p in (tmp_path / "repo" / "m").iterdir())
    # Declared inputs are enough: the outputs are probed by running the module.
    assert cli_main(["package", str(tmp_path / "m.pt"), "--name", "m", "--repo", str(tmp_path / "repo"),
                     "--input", "input:FP32:-1,4", "--backend", "pytorch"]) == 0
    manifest = read_manifest(tmp_path / "repo" / "m", 1)
    assert manifest["signature"]["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 2]}]
    assert manifest["backend"] == "pytorch"


def test_a_callable_without_signature_names_what_to_supply(tmp_path, monkeypatch):
    (tmp_path / "tg_doubler.py").write_text("def double(values):\n    return values * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SignatureUnknown, match=r"--example FILE.npy \(or .npz keyed by values\)"):
        package(_request("tg_doubler:double", tmp_path / "repo", name="doubler"))
    result = package(_request("tg_doubler:double", tmp_path / "repo", name="doubler",
                              inputs=(parse("values:FP64:-1,3"),)))
    assert result.packaged.manifest["signature"]["outputs"] == [{"name": "output__0", "datatype": "FP64", "shape": [-1, 3]}]
    assert sorted(result.packaged.manifest["files"]) == ["callable.json", "model.py", "src/tg_doubler.py"]


def test_installed_modules_and_bad_versions_are_refused(tmp_path, lr_file, capsys):
    assert cli_main(["package", "json:dumps", "--name", "j", "--repo", str(tmp_path / "repo"),
                     "--input", "obj:FP32:-1", "--output", "s:BYTES:-1"]) == 2
    assert "is installed" in capsys.readouterr().err
    assert cli_main(["package", str(lr_file), "--name", "iris", "--repo", str(tmp_path / "repo"), "--version", "0"]) == 2
    assert "numbered from 1" in capsys.readouterr().err


def parse(text):
    from gateway.packaging import parse_tensor_option

    return parse_tensor_option(text, "--input")


# ------------------------------------------------------------------------------ drift reference


def test_the_drift_reference_is_stored_in_the_format_the_drift_stage_loads(tmp_path, lr_file):
    from gateway.drift.config import DriftConfig, ModelDriftConfig, ReferenceConfig
    from gateway.drift.stage import DriftStage

    train = X.astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    result = package(_request(lr_file, tmp_path / "repo", reference=tmp_path / "train.npy"))
    assert result.packaged.manifest["reference"]["tensors"] == {"input": [150, 4]}
    with np.load(result.packaged.reference_path) as stored:
        assert np.array_equal(stored["input"], train)
    # As `drift.models.iris.reference.file` names it in a gateway config …
    stage = DriftStage(DriftConfig(models={"iris": ModelDriftConfig(
        reference=ReferenceConfig(file=str(result.packaged.reference_path)))}))
    monitor = stage.monitors["iris"].tensors[("input", "input")]
    assert monitor.reference is not None and monitor.reference.sum() == 150 * 4
    # … and as a rollout installs it into a running stage.
    other = DriftStage(DriftConfig(models={"iris": ModelDriftConfig()}))
    other.load_reference_file("iris", result.packaged.reference_path)
    assert np.array_equal(other.monitors["iris"].tensors[("input", "input")].reference, monitor.reference)


def test_a_reference_that_does_not_fit_the_model_is_refused(tmp_path, lr_file, capsys):
    np.save(tmp_path / "wrong.npy", np.zeros((10, 5), np.float32))
    assert cli_main(["package", str(lr_file), "--name", "iris", "--repo", str(tmp_path / "repo"),
                     "--reference", str(tmp_path / "wrong.npy")]) == 2
    assert "shaped [5]" in capsys.readouterr().err


# ------------------------------------------------------------------------------ build context


def test_the_build_context_is_reproducible_byte_for_byte(tmp_path, lr_file, monkeypatch):
    repo = tmp_path / "repo"
    package(_request(lr_file, repo, backend="onnxruntime"))
    first = write_build_context(repo / "iris", 1, tmp_path / "a.tar")
    time.sleep(1.1)  # a later second, other mtimes on disk
    (repo / "iris" / "1" / "model.onnx").touch()
    monkeypatch.chdir(tmp_path)
    second = write_build_context(repo / "iris", 1, tmp_path / "b.tar")
    assert first == second == (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    # Packaging another version later does not change this version's context.
    model = joblib.load(lr_file)
    model.coef_[1, 1] -= 0.25
    joblib.dump(model, tmp_path / "v2.joblib")
    assert package(_request(tmp_path / "v2.joblib", repo, backend="onnxruntime")).version == 2
    assert context_tar(context_files(repo / "iris", 1)) == first
    # Never overwritten with other bytes.
    with pytest.raises(PackageConflict, match="b.tar"):
        write_build_context(repo / "iris", 2, tmp_path / "b.tar")


def test_the_build_context_holds_pinned_non_root_probed_explicit_images(tmp_path, lr_file):
    repo = tmp_path / "repo"
    result = package(_request(lr_file, repo, backend="onnxruntime"))
    data = write_build_context(repo / "iris", 1, tmp_path / "context.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        files = {m.name: archive.extractfile(m).read() for m in members if m.isfile()}
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert [m.name for m in members] == sorted(m.name for m in members)
    production, cpu = files["Dockerfile"].decode(), files["Dockerfile.cpu"].decode()
    assert f"FROM {TRITON_IMAGE}\n" in production and f"FROM {CPU_BASE_IMAGE}\n" in cpu
    for dockerfile in (production, cpu):
        assert "\nUSER 10001:10001\n" in dockerfile
        assert "\nHEALTHCHECK " in dockerfile and "/v2/health/ready" in dockerfile + files["launch_triton.py"].decode()
        assert "--load-model=iris" in dockerfile
        # Every COPY source is in the context.
        for line in dockerfile.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    if not source.startswith("--"):
                        assert any(name == source or name.startswith(source) for name in files), source
    assert "--model-control-mode=explicit" in production
    assert "--model-control-mode=explicit" in files["launch_triton.py"].decode()
    requirements = files["requirements-cpu.txt"].decode().splitlines()
    assert all("==" in line for line in requirements if line and not line.startswith(("#", "--")))
    assert any(line.startswith("nvidia-pytriton==") for line in requirements)
    # The model files are the packaged ones, byte for byte; the configs pin this version.
    assert files["models/iris/1/model.onnx"] == (result.path / "model.onnx").read_bytes()
    assert hashlib.sha256(files["models/iris/1/manifest.json"]).hexdigest() == \
        hashlib.sha256((result.path / "manifest.json").read_bytes()).hexdigest()
    config, cpu_config = files["models/iris/config.pbtxt"].decode(), files["models/iris/configs/cpu.pbtxt"].decode()
    assert 'backend: "onnxruntime"' in config and 'backend: "tensorgate_onnx"' in cpu_config
    for text in (config, cpu_config):
        assert result.digest in text and "specific" in text and "versions: 1" in text


# ------------------------------------------------------------------------------ the README's commands


def test_readme_packaging_commands_run_as_written(tmp_path):
    """The README's packaging block, command by command (the console script, a fresh folder), and its
    last line, `local-triton` on the packaged repository, answering for the packaged model."""
    import re
    import shlex
    import signal
    import subprocess
    import sys

    import tritonclient.grpc as triton_grpc

    from gateway.local.triton import find_free_port

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme[readme.index("## Packaging a model"):]
    block = block[block.index("```sh\n") + 6:block.index("```\n", block.index("```sh\n") + 6)]
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands[-1].startswith(".venv/bin/tensorgate local-triton")
    bindir = Path(sys.executable).parent

    def argv(command: str) -> list[str]:
        words = shlex.split(command)
        words[0] = str(bindir / Path(words[0]).name)
        return [str(root / w) if w.startswith("examples/") else w for w in words]

    for command in commands[:-1]:
        result = subprocess.run(argv(command), cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "build" / "iris-1.context.tar").is_file()
    port = find_free_port()
    words = argv(re.sub(r"--grpc-port \d+", f"--grpc-port {port}", commands[-1])) + ["--log-dir", str(tmp_path)]
    process = subprocess.Popen(words, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert f"on 127.0.0.1:{port} (gRPC)" in line, line
        client = triton_grpc.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = triton_grpc.InferInput("input", [50, 4], "FP32")  # at most max_batch_size (64) rows
        tensor.set_data_from_numpy(X[::3].astype(np.float32))
        model = joblib.load(tmp_path / "build" / "iris" / "model.joblib")
        result = client.infer("iris", [tensor])
        np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_proba(X[::3]), atol=1e-5, rtol=0)
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
