"""accumulate_sequence: OUTPUT = running sum of INPUT within one sequence."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        # Running sum per sequence id. Triton rejects a sequence's first request without
        # START, so every id seen here was started.
        self.sums: dict = {}

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            value = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy()
            end = pb_utils.get_input_tensor_by_name(request, "END").as_numpy()
            # Keyed by correlation_id() (an int or a str), not by the UINT64 CORRID tensor:
            # for a string id Triton fills CORRID with the first 8 bytes of the serialized
            # string (4-byte length + 4 characters), so "session-1" and "session-2" collide.
            key = request.correlation_id()
            # Control tensors are [batch, 1]; Triton holds sequence requests to batch size 1.
            total = 0 if start.reshape(-1)[0] else self.sums.get(key, 0)
            total += int(value.sum())
            if end.reshape(-1)[0]:
                self.sums.pop(key, None)
            else:
                self.sums[key] = total
            out = np.full(value.shape, total, dtype=np.int32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT", out)]))
        return responses
