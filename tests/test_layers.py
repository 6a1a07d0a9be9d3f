"""The package reads bottom to top: no import cycle, and no import from a lower layer to a higher one.

The layer table is the one in docs/architecture.md (between the `layers:begin` and `layers:end`
markers): the map of the code is also the rule the code is held to. A module may import modules of
its own package, and of any package in a lower layer; never a sibling package of its own layer,
never a higher one. Every import counts, including those inside functions and under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from gateway.ext import batching_py
from gateway.protocol.tensors import CONTENTS_FIELD, ELEMENT_BYTES, NUMPY_DTYPES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gateway"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_table() -> dict[str, int]:
    """{unit: layer} from the architecture doc: rows `| N | `a`, `b` | ... |` between the markers."""
    text = ARCHITECTURE.read_text()
    table = text[text.index("<!-- layers:begin -->"):text.index("<!-- layers:end -->")]
    layers = {}
    for line in table.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            for unit in re.findall(r"`([a-z_.]+)`", match.group(2)):
                layers[unit] = int(match.group(1))
    return layers


def unit_of(module: str) -> str:
    """The layer unit of a module: `gateway.X` for X a package or a top-level module; gateway.ext is `ext`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gateway"


def gateway_modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = list(relative.parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    for path in (ROOT / "ext").rglob("*.py"):  # built into gateway.ext
        parts = ["gateway", "ext", *path.relative_to(ROOT / "ext").with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imports_of(path: Path, module: str) -> set[str]:
    """Every gateway module `path` imports, anywhere in it."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "gateway" or name.startswith("gateway.")}


def import_graph() -> dict[str, set[str]]:
    modules = gateway_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in imports_of(path, module):
            while name not in modules and "." in name:  # `from pkg import name` names an attribute
                name = name.rpartition(".")[0]
            if name in modules and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def test_every_unit_has_a_layer():
    layers = layer_table()
    units = {unit_of(m) for m in gateway_modules()} - {"gateway", "__main__"}
    assert units - set(layers) == set(), "add these to the layer table in docs/architecture.md"
    assert set(layers) - units == set(), "the layer table names units that do not exist"


def layer_violations(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    violations = []
    for module, targets in graph.items():
        unit = unit_of(module)
        if unit in ("gateway", "__main__"):
            continue
        for target in targets:
            other = unit_of(target)
            if other == unit or other == "gateway":
                continue
            if layers[other] > layers[unit]:
                violations.append(f"{module} (layer {layers[unit]}) imports {target} (higher layer {layers[other]})")
            elif layers[other] == layers[unit]:
                violations.append(f"{module} imports {target}: sibling units of layer {layers[unit]}")
    return violations


def cycles_of(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(" → ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_no_import_goes_up_or_sideways():
    assert layer_violations(import_graph(), layer_table()) == []


def test_no_import_cycle():
    assert cycles_of(import_graph()) == []


def test_the_checks_fail_when_broken(tmp_path):
    """Each check fails on a broken package: an upward import, a sideways one, a cycle."""
    layers = layer_table()
    bad = tmp_path / "bad.py"
    bad.write_text("from gateway.batching.dispatcher import BatchingDispatcher\n")
    assert imports_of(bad, "gateway.routing.bad") == {"gateway.batching.dispatcher", "gateway.batching.dispatcher.BatchingDispatcher"}
    upward = {"gateway.routing.bad": {"gateway.batching.dispatcher"}}
    assert layer_violations(upward, layers) == [
        f"gateway.routing.bad (layer {layers['routing']}) imports gateway.batching.dispatcher "
        f"(higher layer {layers['batching']})"
    ]
    assert len(layer_violations({"gateway.drift.x": {"gateway.telemetry.y"}}, layers)) == 1
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a → b → c → a"]


# ---- the kernels' datatype tables agree with gateway/protocol/tensors.py -------------------------

def typed_numeric() -> dict[str, int]:
    """Datatypes with a typed contents field and a numpy dtype: what the typed→raw kernels convert."""
    return {name: ELEMENT_BYTES[name] for name in CONTENTS_FIELD if name in NUMPY_DTYPES}


@pytest.mark.parametrize("kernels", ["cython", "numpy"])
def test_kernel_datatype_tables_agree_with_the_protocol(kernels):
    if kernels == "cython":
        batching = pytest.importorskip("gateway.ext.batching")
        table = batching.DATATYPE_ITEMSIZE
    else:
        table = batching_py.DATATYPE_ITEMSIZE
    assert table == typed_numeric()
    for name, dtype in NUMPY_DTYPES.items():
        assert dtype().itemsize == ELEMENT_BYTES[name], name
