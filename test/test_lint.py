"""Linters as tests (as ROS 2 packages do with ament_flake8): the style setup.cfg declares.

flake8 reads its settings from setup.cfg ([flake8]: 100 columns, the default pycodestyle
and pyflakes checks, McCabe complexity at most 20 per function, and a temporary,
commented per-file list for files other branches were editing); nothing here narrows
the checks.
"""

import subprocess
import sys

PATHS = ["vpr_ros", "test", "benchmarks", "scripts", "launch", "setup.py"]


def test_flake8_enforces_the_configured_style(repo_root):
    cmd = [sys.executable, "-m", "flake8", *PATHS]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_flake8_reads_the_100_column_limit(repo_root, tmp_path):
    """The check is live: a 101-column line in a file of ours is reported."""
    bad = tmp_path / "long.py"
    bad.write_text("x = " + "1 + " * 24 + "1\n")
    assert len(bad.read_text().rstrip("\n")) == 101
    cmd = [sys.executable, "-m", "flake8", "--config", str(repo_root / "setup.cfg"), str(bad)]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 1 and "E501 line too long (101 > 100" in proc.stdout
