"""fixed_cost (and fixed_cost_dynbatch, whose model.py links here): 2 ms per execute call, whatever the batch; OUTPUT0 = INPUT0."""

import time

import triton_python_backend_utils as pb_utils

# Cost per execute call, not per request or row: only batching amortises it.
CALL_COST_S = 0.002


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        time.sleep(CALL_COST_S)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x.copy())]))
        return responses
