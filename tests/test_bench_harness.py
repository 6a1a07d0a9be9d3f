"""`tensorgate bench` against real Tritons: its files, its count against Triton's own, --compare, open loop."""

from __future__ import annotations

import asyncio
import csv
import json
import time

import grpc
import numpy as np
import pytest

from gateway.bench.echo import start_echo_server
from gateway.bench.harness import is_stable
from gateway.bench.inputs import InputError, ModelInputs, InputSpec, bytes_raw, file_payloads, random_payloads
from gateway.bench.load import Step, _Load
from gateway.bench.loadgen import build_infer_request
from gateway.cli import main
from gateway.protocol import pb

QUICK = ["--measurement-interval", "0.5", "--max-trials", "3", "--warmup", "0.2", "--quiet"]


def successes(target: str, model: str) -> int:
    """Requests Triton answered successfully for `model` (its ModelStatistics)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        reply = pb.ModelStatisticsResponse.FromString(call(pb.ModelStatisticsRequest(name=model).SerializeToString(),
                                                           timeout=10))
    return sum(stats.inference_stats.success.count for stats in reply.model_stats)


def test_a_short_sweep_writes_csv_json_and_png_and_counts_what_triton_counts(triton, tmp_path, capsys):
    before = successes(triton.grpc_address, "simple_scale")
    paths = {kind: tmp_path / f"sweep.{kind}" for kind in ("csv", "json", "png")}
    code = main(["bench", triton.grpc_address, "--model", "simple_scale", "--concurrency", "1,4", *QUICK,
                 "--csv", str(paths["csv"]), "--json", str(paths["json"]), "--plot", str(paths["png"])])
    after = successes(triton.grpc_address, "simple_scale")
    assert code == 0
    table = capsys.readouterr().out
    assert "c=1" in table and "c=4" in table and "p99 ms" in table

    document = json.loads(paths["json"].read_text())  # strict JSON: NaN would not parse back as a number
    steps = document["steps"]
    assert [(s["mode"], s["level"]) for s in steps] == [("concurrency", 1), ("concurrency", 4)]
    for step in steps:
        assert step["requests"] > 0 and step["errors"] == {} and step["throughput"] > 0
        assert step["p50_ms"] <= step["p90_ms"] <= step["p95_ms"] <= step["p99_ms"]
        assert step["client_cpu_us_per_request"] > 0 and 1 <= step["windows"] <= 3
        assert step["answered_total"] >= step["requests"]
    # Every request the harness saw answered is one Triton counted, and the other way round.
    assert sum(step["answered_total"] for step in steps) == after - before

    with paths["csv"].open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 and {"throughput", "p50_ms", "p99_ms", "errors", "client_cpu_us_per_request"} <= set(rows[0])
    assert [float(row["throughput"]) for row in rows] == pytest.approx([s["throughput"] for s in steps])

    png = paths["png"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_compare_interleaves_the_targets_and_prints_ratios(tritons, tmp_path, capsys):
    first, second = tritons[0].grpc_address, tritons[1].grpc_address
    code = main(["bench", first, "--model", "simple_scale", "--compare", second, "--concurrency", "1,2", *QUICK,
                 "--json", str(tmp_path / "compare.json")])
    assert code == 0
    out = capsys.readouterr().out
    assert f"ratios: each target / {first}" in out
    ratio_rows = [line for line in out.splitlines() if line.startswith(("c=1 ", "c=2 ")) and second in line]
    assert len(ratio_rows) == 2 and all(line.count(" x") == 3 for line in ratio_rows), out
    steps = json.loads((tmp_path / "compare.json").read_text())["steps"]
    assert [(s["target"], s["level"]) for s in steps] == [(first, 1), (second, 1), (first, 2), (second, 2)]


def test_streaming_and_several_load_processes(triton, capsys):
    before = successes(triton.grpc_address, "simple_scale")
    code = main(["bench", triton.grpc_address, "--model", "simple_scale", "--stream", "--workers", "2",
                 "--concurrency", "4", "--check-every", "1", *QUICK, "--json", "/dev/null"])
    assert code == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "c=4" in line)
    assert "| 0      |" in row, out  # no errors: every reply was checked against simple_scale's answer
    assert successes(triton.grpc_address, "simple_scale") > before


def test_open_loop_keeps_its_rate(triton, tmp_path):
    """600 requests/s for three 2 s windows: ~3,600 Poisson arrivals, whose count varies by ~1.7 %
    by itself; what the harness sent in the windows stays within 5 % of the rate asked for."""
    path = tmp_path / "rate.json"
    assert main(["bench", triton.grpc_address, "--model", "simple_scale", "--rate", "600",
                 "--measurement-interval", "2", "--max-trials", "3", "--warmup", "0.3", "--quiet",
                 "--json", str(path)]) == 0
    step = json.loads(path.read_text())["steps"][0]
    assert step["mode"] == "rate" and step["level"] == 600 and step["errors"] == {}
    assert step["sent_per_s"] == pytest.approx(600, rel=0.05)


def test_open_loop_keeps_sending_while_the_target_queues(triton, tmp_path):
    """fixed_cost takes 2 ms per call, one call at a time: offered twice what it serves, requests
    queue at Triton. An open-loop harness keeps sending on schedule, so its latencies grow with the
    queue; a closed loop at the same target only ever sees the service time."""
    closed = tmp_path / "closed.json"
    # Concurrency 1: the service time. Concurrency 4: Triton always has the next request waiting,
    # so what it answers is what it can serve.
    assert main(["bench", triton.grpc_address, "--model", "fixed_cost", "--concurrency", "1,4", *QUICK,
                 "--json", str(closed)]) == 0
    service_step, capacity_step = json.loads(closed.read_text())["steps"]
    rate = round(2 * capacity_step["throughput"])
    opened = tmp_path / "open.json"
    assert main(["bench", triton.grpc_address, "--model", "fixed_cost", "--rate", str(rate),
                 "--measurement-interval", "2", "--max-trials", "3", "--warmup", "0.3", "--quiet",
                 "--json", str(opened)]) == 0
    step = json.loads(opened.read_text())["steps"][0]
    assert step["mode"] == "rate" and step["errors"] == {}
    # Sending did not slow down to the pace of the answers (a closed loop's would) ...
    assert step["sent_per_s"] > 1.4 * step["throughput"]
    # ... and the queue shows in the latency.
    assert step["p50_ms"] > 10 * service_step["p50_ms"]
    # How late requests left (the harness's own delay, on this shared machine up to ~0.1 s) is
    # reported apart, and is a small part of what the queue at the target added.
    assert 0 <= step["lag_p99_ms"] < step["p50_ms"]


def test_latency_counts_from_the_scheduled_time_not_the_send():
    """A request that leaves late (the harness fell behind) is charged the time it waited to leave."""

    async def scenario():
        server, port = await start_echo_server("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                payload = build_infer_request("simple_scale")
                load = _Load(channel, [payload], [], Step(target="", mode="rate", level=1, window_s=1, warmup_s=0))
                load.recorder.measuring = True
                scheduled = time.perf_counter_ns() - 200_000_000  # due 200 ms ago
                await load.send(0, scheduled)
                on_time = time.perf_counter_ns()
                await load.send(0, on_time)
                return np.frombuffer(load.recorder.latencies.tobytes(), np.int64) / 1e6
        finally:
            await server.stop(0)

    late, prompt = asyncio.run(scenario())
    assert late >= 200 and prompt < 100


def test_open_loop_requests_due_while_the_harness_stalled_are_charged_the_stall():
    """The open loop's own event loop stalls for 0.3 s (as a starved or overloaded client would):
    the arrivals due meanwhile leave late, in a burst, and their latency counts from when they were
    due, so the stall shows in the latency (and in the send lag) instead of vanishing."""

    async def scenario():
        server, port = await start_echo_server("127.0.0.1:0")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                load = _Load(channel, [build_infer_request("simple_scale")], [],
                             Step(target="", mode="rate", level=200, window_s=1, warmup_s=0))
                load.recorder.measuring = True
                arrivals = asyncio.ensure_future(load.arrivals())
                await asyncio.sleep(0.2)
                time.sleep(0.3)  # blocks the loop: nothing can be sent
                await asyncio.sleep(0.3)
                load.stopping = True
                await arrivals
                recorder = load.recorder
                return (np.frombuffer(recorder.latencies.tobytes(), np.int64) / 1e6,
                        np.frombuffer(recorder.lags.tobytes(), np.int64) / 1e6, recorder.sent)
        finally:
            await server.stop(0)

    latencies, lags, sent = asyncio.run(scenario())
    assert sent > 60  # ~160 due in 0.8 s, the ones due during the stall sent late rather than dropped
    late = int((lags >= 200).sum())
    assert late >= 1  # the stall held back the requests due during it ...
    assert (latencies >= 200).sum() >= late  # ... and each of them was charged at least that wait


def test_stability_is_perf_analyzers_rule():
    assert is_stable([100, 105, 95], [1.0, 1.05, 0.98], 10)
    assert not is_stable([100, 130, 95], [1.0, 1.0, 1.0], 10)  # throughput disagrees
    assert not is_stable([100, 100, 100], [1.0, 2.0, 1.0], 10)  # latency disagrees
    assert not is_stable([100, 100], [1.0, 1.0], 10)  # fewer than three windows
    assert is_stable([50, 100, 101, 99], [9.0, 1.0, 1.0, 1.0], 5)  # only the last three count


def test_inputs_from_metadata_shapes_bytes_and_files(tmp_path):
    model = ModelInputs("m", "", (InputSpec("X", "FP32", (-1,)), InputSpec("T", "BYTES", (1,))), max_batch_size=8)
    with pytest.raises(InputError, match="--shape X:1"):
        random_payloads(model)
    request = pb.ModelInferRequest.FromString(random_payloads(model, batch_size=3, shapes={"X": [5]}, count=1)[0])
    assert [list(t.shape) for t in request.inputs] == [[3, 5], [3, 1]]
    assert len(request.raw_input_contents[0]) == 3 * 5 * 4
    assert len(request.raw_input_contents[1]) == 3 * (4 + 16)  # length prefix + 16 random characters each
    assert bytes_raw(np.array([b"ab", b""], dtype=object)) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"

    np.savez(tmp_path / "d.npz", X=np.ones((2, 4), np.float32), T=np.array([[b"hi"], [b"yo"]], dtype=object))
    with pytest.raises(ValueError):  # object arrays need pickle, which the harness does not load
        file_payloads(model, [str(tmp_path / "d.npz")])
    (tmp_path / "d.json").write_text(json.dumps({"data": [
        {"X": {"content": [1, 2, 3], "shape": [1, 3]}, "T": ["hello"]},
        {"X": {"content": [4, 5], "shape": [1, 2]}, "T": ["a"]},
    ]}))
    payloads = [pb.ModelInferRequest.FromString(p) for p in file_payloads(model, [str(tmp_path / "d.json")])]
    assert [list(p.inputs[0].shape) for p in payloads] == [[1, 3], [1, 2]]
    assert payloads[0].raw_input_contents[1] == b"\x05\x00\x00\x00hello"
    np.save(tmp_path / "x.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(InputError, match="no values for"):
        file_payloads(model, [f"X={tmp_path / 'x.npy'}"])


def test_bytes_models_and_model_errors_are_reported_by_status(triton, tmp_path, capsys):
    assert main(["bench", triton.grpc_address, "--model", "bytes_reverse", "--concurrency", "2", *QUICK]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "c=2" in line)
    assert "| 0      |" in row
    # fail_on_demand from a data file: MODE 0 answers, 1 fails with INTERNAL, 2 with INVALID_ARGUMENT.
    data = tmp_path / "modes.json"
    data.write_text(json.dumps({"data": [{"INPUT0": list(range(16)), "MODE": [mode]} for mode in (0, 1, 2)]}))
    out_json = tmp_path / "errors.json"
    assert main(["bench", triton.grpc_address, "--model", "fail_on_demand", "--concurrency", "3", *QUICK,
                 "--input-data", str(data), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    step = json.loads(out_json.read_text())["steps"][0]
    assert set(step["errors"]) == {"INTERNAL", "INVALID_ARGUMENT"}, step["errors"]
    # Each slot cycles through the three requests: a third of them are answered.
    assert step["requests"] == pytest.approx(sum(step["errors"].values()) / 2, rel=0.2)
    assert "INTERNAL" in out and "INVALID_ARGUMENT" in out and "error at" in out


def test_a_missing_model_is_a_usage_error(triton, capsys):
    assert main(["bench", triton.grpc_address, "--model", "no_such_model", *QUICK]) == 2
    assert "no_such_model" in capsys.readouterr().err


def test_the_harness_warns_about_its_own_saturation_and_a_rate_it_could_not_keep():
    from gateway.bench.harness import StepResult, saturation_warnings

    def step(**changes):
        figures = dict(target="t", mode="concurrency", level=64, requests=1000, seconds=3.0, throughput=333.0,
                       rows_per_s=333.0, p50_ms=1.0, p90_ms=2.0, p95_ms=3.0, p99_ms=4.0, mean_ms=1.5, errors={},
                       error_samples=[], stable=True, windows=3, client_cpu_us_per_request=100.0,
                       client_core_share=0.3, workers=1, sent_per_s=333.0)
        return StepResult(**{**figures, **changes})

    assert saturation_warnings([step()]) == []
    busy = saturation_warnings([step(client_core_share=0.95)])
    assert len(busy) == 1 and "95% of a core" in busy[0] and "--workers" in busy[0]
    behind = saturation_warnings([step(mode="rate", level=1000, sent_per_s=800, lag_p99_ms=12.0)])
    assert any("sent only 800 req/s of the 1,000" in w for w in behind)
    assert any("12.0 ms after their scheduled time" in w for w in behind)
    # Poisson arrivals vary by themselves: 3 % short over 3,000 arrivals is no warning.
    assert saturation_warnings([step(mode="rate", level=1000, sent_per_s=970, lag_p99_ms=1.0)]) == []
