"""model.py of a packaged Python callable (Triton's Python backend): imports the function named in
callable.json from the copy of its module under src/ in this version folder, and calls it with the
request's inputs as NumPy arrays in the config's order. It may return an array, a tuple of arrays
(the config's outputs in order) or a dict by output name. Each request runs on its own; an error
fails only its request.
"""

import importlib
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        with open(os.path.join(folder, "callable.json"), encoding="utf-8") as stream:
            entry = json.load(stream)
        # The packaged copy of the module wins over anything of the same name installed here.
        sys.path.insert(0, os.path.join(folder, "src"))
        self.function = getattr(importlib.import_module(entry["module"]), entry["function"])
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                arrays = [pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs]
                result = self.function(*arrays)
                if isinstance(result, dict):
                    values = [result[name] for name, _ in self.outputs]
                else:
                    values = list(result) if isinstance(result, (tuple, list)) else [result]
                tensors = [pb_utils.Tensor(name, np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False)))
                           for (name, dtype), value in zip(self.outputs, values)]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # the function's failure is this request's error
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(error).__name__}: {error}")))
        return responses
