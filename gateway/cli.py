"""`tensorgate` command line: serve, local-triton, drift report, demo, bench, package, package-verify, audit,
rollout, rollback, status.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or invalid configuration (the error names the
key path).
"""

from __future__ import annotations

import os

# gRPC reads its experiment flags once, at import, so this must come before anything imports grpc.
# Without the event-engine client, each upstream message skips a hand-off between gRPC's thread
# pool and the thread that delivers it: measured 25–30% less gateway CPU per forwarded request on
# grpcio 1.85 (benchmarks/RESULTS.md). An operator's own GRPC_EXPERIMENTS wins.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

import argparse
import asyncio
import logging
import signal
import sys

from gateway.errors import ConfigError
from gateway.server import cpu_pinning, gc_policy
from gateway.server.config import ENGINES

EXIT_CONFIG = 2

log = logging.getLogger("gateway.cli")


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; fall back only where it cannot be built
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config, mapping, config_path: str, worker=None) -> None:
    from gateway.app import serving_gateway

    gateway = serving_gateway(config, mapping, worker=worker, config_path=config_path)
    await gateway.start()
    if config.server.resolved_engine() != "envoy":  # the envoy engine's stages live in Envoy: applied there
        gc_policy.apply(config.server)
    print(f"tensorgate serving on {gateway.address} ({config.server.resolved_engine()} engine)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task] = set()

    async def reload() -> None:
        try:
            await gateway.reload_file()
        except Exception as error:  # refused (logged by the gateway) or unreachable: keep serving
            log.error("SIGHUP: config reload from %s refused, the running config keeps serving: %s", config_path, error)

    def on_hangup() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    # Reload the config file; SIGHUP no longer ends the process. With several workers the parent
    # forwards SIGHUP to each, and each reloads its own gateway.
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()
    await gateway.stop()  # drains: NOT_SERVING first, work in flight gets server.grace_s


def _worker_count(args: argparse.Namespace, config) -> int:
    """--workers, else server.workers; `auto`: the cores this process may run on."""
    if args.workers is None:
        return config.server.resolved_workers()
    if args.workers == "auto":
        return config.server.auto_workers()
    if not args.workers.isdigit() or int(args.workers) < 1:
        raise ConfigError("--workers", f"expected a number of processes (1 or more) or auto, got {args.workers!r}")
    return int(args.workers)


async def _supervise(config, config_path: str, count: int, listen: str | None, verbose: bool) -> int:
    from gateway.workers.supervisor import Supervisor

    def ready(supervisor) -> None:
        port = supervisor.hub.prometheus_port
        metrics = "" if port is None else f"; metrics on http://{config.telemetry.prometheus_host}:{port}/metrics"
        print(f"tensorgate serving on {supervisor.address} ({config.server.resolved_engine()} engine, "
              f"{count} workers, parent pid {os.getpid()}{metrics})", flush=True)

    return await Supervisor(config, config_path, count, listen=listen, verbose=verbose).run(on_ready=ready)


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.config import config_from_mapping, read_config_mapping
    from gateway.workers.role import WorkerRole
    from gateway.security.guard import Guard

    worker = WorkerRole.from_environment()  # set by the parent of several workers
    try:
        mapping = read_config_mapping(args.config)
        config = config_from_mapping(mapping)
        if args.listen:
            config = config.with_listen(args.listen)
        # Credentials are read here once too, so a missing one is exit 2 naming it (on the envoy
        # engine the gateway itself reads them inside Envoy, where it could only fail the start).
        Guard.from_config(config.auth, config.limits)
        count = 1 if worker is not None else _worker_count(args, config)
        if config.server.cpus is not None:
            cpu_pinning.check(config.server.cpus)
    except ConfigError as error:
        print(f"tensorgate: invalid config {args.config}: {error}", file=sys.stderr)
        return EXIT_CONFIG
    _install_loop()
    if count > 1:
        return asyncio.run(_supervise(config, args.config, count, args.listen, args.verbose))
    if config.server.cpus is not None:  # before the engine starts: Envoy and its threads inherit it
        cpu_pinning.pin(cpu_pinning.cpus_for(config.server.cpus, None if worker is None else worker.worker_id))
    asyncio.run(_serve(config, mapping, args.config, worker))
    return 0


def cmd_local_triton(args: argparse.Namespace) -> int:
    from gateway.local.triton import LocalTriton, TritonLaunchError, default_model_repository

    repository = args.model_repository or default_model_repository()
    try:
        triton = LocalTriton(repository, name=args.name, grpc_port=args.grpc_port, http_port=args.http_port,
                             metrics_port=args.metrics_port, host=args.host, log_dir=args.log_dir).start()
    except TritonLaunchError as error:
        print(f"tensorgate: {error}", file=sys.stderr)
        return 1
    print(f"Triton serving {repository} on {triton.grpc_address} (gRPC), {triton.http_address} (HTTP), "
          f"metrics on {triton.metrics_address}; log: {triton.log_path}", flush=True)
    try:
        # sigwait only takes signals that are blocked: unblocked, SIGTERM's default action would end
        # the process at once, without stopping Triton. Blocked now, after Triton was started, so
        # the server does not inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()
    return 0


def cmd_drift_report(args: argparse.Namespace) -> int:
    from gateway.admin.drift_cli import cmd_drift_report as run

    return run(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    _install_loop()
    # The demo narrates failover itself; the gateway's own warnings would interleave with it.
    logging.getLogger("gateway").setLevel(logging.ERROR)
    try:
        return asyncio.run(run_demo(seconds=args.seconds, concurrency=args.concurrency, log_dir=args.log_dir,
                                    engine=args.engine))
    except ConfigError as error:  # e.g. --engine envoy where pyvoy is not installed
        print(f"tensorgate demo: {error}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_bench(args: argparse.Namespace) -> int:
    from gateway.bench.command import run

    return run(args)


def cmd_package(args: argparse.Namespace) -> int:
    from gateway.packaging.cli import cmd_package as run

    return run(args)


def cmd_package_verify(args: argparse.Namespace) -> int:
    from gateway.packaging.cli import cmd_package_verify as run

    return run(args)


def _package_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a model file (.onnx, TorchScript .pt, scikit-learn/XGBoost/LightGBM .joblib or "
                                       ".pkl, XGBoost .json/.ubj, LightGBM .txt) or module:function (NumPy in and out)")
    parser.add_argument("--name", required=True, help="the model's name (its folder in the repository)")
    parser.add_argument("--repo", required=True, help="the Triton model repository to write into")
    parser.add_argument("--kind", default="auto", help="what the source is: onnx, torchscript, sklearn, xgboost, lightgbm or python (default: auto, from its name and content)")
    parser.add_argument("--backend", default="auto",
                        help="auto, onnxruntime, pytorch or python. onnxruntime / pytorch: Triton's framework backend (production images); python: "
                             "tensorgate's Python-based backend running the same file (the wheel's Triton); auto: "
                             "python where the local Triton lacks the framework backend (default)")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="Triton's max_batch_size (default: 64 when the model's first dimension is free, else 0)")
    parser.add_argument("--dynamic-batching", action="store_true", help="let Triton batch requests (dynamic_batching)")
    parser.add_argument("--max-queue-delay-us", type=int, default=0, help="dynamic batching's max queue delay (µs)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME:DTYPE:DIMS",
                        help="declare an input (TorchScript and callables), e.g. x:FP32:-1,4 (-1 = any size); repeat per input")
    parser.add_argument("--output", action="append", default=[], metavar="NAME:DTYPE:DIMS", help="declare an output")
    parser.add_argument("--example", help="an example input (.npy, or .npz keyed by input name) to probe the signature")
    parser.add_argument("--reference", help="drift reference rows (.npy for one input, .npz keyed by input name), "
                                            "stored with the package for a rollout to install")
    parser.add_argument("--version", type=int, help="the version number (default: the next one)")
    parser.add_argument("--audit-log", help="the audit log (default: $TENSORGATE_AUDIT_LOG, else REPO/tensorgate-audit.jsonl)")
    parser.add_argument("--actor", help="who packages (default: $TENSORGATE_ACTOR, else user@host)")
    parser.add_argument("--reason", default="", help="why, for the audit log")
    parser.add_argument("--dockerfile", action="store_true",
                        help="also write a reproducible Docker build context (a tar) for this version")
    parser.add_argument("--context", help="where --dockerfile writes the context (default: NAME-VERSION.context.tar here)")


def _package_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, help="the model repository")
    parser.add_argument("--name", required=True, help="the model")
    parser.add_argument("--version", type=int, help="one version (default: every version)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorgate", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="YAML config file")
    serve.add_argument("--listen", help="override the config's listen address (host:port)")
    serve.add_argument("--workers", help="worker processes on the one port (server.workers): a number, or auto "
                                         "for one per available core; 1 (default) serves in this process")
    serve.set_defaults(run=cmd_serve)

    local = commands.add_parser("local-triton", help="run one local Triton server from the nvidia-pytriton wheel")
    local.add_argument("--model-repository", help="model repository (default: the bundled examples)")
    local.add_argument("--grpc-port", type=int, default=0, help="gRPC port (default: a free one)")
    local.add_argument("--http-port", type=int, default=0,
                       help="HTTP port (default: the gRPC port - 1, as in Triton's 8000/8001, which the gateway's "
                            "HTTP upstream derives; with neither port given, a free pair)")
    local.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (default: a free one)")
    local.add_argument("--host", default="127.0.0.1",
                       help="address every endpoint binds (default 127.0.0.1; 0.0.0.0 in a container)")
    local.add_argument("--name", default="triton")
    local.add_argument("--log-dir")
    local.set_defaults(run=cmd_local_triton)

    drift = commands.add_parser("drift", help="drift monitoring of a running gateway")
    drift_commands = drift.add_subparsers(dest="drift_command", required=True)
    report = drift_commands.add_parser("report", help="print a model's per-feature drift table")
    report.add_argument("--gateway", required=True, help="the gateway's address (host:port)")
    report.add_argument("model")
    report.add_argument("--plot", help="also draw reference vs current histograms of the most drifted features (PNG)")
    report.add_argument("--save-profile", help="save the current window as a reference profile (JSON)")
    report.set_defaults(run=cmd_drift_report)

    from gateway.admin.deploy_cli import add_commands as add_deploy_commands

    add_deploy_commands(commands)

    demo = commands.add_parser("demo", help="two local Tritons as two pools, the gateway in front, traffic through it")
    demo.add_argument("--seconds", type=float, default=15.0, help="how long to drive traffic")
    demo.add_argument("--concurrency", type=int, default=16)
    demo.add_argument("--log-dir", default=None,
                      help="where Triton's and Envoy's logs and the drift captures are kept (default: a temp dir)")
    demo.add_argument("--engine", choices=ENGINES, default="auto",
                      help="what serves the gateway (server.engine): envoy (Envoy's HTTP/2 through pyvoy, the "
                           "gateway's stages inside the Envoy process), h2 (libnghttp2 on this process's event loop), "
                           "grpcio (grpc.aio in this process), or auto: h2 where it is built, else envoy where pyvoy is "
                           "installed, else grpcio (default)")
    demo.set_defaults(run=cmd_demo)

    from gateway.audit import cli as audit_cli

    package = commands.add_parser("package", help="a trained model -> an immutable, versioned Triton model folder")
    _package_arguments(package)
    package.set_defaults(run=cmd_package)
    verify = commands.add_parser("package-verify", help="check packaged versions against their manifests (refuses tampered ones)")
    _package_verify_arguments(verify)
    verify.set_defaults(run=cmd_package_verify)

    audit = commands.add_parser("audit", help="the hash-chained audit log of packages and rollouts")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser("verify", help="check the hash chain; names the first bad line")
    audit_cli.add_arguments(audit_verify)
    audit_verify.set_defaults(run=audit_cli.cmd_verify)
    audit_show = audit_commands.add_parser("show", help="print the records")
    audit_cli.add_show_arguments(audit_show)
    audit_show.set_defaults(run=audit_cli.cmd_show)

    from gateway.bench.command import add_arguments as bench_arguments

    bench = commands.add_parser("bench", help="load sweeps against a KServe v2 gRPC endpoint (the gateway or Triton): "
                                              "throughput, latency percentiles, CSV/JSON/plots")
    bench_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
