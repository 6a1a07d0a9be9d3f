"""The GPU path, measured with `tensorgate bench` (run by benchmarks/gpu/run.sh; see its header).

    python benchmarks/gpu/scenario.py [--cpu] [--short] [--out DIR] [--gateway-workers N]

1. Three Tritons from the nvidia-pytriton wheel, each serving `mlp` (an fp32 MLP through the Python
   backend, benchmarks/gpu/mlp_model.py):
     gpu-batched  on the GPU, Triton's dynamic batcher on (max_queue_delay 500 µs)
     gpu-plain    on the GPU, no dynamic batcher
     cpu          on the CPU, dynamic batcher on
   With --cpu every one runs on the CPU (and with --short, a small MLP in NumPy).
2. The gateway (`tensorgate serve`, grpcio engine, `server.workers: --gateway-workers`) with
   pools `gpu` (gpu-plain: the gateway batches) and `cpu`, model `mlp` on [gpu].
3. `tensorgate bench gpu-batched --compare gpu-plain --compare gateway --concurrency 1,32,256`:
   rows/s and latency percentiles, ratios to Triton with its own batcher.
4. Spill: a second gateway with `models.mlp.latency_slo_ms` and the pools' `cost` (SLO-aware
   placement): open-loop load at 1.5x what the gateway served at the top concurrency; the CPU pool
   should take the excess and the SLO hold. Where the gateway does not know those keys (it refuses
   the config), the step says so and is skipped.

Writes DIR/compare.{json,csv,png}, DIR/spill.json and DIR/summary.md (printed at the end).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.local.triton import LocalTriton, find_free_port  # noqa: E402

MODEL_SOURCE = Path(__file__).with_name("mlp_model.py")
FULL_SIZES = (1024, 4096, 1024)
SHORT_CPU_SIZES = (64, 256, 64)

CONFIG_TEMPLATE = """name: "mlp"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ {size_in} ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ {size_out} ] }} ]
instance_group [ {{ kind: {kind} count: {count} }} ]
parameters: [
  {{ key: "in" value: {{ string_value: "{size_in}" }} }},
  {{ key: "hidden" value: {{ string_value: "{hidden}" }} }},
  {{ key: "out" value: {{ string_value: "{size_out}" }} }},
  {{ key: "backend" value: {{ string_value: "{backend}" }} }},
  {{ key: "python_path" value: {{ string_value: "{python_path}" }} }}
]
{batching}
"""


def write_repository(folder: Path, *, kind: str, dynamic_batching: bool, sizes, backend: str, count: int = 1) -> Path:
    model = folder / "mlp"
    (model / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(MODEL_SOURCE, model / "1" / "model.py")
    batching = "dynamic_batching { max_queue_delay_microseconds: 500 }" if dynamic_batching else ""
    (model / "config.pbtxt").write_text(CONFIG_TEMPLATE.format(
        max_batch=256, size_in=sizes[0], hidden=sizes[1], size_out=sizes[2], kind=kind, count=count,
        backend=backend, batching=batching, python_path=os.environ.get("PYTHONPATH", "")))
    return folder


def statistics(target: str, rows: bool = False) -> int:
    """Requests Triton answered successfully for `mlp` (its ModelStatistics); with `rows`, the rows
    it inferred (`inference_count`: a batch the gateway formed is one request of many rows)."""
    from gateway.protocol import pb

    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")
        reply = pb.ModelStatisticsResponse.FromString(call(pb.ModelStatisticsRequest(name="mlp").SerializeToString(),
                                                           timeout=10))
    if rows:
        return sum(stats.inference_count for stats in reply.model_stats)
    return sum(stats.inference_stats.success.count for stats in reply.model_stats)


def yaml_config(listen: str, pools: dict[str, list[str]], workers: int, extra: str = "") -> str:
    # grpcio: the GPU image has no pyvoy; workers: gateway processes sharing the port.
    lines = [f"listen: {listen}", f"server: {{engine: grpcio, workers: {workers}}}", "pools:"]
    for name, backends in pools.items():
        lines.append(f"  {name}: {{backends: {json.dumps(backends)}}}")
    lines.append("health: {interval_s: 1.0, timeout_s: 2.0}")
    lines.append("batching: {default: {mode: adaptive, max_queue_delay_us: 500}}")
    return "\n".join(lines) + "\n" + extra


class Gateway:
    """`tensorgate serve` with the config's `server.workers` processes on one port (gateway/workers/)."""

    def __init__(self, config_path: Path, port: int, log_dir: Path) -> None:
        self.address = f"127.0.0.1:{port}"
        log = open(log_dir / f"{config_path.stem}.log", "w")
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)]

    def wait_ready(self, timeout: float = 120.0) -> str | None:
        """None once it serves `mlp`, else why not (a process exited: its code and log tail)."""
        from gateway.protocol import pb

        deadline = time.monotonic() + timeout
        request = pb.ModelMetadataRequest(name="mlp").SerializeToString()
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    return f"a gateway process exited with code {process.returncode}"
            try:
                with grpc.insecure_channel(self.address) as channel:
                    channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata")(request, timeout=2)
                return None
            except grpc.RpcError:
                time.sleep(0.5)
        return f"the gateway did not serve mlp within {timeout:.0f} s"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def bench(arguments: list[str], timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "gateway", "bench", *arguments]
    print("$ tensorgate bench " + " ".join(arguments), flush=True)
    done = subprocess.run(command, cwd=ROOT, text=True, stdout=subprocess.PIPE, timeout=timeout)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise SystemExit(f"tensorgate bench failed with code {done.returncode}")
    return done


