"""mlp: a 16 -> 32 -> 4 ReLU MLP with softmax output and fixed, seeded weights."""

import numpy as np
import triton_python_backend_utils as pb_utils


def make_weights() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The weights, drawn in this exact order so tests can rebuild them bit for bit."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 32), dtype=np.float32) * np.float32(0.25)
    b1 = rng.standard_normal(32, dtype=np.float32) * np.float32(0.1)
    w2 = rng.standard_normal((32, 4), dtype=np.float32) * np.float32(0.25)
    b2 = rng.standard_normal(4, dtype=np.float32) * np.float32(0.1)
    return w1, b1, w2, b2


def forward(
    x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray
) -> np.ndarray:
    hidden = np.maximum(x @ w1 + b1, np.float32(0))
    logits = hidden @ w2 + b2
    # Subtract the row max so exp never overflows.
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.weights = make_weights()

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            probs = forward(x, *self.weights)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("PROBS", probs)]))
        return responses
