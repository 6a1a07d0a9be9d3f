"""The load generator takes no reply on trust: it checks a sample of the outputs it gets back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.bench.echo import build_infer_response, start_echo_server
from gateway.bench.loadgen import build_infer_request, reply_checker, run_load


async def _against_echo(response: bytes, model: str = "simple_scale", **kwargs):
    server, port = await start_echo_server("127.0.0.1:0", response)
    try:
        return await run_load(f"127.0.0.1:{port}", build_infer_request(model), concurrency=4, seconds=None,
                              requests=200, warmup_seconds=0, **kwargs)
    finally:
        await server.stop(0)


def test_right_replies_pass_and_a_sample_is_checked():
    result = asyncio.run(_against_echo(build_infer_response()))  # what simple_scale answers: 2 × the input
    assert result.errors == 0 and result.requests == 200
    assert 4 <= result.checked <= 4 + 200 // 64 * 4  # each worker's first reply, then every 64th


@pytest.mark.parametrize("model", ["simple_scale", "fixed_cost"])
def test_wrong_replies_are_errors(model):
    """The echo server answers simple_scale's output to everything: right for simple_scale only
    when its values are, never for fixed_cost (which answers its input unchanged)."""
    wrong = build_infer_response(rows=1, cols=16) if model == "fixed_cost" else build_infer_response(rows=2, cols=8)
    result = asyncio.run(_against_echo(wrong, model, check_every=1))
    assert result.checked > 0 and result.errors == result.checked
    assert result.error_samples and result.error_samples[0].startswith("wrong reply: OUTPUT0"), result.error_samples


def test_real_triton_replies_check_out(triton):
    result = asyncio.run(run_load(triton.grpc_address, build_infer_request("simple_scale", rows=3), concurrency=2,
                                  seconds=None, requests=50, warmup_seconds=0, check_every=1))
    assert result.errors == 0 and result.checked >= 50


def test_unknown_models_need_an_output_with_data():
    from gateway.protocol import pb

    check = reply_checker(build_infer_request("some_model"))
    assert check(build_infer_response()) is None
    assert check(pb.ModelInferResponse(model_name="some_model").SerializeToString()) == "wrong reply: no output with data"
    assert np.all(np.frombuffer(pb.ModelInferRequest.FromString(build_infer_request("m")).raw_input_contents[0],
                                np.float32) == np.arange(16))
