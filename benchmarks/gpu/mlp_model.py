"""An fp32 MLP, IN -> HIDDEN -> OUT with ReLU, as a Triton Python-backend model (benchmarks/gpu/).

PyTorch on the instance's device (KIND_GPU: cuda:<device_id>, KIND_CPU: the CPU), with DLPack in
and out (`pb_utils.Tensor.from_dlpack`; on numpy 2, `as_numpy` gave empty outputs on the GPU
machine, ../../shared/DESIGN.md). Without PyTorch, or with the model parameter `backend: numpy`,
the same weights run in NumPy: that is what the CPU-mode test of run.sh uses, so the suite needs no
PyTorch.

Sizes come from the config's parameters (`in`, `hidden`, `out`); weights are drawn from
np.random.default_rng(0), so both backends compute the same function.
"""

import numpy as np
import triton_python_backend_utils as pb_utils


def make_weights(size_in: int, hidden: int, size_out: int):
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((size_in, hidden), dtype=np.float32) / np.float32(np.sqrt(size_in)))
    b1 = rng.standard_normal(hidden, dtype=np.float32) * np.float32(0.01)
    w2 = (rng.standard_normal((hidden, size_out), dtype=np.float32) / np.float32(np.sqrt(hidden)))
    b2 = rng.standard_normal(size_out, dtype=np.float32) * np.float32(0.01)
    return w1, b1, w2, b2


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import json

        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        sizes = int(parameters.get("in", 1024)), int(parameters.get("hidden", 4096)), int(parameters.get("out", 1024))
        weights = make_weights(*sizes)
        self.torch = None
        if parameters.get("backend", "torch") == "torch":
            # The stub's interpreter does not read PYTHONPATH: scenario.py passes its own here, so a
            # PyTorch installed beside the launching Python (e.g. pip --target) is found too.
            import sys

            for folder in reversed([p for p in parameters.get("python_path", "").split(":") if p]):
                if folder not in sys.path:
                    sys.path.insert(0, folder)
            try:
                import torch
            except ImportError as error:
                print(f"mlp: no PyTorch here ({error}); NumPy runs the model", flush=True)
                torch = None
            if torch is not None:
                self.torch = torch
                if args.get("model_instance_kind") == "GPU":
                    self.device = torch.device(f"cuda:{args['model_instance_device_id']}")
                else:
                    self.device = torch.device("cpu")
                self.weights = [torch.from_numpy(w).to(self.device) for w in weights]
                torch.set_grad_enabled(False)
        if self.torch is None:
            self.weights = weights
        print(f"mlp {sizes}: {'torch on ' + str(self.device) if self.torch else 'numpy'}", flush=True)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, "INPUT0")
            if self.torch is not None:
                torch = self.torch
                x = torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).to(self.device, non_blocking=True)
                w1, b1, w2, b2 = self.weights
                y = torch.addmm(b2, torch.relu(torch.addmm(b1, x, w1)), w2)
                out = pb_utils.Tensor.from_dlpack("OUTPUT0", torch.utils.dlpack.to_dlpack(y.contiguous()))
            else:
                w1, b1, w2, b2 = self.weights
                x = tensor.as_numpy()
                y = np.maximum(x @ w1 + b1, np.float32(0)) @ w2 + b2
                out = pb_utils.Tensor("OUTPUT0", y.astype(np.float32))
            responses.append(pb_utils.InferenceResponse([out]))
        return responses
