# tensorgate — `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip

.PHONY: demo test test-tools native-libs bench install protos compile clean

# The venv is (re)built when the project's dependency list changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=77" wheel
	# grpcio-tools 1.82+ needs protobuf 7, while opentelemetry-proto (OTLP export) needs protobuf < 7.
	$(PIP) install --quiet "Cython>=3.0" "numpy>=1.24,<2" "grpcio-tools>=1.66,<1.82"
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

# The protocol descriptor set, rebuilt whenever a .proto changes (setup.py compiles what is stale).
DESCRIPTORS := gateway/protocol/tensorgate.binpb
$(DESCRIPTORS): $(STAMP) $(wildcard protos/*.proto)
	$(PY) setup.py --name >/dev/null
	touch $(DESCRIPTORS)

# The Cython kernels and the h2 engine's HTTP/2 server, rebuilt in place whenever a .pyx, .pxd or .h
# changes (a fresh .venv builds them).
KERNELS := .venv/.kernels
$(KERNELS): $(STAMP) $(wildcard ext/*.pyx ext/*.pxd ext/*.h) | native-libs
	$(PY) setup.py build_ext --inplace --quiet
	touch $(KERNELS)

install: $(STAMP) $(DESCRIPTORS) $(KERNELS)

# Regenerate the protocol descriptor set from protos/ unconditionally.
protos: $(STAMP)
	rm -f $(DESCRIPTORS)
	$(PY) setup.py --name >/dev/null

# Rebuild the Cython kernels in place after editing ext/*.pyx.
compile: $(STAMP)
	$(PY) setup.py build_ext --inplace --quiet

demo: $(STAMP) $(DESCRIPTORS) $(KERNELS)
	$(VENV)/bin/tensorgate demo

test: $(STAMP) $(DESCRIPTORS) $(KERNELS) test-tools
	$(PY) -m pytest -q

# Install a Debian package for a tool the project needs: as root directly, else through sudo.
# $(call debian_install,PACKAGE,WHAT NEEDS IT,EXIT STATUS WHEN IT CANNOT: 1 stops make, 0 goes on)
define debian_install
if ! command -v apt-get >/dev/null; then \
	echo "make: the Debian package $(1) is missing and there is no apt-get here ($(2)); install its equivalent, then re-run make" >&2; exit $(3); \
fi; \
if [ "$$(id -u)" = 0 ]; then SUDO=; \
elif command -v sudo >/dev/null; then SUDO=sudo; \
else echo "make: the Debian package $(1) is missing ($(2)); install it as root: apt-get install $(1)" >&2; exit $(3); \
fi; \
echo "make: installing the Debian package $(1) ($(2))"; \
$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null
endef

# libnghttp2's shared library, which ext/h2server links (the h2 engine, the default): on every Debian
# and Ubuntu that has curl; installed from Debian's libnghttp2-14 where it is missing. Without it,
# setup.py builds the rest and `server.engine: auto` serves on envoy instead.
NGHTTP2 := libnghttp2.so.14
native-libs:
	@if $(PYTHON) -c "import ctypes; ctypes.CDLL('$(NGHTTP2)')" 2>/dev/null; then exit 0; fi; \
	$(call debian_install,libnghttp2-14,the h2 engine links $(NGHTTP2),0)

# What the tests need beside .venv: a real Prometheus server (tests/test_telemetry.py runs
# $(PROMETHEUS)), from the Debian package `prometheus`, installed when it is missing; without it,
# stop and say what to install. And kubectl, whose built-in kustomize (v5) renders deploy/k8s
# (tests/test_deploy_k8s.py): on the project's machines already; Debian's own kubectl (1.20) embeds
# a kustomize too old for the overlays.
PROMETHEUS := /usr/bin/prometheus
test-tools:
	@command -v kubectl >/dev/null || { echo "make test: kubectl is missing; tests/test_deploy_k8s.py renders deploy/k8s with its built-in kustomize: install kubectl 1.27 or newer (https://kubernetes.io/docs/tasks/tools/), then re-run make test" >&2; exit 1; }
	@if [ -x $(PROMETHEUS) ]; then exit 0; fi; \
	$(call debian_install,prometheus,the telemetry tests run a real Prometheus server at $(PROMETHEUS),1)

# benchmarks/record.py runs the kernel suites (kernels, validation, drift) under pytest-benchmark and a
# `tensorgate bench` sweep, and appends a dated section (machine, tables, plots) to benchmarks/RESULTS.md.
bench: $(STAMP) $(DESCRIPTORS) $(KERNELS)
	$(PY) benchmarks/record.py
	$(PY) benchmarks/bench_telemetry.py
	$(PY) benchmarks/bench_drift_observe.py
	$(PY) benchmarks/bench_hot_path.py
	$(PY) benchmarks/bench_app_inprocess.py --telemetry
	$(PY) benchmarks/bench_engines.py
	$(PY) benchmarks/bench_gateway.py
	$(PY) benchmarks/bench_upstream.py
	$(PY) benchmarks/bench_upstream_socket.py

clean:
	rm -rf build *.egg-info ext/*.c ext/*.so gateway/protocol/*.binpb .pytest_cache
