#!/usr/bin/env bash
# The GPU path, measured with `tensorgate bench` in one run of under 8 minutes (benchmarks/gpu/scenario.py):
# direct GPU Triton with and without its dynamic batcher vs the gateway (rows/s, latency percentiles at
# concurrency 1, 32, 256), then the spill scenario (GPU pool past its SLO, the CPU pool takes the excess).
#
#   benchmarks/gpu/run.sh                  # on a GPU machine (x86-64, NVIDIA H100/H200, Python 3.12 + PyTorch)
#   benchmarks/gpu/run.sh --cpu --short    # anywhere: every Triton on the CPU, a small NumPy MLP, short
#                                          # steps (tests/test_bench_gpu_script.py runs this)
#   benchmarks/gpu/run.sh --out DIR        # where results go (default benchmarks/gpu/out)
#
# On the GPU machine (no network) it needs, beside the image's own packages: the wheels of
# benchmarks/gpu/wheels/ (made here by benchmarks/gpu/fetch_wheels.sh; git-ignored, so carried
# explicitly) and the protocol descriptor set gateway/protocol/tensorgate.binpb (built here by
# `make install`; git-ignored too). With the device tool:
#   carry: ["benchmarks/gpu/wheels", "gateway/protocol/tensorgate.binpb"]
#   command: "bash benchmarks/gpu/run.sh --out $OUT/gpu"
# The Cython kernels are compiled there for its Python (the image has Cython), in under a minute.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"

if [ -x .venv/bin/python ]; then
  PY="$ROOT/.venv/bin/python"
else
  PY="${PYTHON:-python3}"
fi

# Wheels that travelled with the tree, into a folder of their own (never over the image's packages).
if [ -d benchmarks/gpu/wheels ] && ! "$PY" -c "import pytriton" 2>/dev/null; then
  SITE="${TMPDIR:-/tmp}/tensorgate-gpu-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    benchmarks/gpu/wheels/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The kernels, built in place for this Python where they are missing. The descriptor set must have
# travelled: building it needs grpcio-tools, which the GPU image lacks (touched, so setup.py does not
# try to rebuild it from protos/).
if ! "$PY" -c "import gateway.ext.batching" 2>/dev/null; then
  if [ ! -f gateway/protocol/tensorgate.binpb ]; then
    echo "run.sh: gateway/protocol/tensorgate.binpb is missing: build it with make install and carry it" >&2
    exit 2
  fi
  touch gateway/protocol/tensorgate.binpb
  "$PY" setup.py -q build_ext --inplace >/dev/null
fi

# 8 minutes for everything, whatever goes wrong; scenario.py stops what it started on the way out.
exec timeout --signal=INT --kill-after=20 480 "$PY" benchmarks/gpu/scenario.py "$@"
