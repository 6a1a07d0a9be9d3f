"""tensorgate's generic runner for Triton's Python backend: serves N/model.onnx with ONNX Runtime, or
N/model.pt with TorchScript, from a model folder that holds nothing else but config.pbtxt.

Installed as a Python-based backend (`<backend-directory>/tensorgate_onnx/model.py`, and the same file
as `tensorgate_torchscript/model.py`), so a config says `backend: "tensorgate_onnx"` and the version
folder carries only the weights: the folder a production Triton serves with `backend: "onnxruntime"`
is served unchanged, but for that line, where only the Python backend exists.

Tensors follow the config as Triton's framework backends do: an input or output declared with
`reshape` is reshaped between the model's shape and the config's; outputs are cast to the config's
datatype. Each request of a batch Triton hands over is run on its own; an error fails only its request.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _shape(tensor_config, rows):
    """The shape a tensor has on the model's side (with `reshape`) and on the wire, for `rows` rows."""
    dims = [int(d) for d in tensor_config.get("dims", [])]
    reshape = tensor_config.get("reshape")
    model_dims = [int(d) for d in reshape.get("shape", [])] if reshape is not None else dims
    lead = [rows] if rows is not None else []
    return lead + model_dims, lead + dims


class _Onnx:
    def __init__(self, path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # One thread per instance: Triton runs instances side by side, as its onnxruntime backend does.
        options.intra_op_num_threads = int(os.environ.get("TENSORGATE_RUNNER_THREADS", "1"))
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def __call__(self, inputs, output_names):
        values = self.session.run(output_names, inputs)
        return dict(zip(output_names, values))


class _TorchScript:
    def __init__(self, path):
        import torch

        self.torch = torch
        self.module = torch.jit.load(path, map_location="cpu").eval()

    def __call__(self, inputs, output_names):
        with self.torch.no_grad():
            result = self.module(*(self.torch.from_numpy(np.ascontiguousarray(v)) for v in inputs.values()))
        if isinstance(result, dict):
            return {name: result[name].numpy() for name in output_names}
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        return {name: value.numpy() for name, value in zip(output_names, values)}


class TritonPythonModel:
    def initialize(self, args):
        self.config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        for filename, runtime in (("model.onnx", _Onnx), ("model.pt", _TorchScript)):
            path = os.path.join(folder, self.config.get("default_model_filename") or filename)
            if os.path.basename(path) == filename and os.path.exists(path):
                self.model = runtime(path)
                break
        else:
            raise pb_utils.TritonModelException(f"{folder} holds neither model.onnx nor model.pt")
        self.batching = int(self.config.get("max_batch_size", 0)) > 0
        self.inputs = self.config["input"]
        self.outputs = self.config["output"]
        self.output_names = [o["name"] for o in self.outputs]
        self.output_dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.outputs}

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(output_tensors=self._run(request)))
            except Exception as error:  # the model's failure is this request's error, not the server's
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(error).__name__}: {error}")))
        return responses

    def _run(self, request):
        inputs = {}
        rows = None
        for tensor_config in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, tensor_config["name"])
            if tensor is None:
                continue  # an optional input the client left out
            array = tensor.as_numpy()
            if self.batching:
                rows = array.shape[0]
            model_shape, _ = _shape(tensor_config, rows if self.batching else None)
            inputs[tensor_config["name"]] = array.reshape(model_shape) if "reshape" in tensor_config else array
        produced = self.model(inputs, self.output_names)
        tensors = []
        for tensor_config in self.outputs:
            name = tensor_config["name"]
            value = np.asarray(produced[name])
            if "reshape" in tensor_config:
                _, wire_shape = _shape(tensor_config, value.shape[0] if self.batching else None)
                value = value.reshape(wire_shape)
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value.astype(self.output_dtypes[name], copy=False))))
        return tensors
