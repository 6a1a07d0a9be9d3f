"""`tensorgate bench TARGET --model M ...`: the options, and the run from options to files.

    tensorgate bench 127.0.0.1:8001 --model simple_scale --concurrency 1,8,64 --csv out.csv --plot out.png
    tensorgate bench 127.0.0.1:8001 --model mlp --rate 500,1000 --compare 127.0.0.1:9000 --workers 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

__all__ = ["add_arguments", "run"]


def _numbers(kind):
    def parse(text: str):
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 1,8,64 (got {text!r})") from None
        if not values or any(value <= 0 for value in values):
            raise argparse.ArgumentTypeError(f"expected positive numbers (got {text!r})")
        return values
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="host:port of a KServe v2 gRPC endpoint (the gateway, or Triton)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-version", default="")
    parser.add_argument("--compare", action="append", default=[], metavar="TARGET2",
                        help="run the same sweep against this endpoint too, interleaved step by step, and print "
                             "ratios to TARGET (repeatable)")
    load = parser.add_argument_group("load")
    load.add_argument("--concurrency", type=_numbers(int), default=None,
                      help="closed loop: requests in flight per step, e.g. 1,8,64,256 (default: 1)")
    load.add_argument("--rate", type=_numbers(float), default=None,
                      help="open loop: Poisson arrivals at these requests/s per step, e.g. 500,1000,2000; latency "
                           "counts from each request's scheduled send time")
    load.add_argument("--stream", action="store_true", help="send over ModelStreamInfer instead of unary ModelInfer")
    load.add_argument("--streams", type=int, default=16,
                      help="with --stream: streams per load process (closed loop: at most one per slot)")
    load.add_argument("--workers", type=int, default=1, help="load processes (each gets an equal share of the load)")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    method = parser.add_argument_group("measurement (perf_analyzer's method)")
    method.add_argument("--measurement-interval", type=float, default=2.0, metavar="SECONDS",
                        help="length of a measurement window (default 2)")
    method.add_argument("--stability-percentage", type=float, default=10.0,
                        help="the last three windows' throughput and mean latency must agree within this %% "
                             "(default 10)")
    method.add_argument("--max-trials", type=int, default=10, help="windows per step at most (default 10)")
    method.add_argument("--step-timeout", type=float, default=60.0, help="seconds per step at most (default 60)")
    method.add_argument("--warmup", type=float, default=0.5, help="seconds of load before a step's first window")
    method.add_argument("--check-every", type=int, default=64,
                        help="check the outputs of every N-th reply (0: none); a wrong one is an error")
    data = parser.add_argument_group("inputs (default: random data of the model's shapes and datatypes)")
    data.add_argument("--batch-size", type=int, default=1, help="rows per request, for models that batch")
    data.add_argument("--shape", action="append", default=[], metavar="NAME:D1,D2",
                      help="dims of a variable-size input, without the batch dimension (repeatable)")
    data.add_argument("--input-data", action="append", default=[], metavar="FILE",
                      help=".npy ([NAME=]file.npy), .npz (arrays by input name) or perf_analyzer-style .json")
    data.add_argument("--string-length", type=int, default=16, help="characters of each random BYTES element")
    out = parser.add_argument_group("output")
    out.add_argument("--csv", help="write one row per step to this CSV file")
    out.add_argument("--json", help="write the steps and the run's context to this JSON file")
    out.add_argument("--plot", help="draw latency percentiles against throughput, one curve per target (PNG)")
    out.add_argument("--quiet", action="store_true", help="no live progress line")


def run(args: argparse.Namespace) -> int:
    from gateway.bench.harness import Harness, HarnessError, Settings, saturation_warnings, stderr_progress
    from gateway.bench.inputs import InputError, fetch_model_inputs, file_payloads, parse_shape_option, random_payloads
    from gateway.bench.report import comparison_table, plot, results_table, write_csv, write_json

    targets = [args.target, *args.compare]
    levels = [("concurrency", float(c)) for c in (args.concurrency or [])]
    levels += [("rate", r) for r in (args.rate or [])]
    if not levels:
        levels = [("concurrency", 1.0)]
    if args.workers < 1:
        print("tensorgate bench: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        model = fetch_model_inputs(args.target, args.model, args.model_version, timeout=args.timeout)
        if args.input_data:
            payloads = file_payloads(model, args.input_data)
        else:
            payloads = random_payloads(model, batch_size=args.batch_size, shapes=parse_shape_option(args.shape),
                                       string_length=args.string_length)
    except InputError as error:
        print(f"tensorgate bench: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - e.g. the target is not there
        print(f"tensorgate bench: cannot read model {args.model!r} from {args.target}: {error}", file=sys.stderr)
        return 1
    settings = Settings(
        window_s=args.measurement_interval, warmup_s=args.warmup, stability_percentage=args.stability_percentage,
        max_trials=args.max_trials, step_timeout_s=args.step_timeout, timeout_s=args.timeout, stream=args.stream,
        streams=args.streams, check_every=args.check_every,
        rows_per_request=args.batch_size if model.max_batch_size > 0 and not args.input_data else 1,
    )
    progress = None if args.quiet else stderr_progress
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        with Harness(payloads, workers=args.workers, check_every=args.check_every) as harness:
            results = harness.sweep(targets, levels, settings, progress)
    except HarnessError as error:
        print(f"\ntensorgate bench: {error}", file=sys.stderr)
        return 1
    if progress is not None and sys.stderr.isatty():
        sys.stderr.write("\n")
    print(results_table(results))
    if len(targets) > 1:
        print()
        print(comparison_table(results, targets))
    for result in results:
        for sample in result.error_samples:
            print(f"error at {result.target} {result.label}: {sample}")
    sys.stdout.flush()
    for warning in saturation_warnings(results):
        print(f"warning: {warning}", file=sys.stderr)
    context = {
        "command": ("tensorgate " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
                    else "tensorgate bench (called in-process)"),
        "started": started.isoformat(timespec="seconds"), "model": args.model, "targets": targets,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}", "stream": args.stream, "workers": args.workers,
        "measurement_interval_s": args.measurement_interval, "stability_percentage": args.stability_percentage,
    }
    if args.csv:
        write_csv(args.csv, results)
    if args.json:
        write_json(args.json, results, context)
    if args.plot:
        plot(args.plot, results, f"{args.model}: latency against throughput")
    return 0
