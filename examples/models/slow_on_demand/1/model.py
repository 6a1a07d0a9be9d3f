"""slow_on_demand: OUTPUT0 = INPUT0, after the delay (ms) written in $TENSORGATE_DELAY_FILE, per execute call."""

import os
import time

import triton_python_backend_utils as pb_utils


def delay_s() -> float:
    path = os.environ.get("TENSORGATE_DELAY_FILE")
    if not path:
        return 0.0
    try:
        with open(path, encoding="utf-8") as file:
            return max(float(file.read().strip() or 0.0), 0.0) / 1e3
    except (OSError, ValueError):
        return 0.0


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        delay = delay_s()
        if delay:
            time.sleep(delay)
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x.copy())]))
        return responses