def machine_text(cpu_mode: bool) -> str:
    gpu = "none (--cpu)"
    if not cpu_mode and shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() or "nvidia-smi printed nothing"
    try:
        import torch
        torch_text = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    except ImportError:
        torch_text = "no torch"
    import numpy
    from gateway.bench.measure import cpu_model
    from gateway.server import interpreter

    return (f"{cpu_model()}, {os.cpu_count()} CPUs; GPU: {gpu}; {interpreter.describe()}, "
            f"numpy {numpy.__version__}, grpcio {grpc.__version__}, {torch_text}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="every Triton on the CPU (no GPU needed)")
    parser.add_argument("--short", action="store_true", help="a short run: small steps, short windows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu" / "out"), help="where results go")
    parser.add_argument("--gateway-workers", type=int, default=None,
                        help="gateway processes on one port (default: 1 with --cpu, else 4)")
    parser.add_argument("--model-backend", choices=["torch", "numpy"], default=None,
                        help="what runs the MLP inside Triton (default: numpy with --cpu --short, else torch)")
    parser.add_argument("--bench-workers", type=int, default=None, help="load processes (default: 1 with --cpu, else 4)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()

    small = args.cpu and args.short
    sizes = SHORT_CPU_SIZES if small else FULL_SIZES
    backend = args.model_backend or ("numpy" if small else "torch")
    gpu_kind = "KIND_CPU" if args.cpu else "KIND_GPU"
    gateway_workers = args.gateway_workers or (1 if args.cpu else 4)
    bench_workers = args.bench_workers or (1 if args.cpu else 4)
    levels = "1,8" if args.short else "1,32,256"
    window = ["--measurement-interval", "0.5", "--max-trials", "4", "--warmup", "0.3"] if args.short else \
             ["--measurement-interval", "2", "--max-trials", "6", "--warmup", "1", "--step-timeout", "20"]

    repos = out / "repos"
    shutil.rmtree(repos, ignore_errors=True)
    tritons = {
        "gpu-batched": LocalTriton(write_repository(repos / "gpu-batched", kind=gpu_kind, dynamic_batching=True,
                                                    sizes=sizes, backend=backend), name="gpu-batched", log_dir=logs),
        "gpu-plain": LocalTriton(write_repository(repos / "gpu-plain", kind=gpu_kind, dynamic_batching=False,
                                                  sizes=sizes, backend=backend), name="gpu-plain", log_dir=logs),
        "cpu": LocalTriton(write_repository(repos / "cpu", kind="KIND_CPU", dynamic_batching=True, sizes=sizes,
                                            backend=backend), name="cpu", log_dir=logs),
    }
    gateways: list[Gateway] = []
    summary = [f"# GPU path ({'--cpu ' if args.cpu else ''}{'--short' if args.short else ''})".rstrip(), "",
               f"machine: {machine_text(args.cpu)}", f"model: fp32 MLP {sizes[0]}->{sizes[1]}->{sizes[2]} ({backend}), "
               f"gateway processes: {gateway_workers}, load processes: {bench_workers}", ""]
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda triton: triton.start(timeout=180), tritons.values()))
        print(f"Tritons up in {time.monotonic() - started:.1f} s: "
              + ", ".join(f"{name} {t.grpc_address}" for name, t in tritons.items()), flush=True)

        config = out / "gateway.yaml"
        port = find_free_port()
        config.write_text(yaml_config(f"127.0.0.1:{port}", {"gpu": [tritons["gpu-plain"].grpc_address],
                                                             "cpu": [tritons["cpu"].grpc_address]},
                                      gateway_workers, "models:\n  mlp: {pools: [gpu]}\n"))
        gateway = Gateway(config, port, logs)
        gateways.append(gateway)
        problem = gateway.wait_ready()
        if problem:
            raise SystemExit(f"gateway: {problem} (logs in {logs})")

        before = {name: statistics(t.grpc_address) for name, t in tritons.items()}
        bench([tritons["gpu-batched"].grpc_address, "--model", "mlp", "--compare", tritons["gpu-plain"].grpc_address,
               "--compare", gateway.address, "--concurrency", levels, "--workers", str(bench_workers), *window,
               "--json", str(out / "compare.json"), "--csv", str(out / "compare.csv"), "--plot", str(out / "compare.png"),
               "--quiet"], timeout=400)
        after = {name: statistics(t.grpc_address) for name, t in tritons.items()}
        compare = json.loads((out / "compare.json").read_text())
        names = {tritons["gpu-batched"].grpc_address: "GPU Triton, dynamic batcher",
                 tritons["gpu-plain"].grpc_address: "GPU Triton, no batcher",
                 gateway.address: "gateway (batching) -> GPU Triton, no batcher"}
        summary += ["## Direct GPU Triton vs the gateway", "",
                    "| target | concurrency | req/s (= rows/s) | p50 ms | p90 ms | p99 ms | errors | stable |",
                    "|---|---|---|---|---|---|---|---|"]
        for step in compare["steps"]:
            summary.append(f"| {names[step['target']]} | {step['level']:g} | {step['throughput']:,.0f} | "
                           f"{step['p50_ms']:.2f} | {step['p90_ms']:.2f} | {step['p99_ms']:.2f} | "
                           f"{sum(step['errors'].values())} | {'yes' if step['stable'] else 'no'} |")
        counted = {name: after[name] - before[name] for name in tritons}
        harness_direct = sum(s["answered_total"] for s in compare["steps"]
                             if s["target"] == tritons["gpu-batched"].grpc_address)
        # gpu-plain also serves the gateway's (batched) requests, so only gpu-batched's count is the harness's alone.
        summary += ["", f"Requests GPU Triton with its batcher counted (ModelStatistics): {counted['gpu-batched']:,}; "
                        f"tensorgate bench counted {harness_direct:,} answers from it.", ""]
        (out / "counts.json").write_text(json.dumps({"triton": counted, "harness_gpu_batched": harness_direct}))

        summary += spill(args, tritons, compare, gateway.address, out, logs, gateway_workers, bench_workers, window,
                         gateways)
    finally:
        for gateway in gateways:
            gateway.stop()
        for triton in tritons.values():
            triton.stop()
    summary.append(f"\ntotal: {time.monotonic() - started:.0f} s")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0


