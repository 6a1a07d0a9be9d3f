"""The drift reference stored with a package: training rows per input tensor, as an .npz keyed by
input name — the format `drift.models.<model>.reference.file` loads (gateway/drift/stage.py), which a
rollout installs with `DriftStage.load_reference_file`. Written byte-for-byte reproducibly (sorted
members, fixed zip timestamps), so the same rows always give the same file and the same sha256.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from gateway.packaging.errors import SourceError
from gateway.packaging.signature import Signature

FILENAME = "drift-reference.npz"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def read_reference(path: Path, signature: Signature) -> dict[str, np.ndarray]:
    """Rows per input from a .npy (a model of one input) or .npz (arrays named by input), checked
    against the model's inputs: known names, at least one row, each row shaped as the input's."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SourceError(f"--reference {path}: not a .npy or .npz file ({error})") from None
    inputs = {t.name: t for t in signature.inputs}
    if isinstance(loaded, np.ndarray):
        if len(inputs) != 1:
            raise SourceError(f"--reference {path}: a .npy holds one array, but the model has inputs "
                              f"{sorted(inputs)}: use a .npz with one array per input name")
        arrays = {next(iter(inputs)): loaded}
    else:
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
        unknown = sorted(set(arrays) - set(inputs))
        if unknown:
            raise SourceError(f"--reference {path}: arrays {unknown} are not inputs of the model ({sorted(inputs)})")
    for name, array in arrays.items():
        expected = inputs[name].shape[1:]
        if array.ndim < 1 or len(array) == 0:
            raise SourceError(f"--reference {path}: '{name}' has no rows (shape {array.shape})")
        row = array.shape[1:]
        if len(row) != len(expected) or any(e not in (-1, r) for e, r in zip(expected, row)):
            raise SourceError(f"--reference {path}: rows of '{name}' are shaped {list(row)}, the input takes "
                              f"{list(expected)} per row (-1 = any)")
        if array.dtype.kind not in "biuf":
            raise SourceError(f"--reference {path}: '{name}' is {array.dtype}; drift references are numeric")
    return arrays


def reference_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz of `arrays` that np.load reads, the same bytes for the same arrays."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()
