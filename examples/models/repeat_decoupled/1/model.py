"""repeat_decoupled: streams one response per element of IN, then a final flag."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list) -> None:
        # Decoupled models answer through each request's response sender and return None.
        for request in requests:
            sender = request.get_response_sender()
            values = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy().reshape(-1)
            for idx, value in enumerate(values):
                if value < 0:
                    # A mid-stream error, for clients and the gateway to handle: the
                    # responses already sent stand, nothing follows but the final flag.
                    error = pb_utils.TritonError(f"negative element {int(value)} at index {idx}")
                    sender.send(pb_utils.InferenceResponse(error=error))
                    break
                sender.send(
                    pb_utils.InferenceResponse(
                        [
                            pb_utils.Tensor("OUT", np.array([value], dtype=np.int32)),
                            pb_utils.Tensor("IDX", np.array([idx], dtype=np.int32)),
                        ]
                    )
                )
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
