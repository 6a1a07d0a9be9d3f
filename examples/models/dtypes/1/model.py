"""dtypes: FP16, INT64 and BOOL echoed with a per-dtype change, to check wire encodings."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            f16 = pb_utils.get_input_tensor_by_name(request, "IN_FP16").as_numpy()
            i64 = pb_utils.get_input_tensor_by_name(request, "IN_INT64").as_numpy()
            flags = pb_utils.get_input_tensor_by_name(request, "IN_BOOL").as_numpy()
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("OUT_FP16", (f16 * np.float16(2)).astype(np.float16)),
                        pb_utils.Tensor("OUT_INT64", (i64 + 1).astype(np.int64)),
                        pb_utils.Tensor("OUT_BOOL", np.logical_not(flags)),
                    ]
                )
            )
        return responses
