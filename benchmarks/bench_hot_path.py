"""The gateway's own Python per request, in-process, without gRPC: the direct path, the batching path, each stage.

    python benchmarks/bench_hot_path.py [--quick] [--rounds R] [--requests N] [--loop uvloop|asyncio]
                                        [--no-deadline] [--stage-batch B] [--root DIR] [--json OUT]

End to end: the real front-door handler (`InferenceService.model_infer`: raw bytes in, raw bytes
out), Pipeline, BatchingDispatcher, DirectDispatcher and Router, over a stand-in backend whose
`infer(request)` does what `Backend.infer` does around its stream — the stream owns the request id,
the request is serialized on the way out, the answer parsed on the way in — and answers on the next
event-loop turn with a valid ModelInferResponse of the right shape (the request's rows echoed).
64 requests in flight, 1×16 FP32 in raw_input_contents (what `gateway.bench.loadgen` sends), on a
`simple_scale`-like signature (INPUT0 FP32 [-1,16] → OUTPUT0 FP32 [-1,16], max_batch_size 32), each
with a 30 s deadline as the load generator sets (`--no-deadline`: none). Configurations:

  direct        batching off: every request is one backend call
  batching      the default policy (adaptive); batches of ~32 rows form
  batching, 2-row batches   the same with the policy's max_batch_size 2: what each batch costs,
                shared by 2 requests instead of ~32 (small batches, as a fast backend sees)
  await floor   a handler that awaits a future resolved on the next loop turn, through one more
                coroutine layer: what waiting for an answer costs a request before any gateway code
  driver        the load loop alone, over a handler that returns at once (subtracted: "net")

CPU time of the process (`time.process_time`) over N requests per round; rounds alternate the
configurations; median [min–max] over rounds.

Stages, each alone in a loop (median [min–max] of per-call CPU time over rounds); batch stages are
measured on a batch of the mean size the batching run formed (`--stage-batch B`: of B requests)
and reported per request:

  parse       upb FromString of the client's bytes
  validate    the request checked against the signature (validate_request; where the checkout has
              them, through the layouts already validated: pipeline/layout.py)
  resolve     the pipeline's model lookup (an entry already resolved)
  route       Router.choose (once per request direct, once per batch batching)
  batch key   what says which queue a request joins (batch_key; where the checkout has them, a
              lookup by the layout validation computed)
  queue       put into a BatchQueue (fixed mode: no capacity check), then the batch taken out of it
  merge       the batch's requests into one request
  split       the batch response into one response per request
  serialize   one request's response to bytes (what the front door returns)
  observers   the pipeline's observers of one finished request (statistics counters)
  stand-in    the stand-in backend's own serialize + parse, per request (not the gateway's: the
              real stream does the same work)

`--root DIR` imports the gateway from another checkout (a copy of another commit with its
generated gateway/protocol/tensorgate.binpb), to measure before and after in one sitting.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _import_root() -> None:
    """Put the checkout to measure first on sys.path (before the gateway is imported)."""
    root = REPO
    if "--root" in sys.argv:
        root = Path(sys.argv[sys.argv.index("--root") + 1]).resolve()
    sys.path.insert(0, str(root))


_import_root()

import numpy as np  # noqa: E402

import gateway  # noqa: E402
from gateway.batching import merge as merging  # noqa: E402
from gateway.batching.config import BatchingConfig, BatchingPolicy  # noqa: E402
from gateway.batching.counters import BatchCounters  # noqa: E402
from gateway.batching.dispatcher import BatchingDispatcher  # noqa: E402
from gateway.batching.queue import BatchQueue  # noqa: E402
from gateway.bench.measure import machine, table  # noqa: E402
from gateway.pipeline.core import Pipeline  # noqa: E402
from gateway.pipeline.exchange import Exchange  # noqa: E402
from gateway.pipeline.validation import validate_request  # noqa: E402
from gateway.protocol import pb  # noqa: E402
from gateway.protocol.tensors import FINAL_FLAG_RESPONSE, ModelSignature, TensorSpec  # noqa: E402
from gateway.routing.dispatcher import DirectDispatcher  # noqa: E402
from gateway.routing.router import Router  # noqa: E402
from gateway.routing.sequences import SequenceTable  # noqa: E402
from gateway.server.inference import InferenceService  # noqa: E402
from gateway.server.rpc import Call  # noqa: E402

MODEL, VERSION = "simple_scale", "1"
COLUMNS = 16
MAX_BATCH = 32
CONCURRENCY = 64
DEADLINE_S = 30.0
SIGNATURE = ModelSignature(
    name=MODEL, version=VERSION,
    inputs={"INPUT0": TensorSpec("INPUT0", "FP32", (-1, COLUMNS))},
    outputs={"OUTPUT0": TensorSpec("OUTPUT0", "FP32", (-1, COLUMNS))},
    max_batch_size=MAX_BATCH, decoupled=False, sequence=False, sequence_idle_s=None,
)


# ---- the stand-ins around the real stages -------------------------------------------------------


class StandInBackend:
    """Answers every request on the next event-loop turn, as `Backend.infer` would over its stream."""

    address, pool = "stand-in:8001", "cpu"
    healthy = routable = True

    def __init__(self) -> None:
        self.ready_models = frozenset({(MODEL, VERSION), (MODEL, "")})
        self.outstanding = self.served = self.failed = 0
        self.calls = 0
        self._next_id = 0
        self._templates: dict[int, bytes] = {}

    def serves(self, model: str, version: str) -> bool:
        return (model, version) in self.ready_models

    async def infer(self, request, *, decoupled: bool = False):
        self.outstanding += 1
        self.calls += 1
        self._next_id += 1
        request.id = str(self._next_id)  # the stream owns the id
        request.SerializeToString()  # what the stream writes
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(self._answer, future, request)
        try:
            response = await future
            self.served += 1
            return response
        finally:
            self.outstanding -= 1

    def _answer(self, future: asyncio.Future, request) -> None:
        rows = request.inputs[0].shape[0]
        template = self._templates.get(rows)
        if template is None:
            template = self._templates[rows] = _stream_response(rows)
        response = pb.ModelStreamInferResponse.FromString(template).infer_response  # what the read loop parses
        response.id = request.id
        response.raw_output_contents[0] = request.raw_input_contents[0]  # echo: each request can check its rows
        if not future.done():
            future.set_result(response)


def _stream_response(rows: int) -> bytes:
    message = pb.ModelStreamInferResponse()
    response = message.infer_response
    response.model_name, response.model_version = MODEL, VERSION
    response.outputs.add(name="OUTPUT0", datatype="FP32", shape=[rows, COLUMNS])
    response.raw_output_contents.append(bytes(4 * COLUMNS * rows))
    response.parameters[FINAL_FLAG_RESPONSE].bool_param = True
    return message.SerializeToString()


class StandInFleet:
    def __init__(self, backend: StandInBackend) -> None:
        self.pools = {"cpu": [backend]}

    def on_change(self, listener) -> None:
        pass

    def backends(self) -> list:
        return self.pools["cpu"]


class StandInCatalog:
    class _Info:
        signature = SIGNATURE

    async def get(self, model: str, version: str):
        return self._Info()

    def not_found(self, model: str, version: str):
        raise AssertionError(f"unknown model {model!r}")


class Gateway:
    """The real hot-path stages, wired as gateway/app.py wires them (telemetry off; drift when asked:
    the drift stage with its defaults for the model, every input watched)."""

    def __init__(self, batching: BatchingConfig, drift: bool = False) -> None:
        self.backend = StandInBackend()
        self.fleet = StandInFleet(self.backend)
        self.router = Router(self.fleet, None)
        self.direct = DirectDispatcher(self.router, SequenceTable())
        self.batching = BatchingDispatcher(self.direct, batching, self.router)
        self.pipeline = Pipeline(StandInCatalog(), self.router.routes, self.batching)
        if drift:
            from gateway.configfile import load_dataclass
            from gateway.drift.config import DriftConfig
            from gateway.drift.stage import DriftStage
            from gateway.ext import drift as kernels

            kernels.warm_up()
            self.drift = DriftStage(load_dataclass(DriftConfig, {"models": {MODEL: {}}}))
            batch_observer = getattr(self.drift, "batch_observer", None)  # absent in older checkouts (--root)
            if batch_observer is not None:
                self.pipeline.attach(observer=self.drift.observer, batch_observer=batch_observer)
            else:
                self.pipeline.attach(observer=self.drift.observer)
        self.service = InferenceService(self.pipeline, self.fleet)
        self.handler = self.service.model_infer


def payload(seed: int) -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL, model_version="")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, COLUMNS])
    request.raw_input_contents.append(np.full(COLUMNS, seed, np.float32).tobytes())
    return request.SerializeToString()


async def _noop_handler(raw: bytes, call: Call) -> bytes:
    return raw


async def _awaiting_handler(raw: bytes, call: Call) -> bytes:
    return await _awaiting_layer(raw)


async def _awaiting_layer(raw: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_soon(future.set_result, raw)
    return await future


# ---- end to end ---------------------------------------------------------------------------------


async def drive(handler, payloads: list[bytes], count: int, deadline_s: float | None, check: bool = False) -> None:
    """`count` requests through `handler`, CONCURRENCY at a time, as an engine calls it."""
    remaining = count
    monotonic = time.monotonic

    async def worker(raw: bytes, expected: bytes) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            answer = await handler(raw, Call(None if deadline_s is None else monotonic() + deadline_s))
            if check:
                response = pb.ModelInferResponse.FromString(answer)
                assert response.raw_output_contents[0] == expected, "a request got another request's rows"
                assert list(response.outputs[0].shape) == [1, COLUMNS], response

    await asyncio.gather(*(
        worker(payloads[i % len(payloads)], pb.ModelInferRequest.FromString(payloads[i % len(payloads)]).raw_input_contents[0])
        for i in range(CONCURRENCY)
    ))


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def end_to_end(rounds: int, requests: int, loop_kind: str, deadline_s: float | None) -> dict:
    payloads = [payload(seed) for seed in range(CONCURRENCY)]
    batching_gateway = Gateway(BatchingConfig())
    setups: dict = {
        "direct": Gateway(BatchingConfig(default=BatchingPolicy(enabled=False))).handler,
        "batching": batching_gateway.handler,
        "batching, 2-row batches": Gateway(BatchingConfig(default=BatchingPolicy(max_batch_size=2))).handler,
        "batching + drift": Gateway(BatchingConfig(), drift=True).handler,
        "await floor": _awaiting_handler,
        "driver": _noop_handler,
    }
    gateways = [handler for name, handler in setups.items() if name not in ("await floor", "driver")]
    loops = {name: new_loop(loop_kind) for name in setups}
    for name, handler in setups.items():  # warm up; check every request got its own answer
        loops[name].run_until_complete(drive(handler, payloads, 2_000, deadline_s, check=handler in gateways))
    counters = batching_gateway.batching.batch_counters(MODEL, VERSION)
    batches_before, rows_before = counters.batches, counters.rows
    samples: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            gc.collect()
            started = time.process_time()
            loops[name].run_until_complete(drive(setups[name], payloads, requests, deadline_s))
            samples[name].append((time.process_time() - started) / requests)
    for loop in loops.values():
        loop.close()
    mean_rows = (counters.rows - rows_before) / max(counters.batches - batches_before, 1)
    return {"samples": samples, "mean_batch_rows": mean_rows, "reasons": dict(counters.reasons)}


# ---- stages -------------------------------------------------------------------------------------


def _complete(coroutine):
    """Run a coroutine that never suspends to its result (the pipeline's resolve, for example)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


def stage_calls(batch_rows: int, deadline_s: float | None) -> dict[str, tuple]:
    """name → (zero-argument call, requests it serves)."""
    raw = payload(7)
    request = pb.ModelInferRequest.FromString(raw)
    gateway_ = Gateway(BatchingConfig())
    pipeline, router = gateway_.pipeline, gateway_.router
    entry = _complete(pipeline.resolve(MODEL, ""))
    requests = [pb.ModelInferRequest.FromString(payload(seed)) for seed in range(batch_rows)]
    rows = [1] * batch_rows
    merged = merging.merge(requests, rows)
    batch_response = pb.ModelStreamInferResponse.FromString(_stream_response(batch_rows)).infer_response
    singles = merging.split(batch_response, rows, "stand-in:8001")
    policy = BatchingPolicy(mode="fixed", max_queue_delay_us=10**9)
    queue = BatchQueue(MODEL, policy, 2 * batch_rows, None, lambda: 1, BatchCounters())
    exchange = Exchange(entry, request, time.perf_counter_ns())
    stream_template = _stream_response(batch_rows)
    # What the hot path calls per request, in this checkout: a layout-cached validation and a
    # queue found by the request's layout where the code has them, else the full functions.
    layouts = getattr(entry, "layouts", None)
    validate = (lambda: layouts.validate(request)) if layouts is not None else (lambda: validate_request(request, SIGNATURE))
    known_entry = getattr(pipeline, "_known_entry", None)
    resolve = (lambda: known_entry(request)) if known_entry is not None else (lambda: _complete(pipeline.resolve(MODEL, "")))
    model_batching = gateway_.batching._batching_of(entry)
    places = getattr(model_batching, "places", None)
    if places is not None:
        layout = layouts.validate(request)
        gateway_.batching._place(model_batching, request, layout)
        batch_key = lambda: places.get(layout)  # noqa: E731
    else:
        batch_key = lambda: merging.batch_key(request)  # noqa: E731

    def queue_round() -> None:
        put = queue.put
        deadline = None if deadline_s is None else time.monotonic() + deadline_s
        for item in requests:
            put(item, 1, deadline, 0)
        queue._take(time.monotonic())

    def stand_in() -> None:
        merged.SerializeToString()
        pb.ModelStreamInferResponse.FromString(stream_template)

    return {
        "parse": (lambda: pb.ModelInferRequest.FromString(raw), 1),
        "validate": (validate, 1),
        "resolve": (resolve, 1),
        "route": (lambda: router.choose(MODEL, VERSION), 1),
        "batch key": (batch_key, 1),
        "queue put/take": (queue_round, batch_rows),
        "merge": (lambda: merging.merge(requests, rows), batch_rows),
        "split": (lambda: merging.split(batch_response, rows, "stand-in:8001"), batch_rows),
        "serialize": (lambda: singles[0].SerializeToString(), 1),
        "observers": (lambda: pipeline._observe(exchange, singles[0], None), 1),
        "stand-in": (stand_in, batch_rows),
    }


async def measure_stages(calls: dict[str, tuple], rounds: int, round_s: float) -> dict[str, list[float]]:
    """Per-request CPU seconds of each stage, per round (inside a running loop: the queue makes futures)."""
    timers = {name: (timeit.Timer(call, timer=time.process_time), served) for name, (call, served) in calls.items()}
    loops = {}
    for name, (timer, _) in timers.items():
        number, elapsed = timer.autorange()
        loops[name] = max(1, int(number * round_s / max(elapsed, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_index in range(rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            timer, served = timers[name]
            samples[name].append(timer.timeit(loops[name]) / loops[name] / served)
        await asyncio.sleep(0)
    return samples


# ---- report -------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.2f} [{min(values) * 1e6:.2f}–{max(values) * 1e6:.2f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5,000 requests")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and configuration")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--no-deadline", action="store_true", help="requests without a deadline")
    parser.add_argument("--stage-batch", type=int, help="measure the batch stages on batches of this many "
                        "requests (default: the mean batch of the batching run)")
    parser.add_argument("--root", help="import the gateway from this checkout instead (see the docstring)")
    parser.add_argument("--json", help="also write the samples (seconds per request) to this file")
    arguments = parser.parse_args(argv)
    if arguments.quick:
        arguments.rounds, arguments.requests = 3, 5_000
    deadline_s = None if arguments.no_deadline else DEADLINE_S

    print(f"machine: {machine()}")
    print(f"gateway from: {Path(gateway.__file__).parent.parent}")
    print(f"{CONCURRENCY} in flight, 1x{COLUMNS} FP32, deadline {deadline_s} s, loop {arguments.loop}; "
          f"{arguments.rounds} rounds x {arguments.requests} requests; CPU time of the process\n", flush=True)

    run = end_to_end(arguments.rounds, arguments.requests, arguments.loop, deadline_s)
    samples = run["samples"]
    driver = statistics.median(samples["driver"])
    rows = []
    for name in samples:
        net = [value - driver for value in samples[name]] if name != "driver" else samples[name]
        rows.append([name, spread(samples[name]), spread(net) if name != "driver" else "—"])
    print(table(["path", "µs/request", "net of the driver"], rows))
    added = [on - off for on, off in zip(samples["batching + drift"], samples["batching"])]
    print(f"the drift stage (batching + drift − batching, paired by round): {spread(added)} µs/request")
    batch_rows = arguments.stage_batch or max(1, round(run["mean_batch_rows"]))
    print(f"\nbatching: mean batch {run['mean_batch_rows']:.1f} rows; reasons {run['reasons']}\n", flush=True)

    loop = new_loop(arguments.loop)
    stage_samples = loop.run_until_complete(
        measure_stages(stage_calls(batch_rows, deadline_s), arguments.rounds, 0.05 if arguments.quick else 0.1)
    )
    loop.close()
    gateway_sum = sum(statistics.median(v) for name, v in stage_samples.items() if name != "stand-in")
    print(table(["stage (per request)", f"µs, batch of {batch_rows}"], [[name, spread(v)] for name, v in stage_samples.items()]))
    print(f"\nsum of the gateway's stages: {gateway_sum * 1e6:.2f} µs (route counted once per request)")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"end_to_end": run, "stages": stage_samples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
