"""The layers of docs/architecture.md, checked on the sources (next to test_ros_free.py).

* maps never imports evaluation (evaluation builds on maps; the benchmark-dataset reader
  both use is vpr_ros.datasets);
* vpr_ros.constants imports nothing, so argument parsing and --help load no torch;
* the shared names are defined once (in vpr_ros.constants), and only vpr_ros.plotting
  chooses matplotlib's backend.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest

# (importing package, package it must not import)
FORBIDDEN = [
    ("vpr_ros.maps", "vpr_ros.evaluation"),
    ("vpr_ros.maps", "vpr_ros.training"),
    ("vpr_ros.models", "vpr_ros.evaluation"),
    ("vpr_ros.models", "vpr_ros.maps"),
    ("vpr_ros.datasets", "vpr_ros.evaluation"),
    ("vpr_ros.datasets", "vpr_ros.maps"),
]
SHARED_NAMES = ("PRECISIONS", "RERANK_COMPUTES", "TRAIN_PRECISIONS", "MAX_POSE_GAP_S",
                "CONV_TRANSPOSE_COMPUTES", "PATCH_CONV_COMPUTES")


def _module_name(repo_root: Path, path: Path) -> str:
    parts = list(path.relative_to(repo_root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(repo_root: Path, path: Path) -> Iterator[Tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, relative ones resolved."""
    module = _module_name(repo_root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:       # from ..pkg import module
                yield node.lineno, f"{target}.{alias.name}"


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _sources(repo_root: Path):
    return sorted((repo_root / "vpr_ros").rglob("*.py"))


def test_forbidden_imports_between_layers(repo_root):
    offenders = []
    for path in _sources(repo_root):
        module = _module_name(repo_root, path)
        for lineno, name in _imports(repo_root, path):
            for importer, forbidden in FORBIDDEN:
                if _inside(module, importer) and _inside(name, forbidden):
                    offenders.append(f"{path.relative_to(repo_root)}:{lineno}: {module} "
                                     f"imports {name} ({importer} must not import {forbidden})")
    assert not offenders, "\n".join(offenders)


def test_layering_check_sees_relative_imports(repo_root, tmp_path):
    """The checker itself: a relative import from maps into evaluation is caught."""
    fake = tmp_path / "vpr_ros" / "maps"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..evaluation.metrics import recall_at_n\n")
    names = [n for _, n in _imports(tmp_path, fake / "bad.py")]
    assert "vpr_ros.evaluation.metrics" in names


def test_constants_module_imports_nothing(repo_root):
    path = repo_root / "vpr_ros" / "constants.py"
    assert list(_imports(repo_root, path)) == []
    code = ("import sys, vpr_ros.constants; "
            "print(sorted(m for m in ('torch', 'numpy', 'faiss') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_shared_names_defined_once(repo_root, name):
    places = []
    for path in _sources(repo_root):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == name for t in node.targets):
                places.append(str(path.relative_to(repo_root)))
    assert places == ["vpr_ros/constants.py"], places


def test_only_the_plotting_helper_sets_the_backend(repo_root):
    files = _sources(repo_root) + sorted((repo_root / "benchmarks").glob("*.py"))
    users = [str(p.relative_to(repo_root)) for p in files
             if "matplotlib.use(" in p.read_text(encoding="utf-8")]
    assert users == ["vpr_ros/plotting.py"], users