def spill(args, tritons, compare, gateway_address, out, logs, gateway_workers, bench_workers, window, gateways):
    """The spill scenario (see the module's docstring); its lines of the summary."""
    lines = ["## Spill: the GPU pool past its SLO, the CPU pool takes the excess", ""]
    top = max((s for s in compare["steps"] if s["target"] == gateway_address), key=lambda s: s["level"])
    low = min((s for s in compare["steps"] if s["target"] == gateway_address), key=lambda s: s["level"])
    slo_ms = max(4 * low["p99_ms"], 10.0)
    rate = max(1.5 * top["throughput"], 10.0)
    config = out / "gateway-spill.yaml"
    port = find_free_port()
    config.write_text(yaml_config(
        f"127.0.0.1:{port}",
        {"gpu": [tritons["gpu-plain"].grpc_address], "cpu": [tritons["cpu"].grpc_address]}, gateway_workers,
        # SLO-aware placement (README, "Placement"): each request goes to the cheapest pool predicted
        # to meet the model's objective. Per request the GPU pool is the cheaper one; the CPU pool
        # takes what the GPU pool cannot serve within the objective.
        f"models:\n  mlp: {{pools: [gpu, cpu], latency_slo_ms: {slo_ms:.1f}}}\n"
    ).replace("  gpu: {backends:", "  gpu: {cost: 1, backends:")
     .replace("  cpu: {backends:", "  cpu: {cost: 4, backends:"))
    gateway = Gateway(config, port, logs)
    gateways.append(gateway)
    problem = gateway.wait_ready(timeout=60)
    if problem:
        log = (logs / f"{config.stem}.log").read_text()[-600:]
        lines += [f"Skipped: the gateway refused {config.name} ({problem}). The spill scenario needs the SLO-aware "
                  f"placement (`models.NAME.latency_slo_ms`, `pools.NAME.cost`); the config is in {config}.", "",
                  "```", log.strip(), "```"]
        json.dump({"skipped": problem, "config": config.read_text()}, open(out / "spill.json", "w"), indent=1)
        return lines
    before = {name: statistics(t.grpc_address, rows=True) for name, t in tritons.items()}
    bench([gateway.address, "--model", "mlp", "--rate", f"{rate:.0f}", "--workers", str(bench_workers), *window,
           "--json", str(out / "spill-bench.json"), "--quiet"], timeout=200)
    after = {name: statistics(t.grpc_address, rows=True) for name, t in tritons.items()}
    step = json.loads((out / "spill-bench.json").read_text())["steps"][0]
    served = {"gpu": after["gpu-plain"] - before["gpu-plain"], "cpu": after["cpu"] - before["cpu"]}
    held = step["p99_ms"] <= slo_ms
    lines += [f"Open loop at {rate:,.0f} req/s (1.5x the gateway's {top['throughput']:,.0f} req/s at concurrency "
              f"{top['level']:g}), SLO {slo_ms:.1f} ms (4x the p99 at concurrency {low['level']:g}):", "",
              f"- answered {step['throughput']:,.0f} req/s, p50 {step['p50_ms']:.2f} ms, p99 {step['p99_ms']:.2f} ms "
              f"(SLO {'held' if held else 'MISSED'}), errors {step['errors'] or 0}",
              f"- rows inferred by the GPU pool {served['gpu']:,}, by the CPU pool {served['cpu']:,} "
              f"({served['cpu'] / max(1, served['gpu'] + served['cpu']):.0%} spilled)"]
    json.dump({"rate": rate, "slo_ms": slo_ms, "served": served, "step": step, "slo_held": held},
              open(out / "spill.json", "w"), indent=1)
    return lines


if __name__ == "__main__":
    sys.exit(main())
