# tensorgate — `make demo` and `make test` each set up .venv on first use, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip

.PHONY: demo test bench install protos compile clean

# The venv is (re)built when the project's dependency list changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip "setuptools>=77" wheel
	# grpcio-tools 1.82+ needs protobuf 7, while opentelemetry-proto (OTLP export) needs protobuf < 7.
	$(PIP) install --quiet "Cython>=3.0" "numpy>=1.24,<2" "grpcio-tools>=1.66,<1.82"
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

# Regenerate the protocol descriptor set from protos/ (also done by every install).
protos: $(STAMP)
	rm -f gateway/protocol/tensorgate.binpb
	$(PY) setup.py --name >/dev/null

# Rebuild the Cython kernels in place after editing ext/*.pyx.
compile: $(STAMP)
	$(PY) setup.py build_ext --inplace --quiet

demo: $(STAMP)
	$(VENV)/bin/tensorgate demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_drift.py
	$(PY) benchmarks/bench_telemetry.py
	$(PY) benchmarks/bench_hot_path.py
	$(PY) benchmarks/bench_gateway.py

clean:
	rm -rf build *.egg-info ext/*.c ext/*.so gateway/protocol/*.binpb .pytest_cache
