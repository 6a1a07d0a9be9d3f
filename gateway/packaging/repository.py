"""Immutable model versions in a Triton model repository: write one, find one by digest, verify one.

    REPO/NAME/config.pbtxt          shared by every version (Triton reads one per model folder); gains a
                                    tensorgate.digest.N parameter per version, nothing else ever changes
    REPO/NAME/N/model.onnx          the weights (model.pt, or model.py + callable.json + src/ for a callable)
    REPO/NAME/N/drift-reference.npz the drift reference, when packaged with one
    REPO/NAME/N/manifest.json       what version N is: digest, signature, every file's sha256, backend,
                                    batching, source

The content digest is sha256 over the canonical JSON of the signature and the model files' sha256s:
the same artifact always gives the same digest, and packaging it again finds the version that holds
it. A version folder is written under a temporary name and renamed into place, under an exclusive
lock on the model folder, so a reader never sees half a version and two packagers never pick the same
number. Nothing that exists is overwritten: a conflict raises PackageConflict naming the path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import gateway.packaging.model_config as model_config
from gateway.packaging.artifact import Artifact
from gateway.packaging.errors import PackageConflict, TamperedPackage
from gateway.packaging.model_config import BatchingOptions
from gateway.packaging.reference import FILENAME as REFERENCE_FILE
from gateway.packaging.signature import Signature

MANIFEST = "manifest.json"
CONFIG = "config.pbtxt"
MANIFEST_FORMAT = "tensorgate.package/1"
_LOCK = ".tensorgate.lock"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def content_digest(file_hashes: dict[str, str], signature: Signature) -> str:
    """sha256 over the signature and the model files' sha256s (canonical JSON)."""
    return "sha256:" + _sha256(_canonical({"files": dict(sorted(file_hashes.items())), "signature": signature.as_dict()}))


@dataclass(frozen=True)
class PackagedVersion:
    """One version in a repository; `created` is False when it already held the same content."""

    model_dir: Path
    name: str
    version: int
    digest: str
    manifest: dict
    created: bool

    @property
    def path(self) -> Path:
        return self.model_dir / str(self.version)

    @property
    def reference_path(self) -> Path | None:
        """The drift reference (.npz keyed by input name) packaged with this version, if any."""
        return self.path / REFERENCE_FILE if self.manifest.get("reference") else None


