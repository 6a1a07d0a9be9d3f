"""fail_on_demand: echoes INPUT0, or fails in the way MODE asks, to test error paths."""

import triton_python_backend_utils as pb_utils

OK, ERROR_RESPONSE, ERROR_INVALID_ARG, RAISE = 0, 1, 2, 3


class TritonPythonModel:
    def execute(self, requests: list) -> list:
        modes = [
            int(pb_utils.get_input_tensor_by_name(r, "MODE").as_numpy().max()) for r in requests
        ]
        if RAISE in modes:
            raise RuntimeError("fail_on_demand: MODE 3 asked execute to raise")
        responses = []
        for request, mode in zip(requests, modes, strict=True):
            if mode == ERROR_RESPONSE:
                error = pb_utils.TritonError("fail_on_demand: MODE 1 asked for an error response")
                responses.append(pb_utils.InferenceResponse(error=error))
            elif mode == ERROR_INVALID_ARG:
                error = pb_utils.TritonError(
                    "fail_on_demand: MODE 2 asked for INVALID_ARG", pb_utils.TritonError.INVALID_ARG
                )
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x.copy())]))
        return responses
