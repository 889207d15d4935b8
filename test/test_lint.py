"""Linters as tests (as ROS 2 packages do with ament_flake8): pyflakes-level errors fail."""

import subprocess
import sys


def test_flake8_finds_no_errors(repo_root):
    cmd = [sys.executable, "-m", "flake8", "--select=E9,F,W6", "vpr_ros", "test",
           "benchmarks", "scripts", "launch", "setup.py"]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
