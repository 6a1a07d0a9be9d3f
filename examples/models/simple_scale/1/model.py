"""simple_scale (and simple_scale_dynbatch, whose model.py links here): OUTPUT0 = INPUT0 * 2 (FP32 [batch, 16])."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        # One response per request; each request carries its own whole batch
        # (the dynamic batcher, when enabled, only groups requests into this list).
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            y = (x * np.float32(2)).astype(np.float32, copy=False)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", y)]))
        return responses
