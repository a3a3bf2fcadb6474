"""The package's import graph, read from the source: no cycle, and the layers point one way.

Every ``import`` statement counts, including those inside functions (a lazy import hides a
cycle from the interpreter, not from a reader). ``cli`` names command modules as strings, so
it adds no edge.
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOTS = {
    "flystage": Path(__file__).resolve().parents[1] / "code" / "flystage",
    "flystage_local": Path(__file__).resolve().parents[1] / "local" / "flystage_local",
}


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for both packages."""
    found = {}
    for package, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name``'s source imports; ``from a import b`` counts ``a.b`` when
    that is a module, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            # `import a.b.c` also imports a and a.b; the deepest known module is the edge.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
    return edges


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imported_modules(name, path, known) for name, path in files.items()}


def without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges to a package's ``__init__`` from inside that package: a module
    importing its own package is how Python resolves it, not a dependency between modules."""
    return {
        name: {t for t in targets if not name.startswith(t + ".")}
        for name, targets in graph.items()
    }


def test_the_reader_sees_real_edges(graph):
    # The walk is not vacuous: known edges are found, lazy ones included.
    assert "flystage.manifest" in graph["flystage.organise"]
    assert "flystage.imaging" in graph["flystage.training.data"]
    assert any(t.startswith("flystage.training") for t in graph["flystage.review.app"])


def test_the_import_graph_has_no_cycle(graph):
    try:
        graphlib.TopologicalSorter(without_packages(graph)).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_a_cycle_would_be_seen():
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter({"a": {"b"}, "b": {"a"}}).prepare()


def test_the_core_never_imports_the_review_ui(graph):
    core = [n for n in graph if n.startswith("flystage.") and not n.startswith("flystage.review")]
    offenders = {n: sorted(t for t in graph[n] if t.startswith("flystage.review")) for n in core}
    assert not {n: t for n, t in offenders.items() if t}


def test_serving_and_the_core_never_import_the_cloud_or_local_mode(graph):
    # The serve image carries no boto3 and no local mode; the predictor protocol is the seam.
    lower = [
        n
        for n in graph
        if n.startswith("flystage.")
        and not n.startswith(("flystage.cloud", "flystage.sagemaker", "flystage.review"))
    ]
    offenders = {
        n: sorted(t for t in graph[n] if t.startswith(("flystage.cloud", "flystage_local")))
        for n in lower
    }
    assert not {n: t for n, t in offenders.items() if t}


@pytest.mark.parametrize(
    "module",
    ["flystage.organise", "flystage.manifest", "flystage.cloud.command", "flystage_local.tuning"],
)
def test_organise_and_the_control_plane_load_no_image_stack(module):
    # They read manifests, write files and call AWS: numpy and OpenCV (tens of MB, a second of
    # start-up) are loaded only by what reads or writes pixels.
    code = (
        f"import sys, {module}\n"
        "assert not {'numpy', 'cv2', 'tifffile', 'torch'} & set(sys.modules), "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'cv2'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
