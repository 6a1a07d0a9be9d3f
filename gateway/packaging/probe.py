"""Signatures of models that carry none (TorchScript files, Python callables): declared with
--input/--output, or probed by running the model once on an example input."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from gateway.packaging.errors import SignatureUnknown
from gateway.packaging.signature import Signature, Tensor, tensor_of_array


def load_example(path: Path, input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The example input: a .npy for a model of one input, a .npz with one array per input name."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SignatureUnknown(f"--example {path}: not a .npy or .npz file ({error})") from None
    if isinstance(loaded, np.ndarray):
        if len(input_names) != 1:
            raise SignatureUnknown(f"--example {path}: a .npy holds one array, but the model takes "
                                   f"{len(input_names)} inputs ({', '.join(input_names)}): use a .npz keyed by input name")
        return {input_names[0]: loaded}
    with loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    missing = [name for name in input_names if name not in arrays]
    if missing:
        raise SignatureUnknown(f"--example {path} has arrays {sorted(arrays)}, missing the model's inputs {missing}")
    return {name: arrays[name] for name in input_names}


def zeros_for(tensors: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """A probe input of declared tensors: zeros, each free dimension of size 2."""
    return {t.name: np.zeros([2 if d == -1 else d for d in t.shape], dtype=t.numpy_dtype) for t in tensors}


def name_outputs(result, declared: Sequence[Tensor] = ()) -> dict[str, np.ndarray]:
    """A model's return value as named arrays: a dict by its keys; an array or a tuple of arrays as
    output__0, output__1, … (Triton's PyTorch naming), or by the declared output names in order."""
    if isinstance(result, dict):
        return {str(name): np.asarray(value) for name, value in result.items()}
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    names = [t.name for t in declared] if declared else [f"output__{i}" for i in range(len(values))]
    if len(names) != len(values):
        raise SignatureUnknown(f"the model returned {len(values)} outputs, but {len(names)} were declared with --output")
    return {name: np.asarray(value) for name, value in zip(names, values)}


def probe_signature(
    *,
    what: str,
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    input_names: Sequence[str] | None,
    declared_inputs: Sequence[Tensor],
    declared_outputs: Sequence[Tensor],
    example: Path | None,
) -> tuple[Signature, dict[str, np.ndarray] | None]:
    """The signature of `what` and the outputs it gave on the probe (None when nothing was run).

    Inputs come from --input, else from the example's arrays; outputs from --output, else from
    running the model once (on the example, or on zeros shaped like the declared inputs). The
    first dimension is taken as the batch dimension (-1)."""
    if declared_inputs:
        if input_names is not None and [t.name for t in declared_inputs] != list(input_names):
            raise SignatureUnknown(f"{what} takes inputs ({', '.join(input_names)}), in that order, "
                                   f"but --input declared ({', '.join(t.name for t in declared_inputs)})")
        inputs = tuple(declared_inputs)
    elif example is not None:
        names = list(input_names) if input_names is not None else None
        if names is None:
            raise SignatureUnknown(f"{what}: its input names are unknown; declare them with --input NAME:DTYPE:DIMS")
        arrays = load_example(example, names)
        inputs = tuple(tensor_of_array(name, arrays[name], batch_free=True) for name in names)
    else:
        names = ", ".join(input_names) if input_names else "its inputs"
        raise SignatureUnknown(
            f"{what} carries no tensor signature: supply an example input with --example FILE.npy "
            f"(or .npz keyed by {names}), or declare each input with --input NAME:DTYPE:DIMS "
            f"(e.g. --input x:FP32:-1,4; -1 = any size), and optionally --output NAME:DTYPE:DIMS")
    if declared_outputs:
        return Signature(inputs, tuple(declared_outputs)), None
    arrays = load_example(example, [t.name for t in inputs]) if example is not None else zeros_for(inputs)
    try:
        produced = run(arrays)
    except Exception as error:  # the model's own failure, reported with what it was given
        shapes = {name: (a.dtype.name, a.shape) for name, a in arrays.items()}
        raise SignatureUnknown(f"{what} failed on the probe input {shapes} ({type(error).__name__}: {error}); "
                               "supply a working --example, or declare --output NAME:DTYPE:DIMS") from None
    outputs = tuple(tensor_of_array(name, value, batch_free=True) for name, value in produced.items())
    return Signature(inputs, outputs), produced
