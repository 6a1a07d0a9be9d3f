"""Decoupled models stream all their responses through the gateway, in order; sequences stick to the
backend that started them, so results equal those of one Triton."""

from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from tests.conftest import gateway_on


def _repeat_inputs(values):
    tensor = triton_grpc.InferInput("IN", [len(values)], "INT32")
    tensor.set_data_from_numpy(np.array(values, dtype=np.int32))
    return [tensor]


def _collect(address, send, expected, timeout=30):
    results: queue.Queue = queue.Queue()
    client = triton_grpc.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    send(client)
    collected = [results.get(timeout=timeout) for _ in range(expected)]
    client.stop_stream()
    client.close()
    return collected


@pytest.mark.parametrize("empty_final", [False, True])
def test_decoupled_responses_arrive_in_order(triton, gateway, empty_final):
    values = [11, 22, 33, 44, 55]
    expected = len(values) + (1 if empty_final else 0)

    def send(client):
        client.async_stream_infer(
            "repeat_decoupled", _repeat_inputs(values), request_id="dec", enable_empty_final_response=empty_final
        )

    direct = _collect(triton.grpc_address, send, expected)
    through = _collect(gateway.address, send, expected)
    assert all(error is None for _, error in through), through
    for (a, _), (b, _) in zip(direct, through):
        assert b.get_response().id == "dec"
        assert dict(b.get_response().parameters) == dict(a.get_response().parameters)
        if a.get_response().outputs:
            np.testing.assert_array_equal(b.as_numpy("OUT"), a.as_numpy("OUT"))
            np.testing.assert_array_equal(b.as_numpy("IDX"), a.as_numpy("IDX"))
    outs = [int(r.as_numpy("OUT")[0]) for r, _ in through if r.get_response().outputs]
    assert outs == values


def test_decoupled_model_over_unary_is_refused_like_triton(triton, gateway):
    statuses = []
    for address in (triton.grpc_address, gateway.address):
        client = triton_grpc.InferenceServerClient(address)
        with pytest.raises(triton_grpc.InferenceServerException) as error:
            client.infer("repeat_decoupled", _repeat_inputs([1]))
        statuses.append(error.value.status())
    assert statuses[1] == statuses[0] == "StatusCode.UNIMPLEMENTED"
    assert "ModelStreamInfer" in error.value.message()


def _sequence_inputs(value):
    tensor = triton_grpc.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.int32))
    return [tensor]


def _run_sequences(address, sequences: dict, *, streaming: bool):
    """Interleave several sequences; return {sequence id: [running sums]}."""
    sums = {sid: [] for sid in sequences}
    client = triton_grpc.InferenceServerClient(address)
    steps = max(len(values) for values in sequences.values())
    for step in range(steps):
        for sid, values in sequences.items():
            if step >= len(values):
                continue
            result = client.infer(
                "accumulate_sequence",
                _sequence_inputs(values[step]),
                sequence_id=sid,
                sequence_start=step == 0,
                sequence_end=step == len(values) - 1,
            )
            sums[sid].append(int(result.as_numpy("OUTPUT")[0, 0]))
    client.close()
    return sums


def test_sequences_over_two_backends_equal_one_triton(tritons, triton, front_door):
    rng = np.random.default_rng(3)
    # 24 sequences: their backends come from rendezvous hashing of the sequence id over the backends'
    # addresses (free ports, new each run), so with 8 all landed on one backend in ~1 run of 128.
    sequences = {1000 + i: [int(v) for v in rng.integers(1, 100, size=6)] for i in range(24)}
    # One pool of two backends: without stickiness, steps of a sequence would land on both.
    config = {"listen": "127.0.0.1:0", "pools": {"both": {"backends": [t.grpc_address for t in tritons]}}}
    with gateway_on(front_door, config) as gateway:
        through = _run_sequences(gateway.address, sequences, streaming=False)
        snapshot = gateway.snapshot()
        assert snapshot["sequences"] == 0  # every sequence ended
        served = [backend["served"] for backend in snapshot["backends"].values()]
    direct = _run_sequences(triton.grpc_address, sequences, streaming=False)
    assert through == direct
    assert through == {sid: list(np.cumsum(values)) for sid, values in sequences.items()}
    assert all(count > 0 for count in served), f"both backends should have served sequences: {served}"


def test_pipelined_sequence_steps_keep_their_order_over_several_upstream_streams(tmp_path):
    """With several upstream streams per backend, every step of one sequence rides the same one, so a
    client that sends a sequence's steps without waiting for each answer gets Triton's running sums
    in order, as from Triton itself. (Taken in turn, the streams split each sequence's steps four ways;
    HTTP/2 orders nothing across streams, so its steps could reach Triton out of order.)

    A Triton of its own: late in a full run the shared one, after the fuzzers and floods of the tests
    before, twice failed this test's sequences and then died ("malloc(): unaligned tcache chunk
    detected"); alone, the test passed every time (25 runs in a row, and after each of those tests)."""
    from gateway.local.triton import LocalTriton, default_model_repository
    from gateway.testing import GatewayThread

    sequences = {7000 + i: list(range(1, 13)) for i in range(6)}
    with LocalTriton(default_model_repository(), name="pipelined-sequences", log_dir=tmp_path) as triton:
        config = {"listen": "127.0.0.1:0", "pools": {"cpu": {"backends": [triton.grpc_address]}},
                  "upstream": {"streams_per_backend": 4}, "batching": {"default": {"enabled": False}}}
        with GatewayThread(config) as gateway:
            results: queue.Queue = queue.Queue()
            client = triton_grpc.InferenceServerClient(gateway.address)
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            for step in range(12):  # every sequence's next step, none waiting for an answer
                for sid, values in sequences.items():
                    client.async_stream_infer("accumulate_sequence", _sequence_inputs(values[step]), sequence_id=sid,
                                              sequence_start=step == 0, sequence_end=step == 11,
                                              request_id=f"{sid}:{step}")
            answers = []
            try:
                for _ in range(12 * len(sequences)):
                    answers.append(results.get(timeout=30))
            except queue.Empty:
                raise AssertionError(f"{len(answers)} of {12 * len(sequences)} answers came; the gateway: "
                                     f"{gateway.snapshot()['backends']}; Triton running: {triton.is_running}; "
                                     f"its log ends:\n{triton.log_tail()}") from None
            client.stop_stream()
            client.close()
            streams = gateway.snapshot()["backends"][triton.grpc_address]["streams"]
    # Each stream carried whole sequences: its count is a multiple of a sequence's 12 steps.
    assert sum(streams["shared"]) == 72 and all(count % 12 == 0 for count in streams["shared"]), streams
    assert not [error for _, error in answers if error is not None]
    sums: dict[int, dict[int, int]] = {sid: {} for sid in sequences}
    for result, _ in answers:
        sid, step = map(int, result.get_response().id.split(":"))
        sums[sid][step] = int(result.as_numpy("OUTPUT")[0, 0])
    expected = list(np.cumsum(range(1, 13)))
    assert {sid: [by_step[s] for s in range(12)] for sid, by_step in sums.items()} == {sid: expected for sid in sequences}
