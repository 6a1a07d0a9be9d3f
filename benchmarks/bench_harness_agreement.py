"""Does `tensorgate bench` measure what others measure? Against Triton's own count and a tritonclient loop.

    python benchmarks/bench_harness_agreement.py [--rounds 3] [--seconds 6]

One local Triton (the wheel). For each load (model, concurrency), rounds alternate:
  - `tensorgate bench`'s harness (gateway/bench/harness.py, one load process): exactly three windows
    of `--seconds`/3 (stability 100 %), so both sides measure for the same time;
  - a closed loop of the same concurrency written with the stock client, `tritonclient.grpc.aio`
    (InferInput.set_data_from_numpy, `infer`), for the same `--seconds` after the same warm-up.
Each side's requests are also counted by Triton (ModelStatistics success count, before and after).

Figures: requests/s of each side (median over rounds) and their ratio; each side's count against
Triton's; each side's client CPU µs per request. Target: the two measurements agree within 5 %
where the server is the bottleneck (`fixed_cost`: 2 ms per call, one at a time, 16 in flight). On `simple_scale`
the client's own cost shares the machine's 2 cores with Triton, so a heavier client measures a
slower server: shown for what each client costs, not as agreement.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.bench.harness import Harness, Settings  # noqa: E402
from gateway.bench.inputs import fetch_model_inputs, random_payloads  # noqa: E402
from gateway.bench.measure import machine, table  # noqa: E402
from gateway.local.triton import LocalTriton, default_model_repository  # noqa: E402
from gateway.protocol import pb  # noqa: E402

# fixed_cost at 16 in flight: Triton always has a queue, so its one model instance, not the client,
# sets the rate (each side's client CPU is still shown).
LOADS = [("fixed_cost", 16), ("simple_scale", 8)]
WARMUP_S = 0.5


def successes(target: str, model: str) -> int:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        reply = pb.ModelStatisticsResponse.FromString(call(pb.ModelStatisticsRequest(name=model).SerializeToString(),
                                                           timeout=10))
    return sum(stats.inference_stats.success.count for stats in reply.model_stats)


def harness_run(harness: Harness, target: str, concurrency: int, seconds: float) -> dict:
    settings = Settings(window_s=seconds / 3, warmup_s=WARMUP_S, stability_percentage=100.0, max_trials=3,
                        step_timeout_s=seconds * 3 + 30, check_every=0)
    step = harness.run_step(target, "concurrency", concurrency, settings)
    return {"rps": step.throughput, "p50_ms": step.p50_ms, "answered": step.answered_total,
            "cpu_us": step.client_cpu_us_per_request}


async def tritonclient_loop(target: str, model: str, concurrency: int, seconds: float) -> dict:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(target)
    values = np.random.default_rng(0).random((1, 16), np.float32)
    state = {"measuring": False, "stop": False, "count": 0, "answered": 0, "latencies": []}

    async def slot():
        while not state["stop"]:
            infer_input = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
            infer_input.set_data_from_numpy(values)
            sent = time.perf_counter()
            await client.infer(model, [infer_input])
            state["answered"] += 1
            if state["measuring"]:
                state["count"] += 1
                state["latencies"].append(time.perf_counter() - sent)

    tasks = [asyncio.ensure_future(slot()) for _ in range(concurrency)]
    await asyncio.sleep(WARMUP_S)
    cpu, start = time.process_time(), time.perf_counter()
    state["measuring"] = True
    await asyncio.sleep(seconds)
    state["measuring"] = False
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    state["stop"] = True
    await asyncio.gather(*tasks)
    await client.close()
    return {"rps": state["count"] / elapsed, "p50_ms": float(np.median(state["latencies"])) * 1e3,
            "answered": state["answered"], "cpu_us": cpu / max(1, state["count"]) * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds of each run")
    args = parser.parse_args(argv)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    print(f"machine: {machine('numpy', 'grpc')}", flush=True)
    rows = []
    with LocalTriton(default_model_repository(), name="agreement") as triton:
        target = triton.grpc_address
        for model, concurrency in LOADS:
            payloads = random_payloads(fetch_model_inputs(target, model))
            runs = {"tensorgate bench": [], "tritonclient": []}
            counts_agree = {"tensorgate bench": True, "tritonclient": True}
            with Harness(payloads, workers=1, check_every=0) as harness:
                for round_index in range(args.rounds):
                    order = ["tensorgate bench", "tritonclient"][:: 1 if round_index % 2 == 0 else -1]
                    for side in order:
                        before = successes(target, model)
                        if side == "tensorgate bench":
                            got = harness_run(harness, target, concurrency, args.seconds)
                        else:
                            got = asyncio.run(tritonclient_loop(target, model, concurrency, args.seconds))
                        counted = successes(target, model) - before
                        counts_agree[side] &= counted == got["answered"]
                        runs[side].append(got)
                        print(f"{model} c={concurrency} round {round_index + 1} {side}: {got['rps']:,.0f} req/s, "
                              f"p50 {got['p50_ms']:.2f} ms, {got['cpu_us']:.0f} client CPU us/req; answered "
                              f"{got['answered']}, Triton counted {counted}", flush=True)
            median = {side: statistics.median(r["rps"] for r in got) for side, got in runs.items()}
            ratio = median["tensorgate bench"] / median["tritonclient"]
            rows.append([
                f"{model} c={concurrency}", f"{median['tensorgate bench']:,.0f}", f"{median['tritonclient']:,.0f}",
                f"x{ratio:.3f}" + (" (within 5 %)" if abs(ratio - 1) <= 0.05 else " (NOT within 5 %)"),
                f"{statistics.median(r['cpu_us'] for r in runs['tensorgate bench']):.0f} / "
                f"{statistics.median(r['cpu_us'] for r in runs['tritonclient']):.0f}",
                f"{'exact' if counts_agree['tensorgate bench'] else 'DIFFERS'} / "
                f"{'exact' if counts_agree['tritonclient'] else 'DIFFERS'}",
            ])
    print()
    print(table(["load", "tensorgate bench req/s", "tritonclient req/s", "ratio", "client CPU us/req (bench / tc)",
                 "count vs Triton's (bench / tc)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
