"""`make bench`'s record: the pytest-benchmark suites and a `tensorgate bench` sweep, written to RESULTS.md.

    python benchmarks/record.py [--quick] [--suites bench_kernels.py,...] [--no-sweep]
                                [--results benchmarks/RESULTS.md] [--plots benchmarks/plots]

1. Runs the kernel suites under pytest-benchmark (bench_kernels.py: gather, scatter, BYTES;
   bench_validation.py: BYTES walks and request validation; bench_drift.py: histogram and drift
   statistics), each case with its NumPy/memcpy baseline in the same run, and keeps the JSON.
2. Sweeps direct Triton and the gateway in front of it with `tensorgate bench --compare`
   (simple_scale, 1×16 FP32, concurrency 1, 8, 64), its latency/throughput plot beside.
3. Appends a dated section to RESULTS.md: the machine, the commands, a table per suite (best time
   of each implementation, ratio to the baseline), the sweep's table and ratios, and the plots
   (PNG files under --plots, referenced from the section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from gateway.bench.measure import format_time, machine, table  # noqa: E402

SUITES = ["bench_kernels.py", "bench_validation.py", "bench_drift.py"]
#: The implementation each suite calls its subject by.
SUBJECTS = ("cython", "numba", "kernel")


def run_suite(suite: str, json_path: Path, quick: bool) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / suite), "--benchmark-only",
               f"--benchmark-json={json_path}", "-o", "testpaths=benchmarks", "--timeout=1200"]
    if suite == "bench_drift.py":
        command.append("--benchmark-timer=time.process_time")  # its own advice: CPU time, see its docstring
    if quick:
        command += ["--benchmark-min-rounds=3", "--benchmark-max-time=0.02", "--benchmark-warmup=off"]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=ROOT, check=True)


def suite_rows(document: dict) -> tuple[list[list[str]], dict[str, dict[str, float]]]:
    """One row per case: each implementation's best time, and the subject's ratio to the baseline."""
    times: dict[str, dict[str, float]] = defaultdict(dict)
    for entry in document["benchmarks"]:
        implementation = entry["params"].get("implementation", entry["name"])
        times[entry["group"]][implementation] = entry["stats"]["min"]
    rows = []
    for group, got in times.items():
        subject = next((name for name in SUBJECTS if name in got), None)
        baseline = got.get("baseline")
        ratio = "-" if subject is None or baseline is None else f"{baseline / got[subject]:.2f}x"
        cells = [format_time(got[name]) if name in got else "-" for name in (subject, "twin", "baseline")]
        rows.append([group, *cells, ratio])
    return rows, times


def plot_ratios(path: Path, suite: str, times: dict[str, dict[str, float]]) -> None:
    """Each implementation's best time relative to the case's baseline (log scale; < 1: faster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [group for group, got in times.items() if "baseline" in got]
    if not groups:
        return
    implementations = [name for name in (*SUBJECTS, "twin") if any(name in times[g] for g in groups)]
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(groups) * len(implementations) + 1.5), dpi=100)
    height = 0.8 / len(implementations)
    for index, name in enumerate(implementations):
        ys = [position + index * height for position in range(len(groups))]
        values = [times[g][name] / times[g]["baseline"] if name in times[g] else math.nan for g in groups]
        axes.barh(ys, values, height=height, label=name)
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_yticks([position + 0.4 - height / 2 for position in range(len(groups))], groups, fontsize=7)
    axes.set_xlabel("time / baseline's time (log; left of 1: faster than the baseline)")
    axes.set_title(f"{suite}: best time relative to the baseline, same run")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def sweep(plots: Path, stamp: str, quick: bool, results_folder: Path) -> list[str]:
    """Direct Triton vs the gateway in front of it, with `tensorgate bench --compare`: the section's lines."""
    from gateway.local.triton import LocalTriton, default_model_repository, find_free_port

    lines = []
    with tempfile.TemporaryDirectory(prefix="tensorgate-record-") as folder, \
            LocalTriton(default_model_repository(), name="record", log_dir=folder) as triton:
        port = find_free_port()
        config = Path(folder) / "gateway.yaml"
        config.write_text(f"listen: 127.0.0.1:{port}\npools:\n  cpu: {{backends: [\"{triton.grpc_address}\"]}}\n")
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_serving(f"127.0.0.1:{port}", gateway)
            png = plots / f"sweep-{stamp}.png"
            window = ["--measurement-interval", "0.5", "--max-trials", "3"] if quick else \
                     ["--measurement-interval", "2", "--max-trials", "8"]
            command = ["bench", triton.grpc_address, "--model", "simple_scale", "--compare", f"127.0.0.1:{port}",
                       "--concurrency", "1,8,64", *window, "--plot", os.path.relpath(png, ROOT), "--quiet"]
            print("$ tensorgate " + " ".join(command), flush=True)
            done = subprocess.run([sys.executable, "-m", "gateway", *command], cwd=ROOT, capture_output=True,
                                  text=True, check=True)
            print(done.stdout, flush=True)
        finally:
            gateway.terminate()
            gateway.wait(30)
    lines += ["### Direct Triton vs the gateway (`tensorgate bench --compare`)", "",
              f"Command: `tensorgate {' '.join(command)}` (first target: a local Triton from the wheel, "
              f"`simple_scale`, 1×16 FP32; second: `tensorgate serve` in front of it, default config). "
              f"Client, gateway and Triton share this machine's cores.", "", "```", done.stdout.strip(), "```", "",
              f"![latency against throughput]({os.path.relpath(png, results_folder)})", ""]
    return lines


