"""`make bench`'s record in a smoke run: a pytest-benchmark suite with its baselines, written as a dated
section with the machine and a plot. (A smoke run only: speed is measured by `make bench`, not here.)"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_record_appends_a_dated_section_with_machine_table_and_plot(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    plots = tmp_path / "plots"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), "--quick", "--suites", "bench_validation.py",
                    "--no-sweep", "--results", str(results), "--plots", str(plots)],
                   cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")  # appended, not rewritten
    assert re.search(r"^## `make bench` — \d{4}-\d\d-\d\d \d\d:\d\d UTC", text, re.M)
    assert "Machine: " in text and " CPUs" in text and "Python " in text
    for case in ("bytes_element_count 1 MiB of 1 KiB", "validate_request 1x16 FP32"):
        row = next(line for line in text.splitlines() if line.startswith(case))
        assert re.search(r"\| [\d.]+x$", row), row  # a ratio to the baseline measured in the same run
    image = re.search(r"!\[bench_validation.py\]\((.+\.png)\)", text).group(1)
    assert (results.parent / image).read_bytes().startswith(b"\x89PNG")
