"""`colcon build` works from the source tree, as on a robot with system ROS 2.

Copies the tracked files into a workspace, builds with colcon's ament_python support and
checks what `ros2 run` / `ros2 launch` rely on: the scripts in lib/vpr_ros, the
resource marker and the share folder (launch, config, models, samples).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_colcon_build_installs_ros_layout(repo_root, tmp_path):
    colcon = Path(sys.executable).parent / "colcon"
    if not colcon.exists():
        pytest.fail("colcon is not installed in this environment (requirements-dev.txt)")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=repo_root, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "ws" / "src" / "vpr_ros"
    for rel in files:
        if (repo_root / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo_root / rel, src / rel)
    ws = tmp_path / "ws"
    proc = subprocess.run([str(colcon), "build", "--packages-select", "vpr_ros"], cwd=ws,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    prefix = ws / "install" / "vpr_ros"
    assert (prefix / "lib" / "vpr_ros" / "vpr").is_file()
    assert (prefix / "lib" / "vpr_ros" / "localizer_node").is_file()
    share = prefix / "share" / "vpr_ros"
    assert (share / "package.xml").is_file()
    assert (prefix / "share" / "ament_index" / "resource_index" / "packages" / "vpr_ros").is_file()
    for sub in ("launch", "config", "models", "samples"):
        assert (share / sub).is_dir(), sub
    assert list((share / "samples").rglob("*.jpg")), "sample images not installed"
    assert (share / "config" / "vpr_localizer.rviz").is_file(), "RViz config not installed"
    # the int8 kernels' C source travels with the Python package (compiled on first use)
    assert list(prefix.rglob("vpr_ros/accel/int8_kernels.c")), "int8_kernels.c not installed"