def versions(model_dir: Path) -> list[int]:
    """The numbered version folders of a model folder, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit() and p.name == str(int(p.name)))


def read_manifest(model_dir: Path, version: int) -> dict:
    path = Path(model_dir) / str(version) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TamperedPackage(f"{path} is missing: {model_dir / str(version)} is not a tensorgate package "
                              "(or its manifest was removed)", str(path)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TamperedPackage(f"{path} is not JSON ({error})", str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise TamperedPackage(f"{path} is not a {MANIFEST_FORMAT} manifest", str(path))
    return manifest


@contextlib.contextmanager
def _locked(model_dir: Path) -> Iterator[None]:
    model_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(model_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as stream:  # x: never over an existing file
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _replace_config(model_dir: Path, text: str) -> None:
    """config.pbtxt replaced as a whole (temporary file, fsync, rename): readers see old or new."""
    temporary = model_dir / f".{CONFIG}.{uuid.uuid4().hex}"
    _write_file(temporary, text.encode())
    os.replace(temporary, model_dir / CONFIG)


def write_version(
    repository: Path,
    name: str,
    artifact: Artifact,
    *,
    backend: str,
    batching: BatchingOptions,
    reference: bytes | None = None,
    reference_shapes: dict | None = None,
    version: int | None = None,
) -> PackagedVersion:
    """Package `artifact` as the next version of REPO/NAME (or as `version`), or find the version that
    already holds the same content. Raises PackageConflict when that would overwrite anything."""
    model_dir = Path(repository) / name
    file_hashes = {path: _sha256(data) for path, data in artifact.files.items()}
    digest = content_digest(file_hashes, artifact.signature)
    reference_info = None if reference is None else {"file": REFERENCE_FILE, "sha256": _sha256(reference),
                                                     "tensors": reference_shapes or {}}
    with _locked(model_dir):
        existing = versions(model_dir)
        manifests = {v: read_manifest(model_dir, v) for v in existing}
        config_path = model_dir / CONFIG
        current = model_config.parse(config_path.read_text(), str(config_path)) if config_path.exists() else None
        for number, manifest in manifests.items():
            if manifest["digest"] == digest:
                _check_same_package(model_dir / str(number), manifest, backend, batching, reference_info, version)
                if current is not None and model_config.digests_of(current).get(number) != digest:
                    # A packager stopped between the version's rename and the config's update: finish it.
                    digests = {**model_config.digests_of(current), number: digest}
                    _replace_config(model_dir, model_config.render(model_config.build_config(
                        name, artifact.signature, backend, batching, digests)))
                return PackagedVersion(model_dir, name, number, digest, manifest, created=False)
        number = version if version is not None else (existing[-1] + 1 if existing else 1)
        target = model_dir / str(number)
        if target.exists():
            raise PackageConflict(f"{target} already exists and holds other content "
                                  f"({manifests.get(number, {}).get('digest', 'no manifest')}, not {digest}); "
                                  "nothing is overwritten: leave out --version to take the next number", str(target))
        digests = {**(model_config.digests_of(current) if current is not None else {}), number: digest}
        config = model_config.build_config(name, artifact.signature, backend, batching, digests)
        if current is not None and model_config.shared_part(current) != model_config.shared_part(config):
            raise PackageConflict(
                f"{config_path} is shared by versions {existing} and does not fit this version: Triton keeps one "
                f"config per model folder, so every version must have the same signature, backend and batching. "
                f"Package it under another --name, or with the options of the existing versions. Differences:\n"
                f"{model_config.explain_difference(current, config)}", str(config_path))
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "version": number,
            "digest": digest,
            "model_format": artifact.format,
            "backend": backend,
            "batching": batching.as_dict(),
            "signature": artifact.signature.as_dict(),
            "files": dict(sorted(file_hashes.items())),
            "reference": reference_info,
            "source": artifact.source,
        }
        staging = model_dir / f".staging-{number}-{uuid.uuid4().hex}"
        try:
            for path, data in artifact.files.items():
                _write_file(staging / path, data)
            if reference is not None:
                _write_file(staging / REFERENCE_FILE, reference)
            _write_file(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
            os.rename(staging, target)  # target does not exist (checked under the lock)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _replace_config(model_dir, model_config.render(config))
        return PackagedVersion(model_dir, name, number, digest, manifest, created=True)


def _check_same_package(path: Path, manifest: dict, backend: str, batching: BatchingOptions,
                        reference_info: dict | None, version: int | None) -> None:
    """The same model content is packaged again: fine, unless what comes with it differs."""
    if version is not None and version != manifest["version"]:
        raise PackageConflict(f"{path} already holds this content ({manifest['digest']}); it is not packaged "
                              f"again as version {version}", str(path))
    if manifest["backend"] != backend or manifest["batching"] != batching.as_dict():
        raise PackageConflict(f"{path} already holds this content with backend {manifest['backend']} and "
                              f"batching {manifest['batching']}; nothing is overwritten", str(path))
    if reference_info is not None and (manifest.get("reference") or {}).get("sha256") != reference_info["sha256"]:
        raise PackageConflict(f"{path} already holds this content with "
                              f"{'another drift reference' if manifest.get('reference') else 'no drift reference'}; "
                              "nothing is overwritten: package the reference with a new model version", str(path))


def verify_version(model_dir: Path, version: int) -> dict:
    """Check version `version` of a model folder against its manifest and the shared config; returns
    the manifest. Raises TamperedPackage naming the first file that does not match."""
    model_dir = Path(model_dir)
    folder = model_dir / str(version)
    if not folder.is_dir():
        raise TamperedPackage(f"{folder} does not exist", str(folder))
    manifest = read_manifest(model_dir, version)
    if manifest.get("version") != version or manifest.get("name") != model_dir.name:
        raise TamperedPackage(f"{folder / MANIFEST} describes {manifest.get('name')} version {manifest.get('version')}, "
                              f"not {model_dir.name} version {version}", str(folder / MANIFEST))
    expected = dict(manifest["files"])
    reference = manifest.get("reference")
    if reference:
        expected[reference["file"]] = reference["sha256"]
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    present.discard(MANIFEST)
    # The Python backend compiles a callable's module into __pycache__ next to it: not content.
    present = {p for p in present if "__pycache__/" not in p}
    for extra in sorted(present - set(expected)):
        raise TamperedPackage(f"{folder / extra} is not in the manifest: the version folder was changed", str(folder / extra))
    for missing in sorted(set(expected) - present):
        raise TamperedPackage(f"{folder / missing} is missing: the version folder was changed", str(folder / missing))
    for relative, sha in sorted(expected.items()):
        path = folder / relative
        if path.is_symlink():
            raise TamperedPackage(f"{path} is a symbolic link; packaged files are regular files", str(path))
        if _sha256(path.read_bytes()) != sha:
            raise TamperedPackage(f"{path} does not match its sha256 in {folder / MANIFEST}: it was modified", str(path))
    signature = Signature.from_dict(manifest["signature"])
    if content_digest(manifest["files"], signature) != manifest["digest"]:
        raise TamperedPackage(f"{folder / MANIFEST}: its digest does not match its files and signature: the manifest "
                              "was edited", str(folder / MANIFEST))
    config_path = model_dir / CONFIG
    if not config_path.exists():
        raise TamperedPackage(f"{config_path} is missing", str(config_path))
    config = model_config.parse(config_path.read_text(), str(config_path))
    wanted = model_config.build_config(model_dir.name, signature, manifest["backend"],
                                       BatchingOptions.from_dict(manifest["batching"]), {})
    if model_config.shared_part(config) != wanted:
        raise TamperedPackage(f"{config_path} differs from what version {version}'s manifest says:\n"
                              f"{model_config.explain_difference(wanted, config)}", str(config_path))
    if model_config.digests_of(config).get(version) != manifest["digest"]:
        raise TamperedPackage(f"{config_path}: parameter {model_config.DIGEST_PARAMETER}{version} is "
                              f"{model_config.digests_of(config).get(version)!r}, the manifest says {manifest['digest']}",
                              str(config_path))
    return manifest


def load_config_json(model_dir: Path, serve_versions: list[int]) -> str:
    """The model's config as the JSON Triton's load API takes (`load_model(name, config=…)`), serving
    exactly `serve_versions` side by side (version_policy specific): how a rollout loads a candidate
    beside the live version, and rolls back by loading the old list. Each version is verified first."""
    from google.protobuf import json_format

    model_dir = Path(model_dir)
    for version in serve_versions:
        verify_version(model_dir, version)
    config = model_config.parse((model_dir / CONFIG).read_text(), str(model_dir / CONFIG))
    config.version_policy.specific.versions[:] = sorted(serve_versions)
    return json_format.MessageToJson(config, preserving_proto_field_name=True, indent=None)


def verify_model(model_dir: Path) -> dict[int, dict]:
    """Every version of a model folder verified; {version: manifest}."""
    found = versions(Path(model_dir))
    if not found:
        raise TamperedPackage(f"{model_dir} holds no version folder", str(model_dir))
    return {version: verify_version(Path(model_dir), version) for version in found}
