"""The tier lists of conftest.py stay true: every named file and test exists, and the
markers land where they should (a tier that silently matches nothing would make
`make test-fast` slow or, worse, skip nothing it claims to)."""

from __future__ import annotations

import ast
from pathlib import Path

import conftest

TEST_DIR = Path(__file__).resolve().parent


def _test_names(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
            and n.name.startswith("test_")}


def test_every_listed_file_and_test_exists():
    files = (conftest.ROS_FILES | conftest.COLCON_FILES | conftest.DDP_FILES
             | conftest.SLOW_FILES)
    missing = sorted(f for f in files if not (TEST_DIR / f).is_file())
    for entry in sorted(conftest.SLOW_TESTS):
        name, _, test = entry.partition("::")
        if not (TEST_DIR / name).is_file() or test not in _test_names(TEST_DIR / name):
            missing.append(entry)
    assert not missing, f"conftest.py names tests that do not exist: {missing}"


def test_markers_are_applied(request):
    session = request.session
    by_id = {item.nodeid.split("/")[-1].split("[")[0]: item for item in session.items}
    own = by_id.get("test_tiers.py::test_markers_are_applied")
    assert own is not None and own.get_closest_marker("slow") is None
    for nodeid, item in by_id.items():
        marks = {m.name for m in item.iter_markers()}
        if nodeid.startswith("test_colcon_build.py::"):
            assert {"colcon", "slow"} <= marks, nodeid
        if nodeid.startswith("test_training_ddp.py::"):
            assert {"ddp", "slow"} <= marks, nodeid
        if "ros_domain" in getattr(item, "fixturenames", ()):
            assert {"ros", "slow"} <= marks, nodeid
        if nodeid in conftest.SLOW_TESTS:
            assert "slow" in marks, nodeid


def test_missing_shared_folder_stops_the_session_with_one_message(repo_root, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "VPR_SHARED_DIR": str(tmp_path / "no_such_folder")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "test/test_atomic.py"], cwd=repo_root, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert "test fixture folder not found" in out and "VPR_SHARED_DIR" in out
    assert " passed" not in out and " failed" not in out     # no test ran, none failed
