"""versioned_scale (every version's model.py links here): OUTPUT0 = INPUT0 * version; version 3 fails."""

import triton_python_backend_utils as pb_utils

BROKEN_VERSION = 3


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.version = int(args["model_version"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            if self.version == BROKEN_VERSION:
                error = pb_utils.TritonError(f"versioned_scale: version {self.version} is broken on purpose")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", x * self.version)]))
        return responses
