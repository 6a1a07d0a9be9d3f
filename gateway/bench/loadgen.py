"""Closed-loop gRPC load generator for KServe v2 / Triton ModelInfer, with a minimal client cost.

N workers share one grpc.aio channel (uvloop); each sends one prebuilt, serialized ModelInferRequest
as raw bytes (no serializers on either side) and sends the next as soon as the answer arrives. Load
runs for a warm-up, then a measured window (a duration or a request count); every request that
completes inside the window is counted and its latency (perf_counter_ns, send to answer) kept.

    python -m gateway.bench.loadgen --target 127.0.0.1:8001 --model simple_scale \
        --concurrency 64 --seconds 5 --json

Run it in a process of its own (`run_load_in_subprocess`) when the process being measured is
Python too, so the two do not share a GIL. `--cpu-pid PID` (repeatable) reads those processes' CPU
time at the edges of the measured window, so CPU per request covers exactly the counted requests.

An answer is not taken on trust: each worker parses its first reply and every `--check-every`-th
after it (64 by default; parsing all would add client CPU to every request) and compares the
outputs with what the model must answer (`EXPECTED_OUTPUTS`, the example models; any other model:
at least one output with data). A wrong reply counts as an error, with a sample of what was wrong;
`checked` says how many replies of the window were compared.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import grpc
import numpy as np

from gateway.bench.cpu import cpu_seconds_many
from gateway.protocol.tensors import NUMPY_DTYPES

__all__ = [
    "EXPECTED_OUTPUTS",
    "LoadResult",
    "MODEL_INFER_METHOD",
    "build_infer_request",
    "reply_checker",
    "run_load",
    "run_load_in_subprocess",
    "run_load_sync",
]

MODEL_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"

_MAX_ERROR_SAMPLES = 5
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHECK_EVERY = 64

#: What each example model answers for an input tensor x (examples/models/README.md), by output name.
EXPECTED_OUTPUTS: dict[str, Callable[[np.ndarray], dict[str, np.ndarray]]] = {
    "simple_scale": lambda x: {"OUTPUT0": x * 2},
    "simple_scale_dynbatch": lambda x: {"OUTPUT0": x * 2},
    "fixed_cost": lambda x: {"OUTPUT0": x},
    "fixed_cost_dynbatch": lambda x: {"OUTPUT0": x},
}


@dataclass
class LoadResult:
    """What one load run measured. Latencies are of requests completed inside the window."""

    requests: int
    """Requests answered successfully inside the measured window."""
    errors: int
    """Requests that failed inside the measured window."""
    seconds: float
    """Length of the measured window."""
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    error_samples: list[str]
    """Up to a few distinct error messages, `CODE: details`."""
    concurrency: int = 0
    mean_ms: float = 0.0
    cpu_seconds: dict[int, float] = field(default_factory=dict)
    """CPU seconds each watched pid used during the window (see --cpu-pid)."""
    client_cpu_seconds: float = 0.0
    """CPU seconds the load generator itself used during the window."""
    checked: int = 0
    """Replies inside the window whose outputs were compared with the expected ones (wrong ones
    are counted in `errors`)."""

    def cpu_us_per_request(self, pid: int) -> float:
        """CPU µs per successful request that process `pid` spent during the window."""
        if not self.requests:
            return float("nan")
        return self.cpu_seconds[pid] / self.requests * 1e6

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LoadResult":
        data = json.loads(text)
        data["cpu_seconds"] = {int(pid): used for pid, used in data.get("cpu_seconds", {}).items()}
        return cls(**data)

    def summary(self) -> str:
        text = (
            f"{self.requests} requests in {self.seconds:.2f} s at concurrency {self.concurrency}: "
            f"{self.rps:,.0f} req/s, p50 {self.p50_ms:.3f} ms, p90 {self.p90_ms:.3f} ms, "
            f"p99 {self.p99_ms:.3f} ms, {self.errors} errors ({self.checked} replies checked)"
        )
        for pid in self.cpu_seconds:
            text += f"; pid {pid}: {self.cpu_us_per_request(pid):.0f} CPU µs/request"
        if self.error_samples:
            text += "\n  errors: " + "; ".join(self.error_samples)
        return text


def build_infer_request(
    model: str,
    *,
    rows: int = 1,
    cols: int = 16,
    input_name: str = "INPUT0",
    datatype: str = "FP32",
    model_version: str = "",
) -> bytes:
    """A serialized ModelInferRequest with one [rows, cols] input in raw_input_contents."""
    from gateway.protocol import pb

    values = np.arange(rows * cols, dtype=NUMPY_DTYPES[datatype]).reshape(rows, cols)
    request = pb.ModelInferRequest(model_name=model, model_version=model_version)
    tensor = request.inputs.add()
    tensor.name = input_name
    tensor.datatype = datatype
    tensor.shape.extend(values.shape)
    request.raw_input_contents.append(values.tobytes())
    return request.SerializeToString()


def reply_checker(payload: bytes) -> Callable[[bytes], str | None]:
    """A check of one serialized ModelInferResponse to the request `payload`: None if it is right,
    else what is wrong. For the models of EXPECTED_OUTPUTS every expected output must be there with
    the expected shape and bytes; for any other model, at least one output with data."""
    from gateway.protocol import pb

    request = pb.ModelInferRequest.FromString(payload)
    expected_of = EXPECTED_OUTPUTS.get(request.model_name)
    expected: dict[str, np.ndarray] = {}
    if expected_of is not None:
        tensor = request.inputs[0]
        values = np.frombuffer(request.raw_input_contents[0], NUMPY_DTYPES[tensor.datatype]).reshape(list(tensor.shape))
        expected = expected_of(values)

    def check(reply: bytes) -> str | None:
        response = pb.ModelInferResponse.FromString(reply)
        outputs = {o.name: (list(o.shape), raw) for o, raw in zip(response.outputs, response.raw_output_contents)}
        if not expected:
            return None if any(raw for _, raw in outputs.values()) else "wrong reply: no output with data"
        for name, want in expected.items():
            if name not in outputs:
                return f"wrong reply: no output {name} (got {sorted(outputs)})"
            shape, raw = outputs[name]
            if shape != list(want.shape) or raw != want.tobytes():
                return f"wrong reply: {name} has shape {shape} and {len(raw)} bytes, not the expected {list(want.shape)}"
        return None

    return check


class _Window:
    """Shared state of one run: which completions count, and what they measured."""

    def __init__(self, max_requests: int | None) -> None:
        self.start_ns = 1 << 62  # nothing counts until the window opens
        self.end_ns = 1 << 62
        self.stop = False
        self.max_requests = max_requests
        self.latencies_ns = array.array("q")
        self.checked = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.done = asyncio.Event()

    def record_error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < _MAX_ERROR_SAMPLES and message not in self.error_samples:
            self.error_samples.append(message)


async def _worker(call, payload: bytes, window: _Window, timeout: float, interval_ns: int = 0, offset_ns: int = 0,
                  check: Callable[[bytes], str | None] | None = None, check_every: int = CHECK_EVERY,
                  metadata: tuple | None = None) -> None:
    """Send, await, repeat; with `interval_ns`, at most one request per interval (paced: the
    offered load stays the same however fast the target answers, as long as it keeps up). The
    first reply and every `check_every`-th after it go through `check`."""
    latencies = window.latencies_ns
    clock = time.perf_counter_ns
    next_ns = clock() + offset_ns
    answered_count = 0
    while not window.stop:
        if interval_ns:
            delay = next_ns - clock()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            next_ns += interval_ns
        sent = clock()
        try:
            reply = await call(payload, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            answered = clock()
            if window.start_ns <= answered <= window.end_ns:
                window.record_error(f"{error.code().name}: {error.details()}")
                if window.max_requests is not None and len(latencies) + window.errors >= window.max_requests:
                    window.done.set()  # a count run against a failing target must still end
            continue
        answered = clock()
        inside = window.start_ns <= answered <= window.end_ns
        checked = check is not None and answered_count % check_every == 0
        wrong = check(reply) if checked else None
        answered_count += 1
        if not inside:
            continue
        window.checked += checked
        if wrong is not None:
            window.record_error(wrong)
        else:
            latencies.append(answered - sent)
        if window.max_requests is not None and len(latencies) + window.errors >= window.max_requests:
            window.done.set()


async def run_load(
    target: str,
    payload: bytes,
    *,
    concurrency: int = 64,
    seconds: float | None = 5.0,
    requests: int | None = None,
    warmup_seconds: float = 0.5,
    cpu_pids: Sequence[int] = (),
    timeout: float = 30.0,
    rate: float | None = None,
    check_every: int = CHECK_EVERY,
    metadata: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """Closed-loop load on `target` for `seconds` (or until `requests` complete) after a warm-up;
    with `rate`, paced at that many requests/s in total over the `concurrency` workers. Each
    worker checks its first reply and every `check_every`-th after it (0: none). `metadata` goes
    with every request (e.g. an authorization header)."""
    if (seconds is None) == (requests is None):
        raise ValueError("give exactly one of seconds or requests")
    options = [
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        call = channel.unary_unary(MODEL_INFER_METHOD)  # bytes in, bytes out
        window = _Window(requests)
        interval_ns = int(concurrency / rate * 1e9) if rate else 0
        check = reply_checker(payload) if check_every > 0 else None
        workers = [
            asyncio.ensure_future(_worker(call, payload, window, timeout, interval_ns, interval_ns * i // concurrency,
                                          check, max(check_every, 1), tuple(metadata) or None))
            for i in range(concurrency)
        ]
        try:
            if warmup_seconds > 0:
                await asyncio.sleep(warmup_seconds)
            cpu_before = cpu_seconds_many(cpu_pids)
            client_before = time.process_time()
            window.start_ns = time.perf_counter_ns()
            window.end_ns = 1 << 62
            if requests is not None:
                await window.done.wait()
            else:
                await asyncio.sleep(seconds)
            window.end_ns = time.perf_counter_ns()
            cpu_after = cpu_seconds_many(cpu_pids)
            client_used = time.process_time() - client_before
            window.stop = True
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
    return _result(window, concurrency, {pid: cpu_after[pid] - cpu_before[pid] for pid in cpu_pids}, client_used)


def _result(window: _Window, concurrency: int, cpu_used: dict[int, float], client_used: float) -> LoadResult:
    latencies_ms = np.frombuffer(window.latencies_ns, dtype=np.int64) / 1e6
    if window.max_requests is not None:
        latencies_ms = latencies_ms[: window.max_requests]
    seconds = (window.end_ns - window.start_ns) / 1e9
    if latencies_ms.size:
        p50, p90, p99 = np.percentile(latencies_ms, [50, 90, 99])
        mean = float(latencies_ms.mean())
    else:
        p50 = p90 = p99 = mean = float("nan")
    return LoadResult(
        requests=int(latencies_ms.size),
        errors=window.errors,
        seconds=seconds,
        rps=latencies_ms.size / seconds if seconds > 0 else 0.0,
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        error_samples=window.error_samples,
        concurrency=concurrency,
        mean_ms=mean,
        cpu_seconds=cpu_used,
        client_cpu_seconds=client_used,
        checked=window.checked,
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_load_sync(target: str, payload: bytes, **kwargs) -> LoadResult:
    """run_load on a fresh uvloop event loop, in this process."""
    _install_uvloop()
    return asyncio.run(run_load(target, payload, **kwargs))


def run_load_in_subprocess(
    target: str,
    model: str,
    *,
    concurrency: int = 64,
    seconds: float | None = 5.0,
    requests: int | None = None,
    warmup_seconds: float = 0.5,
    rows: int = 1,
    cols: int = 16,
    input_name: str = "INPUT0",
    datatype: str = "FP32",
    cpu_pids: Sequence[int] = (),
    python: str = sys.executable,
    timeout: float | None = None,
    rate: float | None = None,
    check_every: int = CHECK_EVERY,
    headers: Sequence[tuple[str, str]] = (),
) -> LoadResult:
    """Run the load in a process of its own (`python -m gateway.bench.loadgen ... --json`)."""
    args = [
        python, "-m", "gateway.bench.loadgen",
        "--target", target, "--model", model,
        "--concurrency", str(concurrency),
        "--warmup", str(warmup_seconds),
        "--rows", str(rows), "--cols", str(cols),
        "--input", input_name, "--datatype", datatype,
        "--check-every", str(check_every),
        "--json",
    ]  # fmt: skip
    args += ["--seconds", str(seconds)] if requests is None else ["--requests", str(requests)]
    for pid in cpu_pids:
        args += ["--cpu-pid", str(pid)]
    if rate:
        args += ["--rate", str(rate)]
    for key, value in headers:
        args += ["--header", f"{key}={value}"]
    if timeout is None:
        timeout = 120.0 + warmup_seconds + (seconds or 0.0)
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return LoadResult.from_json(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of a KServe v2 gRPC server")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-version", default="")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (workers)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--seconds", type=float, help="length of the measured window (default 5)")
    amount.add_argument("--requests", type=int, help="measure this many requests instead of a duration")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of load before the window opens")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (batch dimension)")
    parser.add_argument("--cols", type=int, default=16, help="elements per row")
    parser.add_argument("--input", default="INPUT0", help="input tensor name")
    parser.add_argument("--datatype", default="FP32", choices=sorted(NUMPY_DTYPES))
    parser.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    parser.add_argument("--rate", type=float, help="pace the load at this many requests/s in total (default: as fast as answered)")
    parser.add_argument("--cpu-pid", type=int, action="append", default=[], help="pid whose CPU time to measure")
    parser.add_argument("--check-every", type=int, default=CHECK_EVERY,
                        help="each worker checks the outputs of its first reply and every N-th after it (0: none)")
    parser.add_argument("--header", metavar="KEY=VALUE", action="append", default=[],
                        help="metadata sent with every request (repeatable), e.g. authorization='Bearer …'")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.seconds is None and args.requests is None:
        args.seconds = 5.0
    payload = build_infer_request(
        args.model, rows=args.rows, cols=args.cols, input_name=args.input, datatype=args.datatype,
        model_version=args.model_version,
    )  # fmt: skip
    result = run_load_sync(
        args.target, payload, concurrency=args.concurrency, seconds=args.seconds, requests=args.requests,
        warmup_seconds=args.warmup, cpu_pids=args.cpu_pid, timeout=args.timeout, rate=args.rate,
        check_every=args.check_every, metadata=[tuple(item.split("=", 1)) for item in args.header],
    )  # fmt: skip
    print(result.to_json() if args.json else result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