def _wait_serving(address: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    import grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with code {process.returncode}")
        try:
            with grpc.insecure_channel(address) as channel:
                grpc.channel_ready_future(channel).result(timeout=1)
                return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
    raise RuntimeError(f"the gateway did not serve on {address} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few, short rounds (a smoke run, not a measurement)")
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated suites in benchmarks/")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tensorgate bench sweep")
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"), help="the file the section is appended to")
    parser.add_argument("--plots", default=str(HERE / "plots"), help="where the PNG files go")
    args = parser.parse_args(argv)
    now = datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M")
    plots = Path(args.plots)
    plots.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = [f"## `make bench` — {now:%Y-%m-%d %H:%M} UTC{' (--quick: a smoke run, not a measurement)' if args.quick else ''}",
             "", f"Machine: {machine('numpy', 'numba', 'grpc')}. Code: commit `{commit.strip() or 'unknown'}`. "
             "The load average is read at the start: other sessions share this machine, so absolute times move "
             "between runs; the ratios, measured in the same run, are the figures to compare.", ""]
    with tempfile.TemporaryDirectory(prefix="tensorgate-bench-json-") as folder:
        for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
            json_path = Path(folder) / f"{suite}.json"
            run_suite(suite, json_path, args.quick)
            rows, times = suite_rows(json.loads(json_path.read_text()))
            png = plots / f"{Path(suite).stem}-{stamp}.png"
            plot_ratios(png, suite, times)
            lines += [f"### {suite}", "",
                      f"Command: `pytest benchmarks/{suite} --benchmark-only` (best time of each implementation "
                      f"over pytest-benchmark's rounds; ratio = baseline time / kernel time, above 1: faster than "
                      f"the baseline; the baseline is named in the suite's docstring).", "",
                      "```", table(["case", "kernel", "twin", "baseline", "ratio"], rows), "```", ""]
            if png.exists():
                lines += [f"![{suite}]({os.path.relpath(png, results_path.parent)})", ""]
    failed = False
    if not args.no_sweep:
        try:
            lines += sweep(plots, stamp, args.quick, results_path.parent)
        except Exception as error:  # noqa: BLE001 - the suites' figures are kept, the failure said
            failed = True
            lines += ["### Direct Triton vs the gateway (`tensorgate bench --compare`)", "",
                      f"Not measured in this run: {type(error).__name__}: {str(error).splitlines()[0]}", ""]
    with results_path.open("a") as file:
        file.write("\n" + "\n".join(lines) + "\n")
    print(f"appended a section to {results_path}; plots in {plots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
