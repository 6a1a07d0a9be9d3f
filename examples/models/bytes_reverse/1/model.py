"""bytes_reverse: REVERSED = bytes of each TEXT element reversed, LENGTH = their count (INT32)."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            # BYTES tensors arrive as numpy object arrays of `bytes`.
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            flat = text.reshape(-1)
            reversed_ = np.array([bytes(v)[::-1] for v in flat], dtype=np.object_)
            lengths = np.array([len(bytes(v)) for v in flat], dtype=np.int32)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("REVERSED", reversed_.reshape(text.shape)),
                        pb_utils.Tensor("LENGTH", lengths.reshape(text.shape)),
                    ]
                )
            )
        return responses
