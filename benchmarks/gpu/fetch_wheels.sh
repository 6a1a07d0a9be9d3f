#!/usr/bin/env bash
# Download, here, the wheels benchmarks/gpu/run.sh needs on the GPU machine beyond what its image holds
# (Python 3.12 with PyTorch, numpy 2, grpcio, protobuf, PyYAML, uvloop, Cython, numba, matplotlib;
# /work/.library/device/KINDS.md lists it). That machine has no network: the wheels travel with the
# working tree, in benchmarks/gpu/wheels/ (git-ignored). Pure-Python wheels are taken for any
# platform; the rest as manylinux x86-64 builds for CPython 3.12. Versions are the ones .venv runs.
# nvidia-pytriton (the Triton server binary, ~55 MB) is most of it: the working tree that travels
# is limited to 64 MiB in all.
#
#   benchmarks/gpu/fetch_wheels.sh            # then, on the GPU machine: benchmarks/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
PIP="${PIP:-python3 -m pip}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_35_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_24_x86_64)
# Not in the GPU image: the Triton server, the gateway's HTTP parser, health/reflection services and
# OpenTelemetry (the telemetry stage imports the SDK).
wheels=(
  nvidia-pytriton==0.7.0
  httptools==0.9.0
  grpcio-health-checking==1.81.1
  grpcio-reflection==1.81.1
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-prometheus==0.66b2
  opentelemetry-exporter-otlp-proto-grpc==1.45.2
  opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-proto==1.45.2
  googleapis-common-protos==1.76.0
  importlib_metadata==10.2.0
)
for wheel in "${wheels[@]}"; do
  $PIP download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d wheels "$wheel"
done
du -sh wheels
ls wheels
