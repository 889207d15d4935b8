"""The core is ROS-free: nothing outside vpr_ros/ros imports rclpy or ROS message packages."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

ROS_MODULES = ("rclpy", "rosidl_runtime_py", "rosidl_parser", "launch", "launch_ros", "rosbag2_py",
               "cv_bridge", "message_filters", "tf2_ros")


def _is_ros(name: str) -> bool:
    top = name.split(".")[0]
    return top in ROS_MODULES or top.endswith("_msgs") or top.endswith("_srvs") \
        or top.endswith("_interfaces")


def _core_files(repo_root):
    pkg = repo_root / "vpr_ros"
    return [p for p in sorted(pkg.rglob("*.py")) if "ros" not in p.relative_to(pkg).parts[:1]]


def test_no_ros_imports_in_core_sources(repo_root):
    offenders = []
    for path in _core_files(repo_root):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(repo_root)}:{node.lineno} imports {n}"
                          for n in names if _is_ros(n)]
    assert not offenders, "\n".join(offenders)


def test_importing_every_core_module_loads_no_ros(repo_root):
    modules = []
    for path in _core_files(repo_root):
        rel = path.relative_to(repo_root).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules.append(".".join(parts))
    assert "vpr_ros.bags" in modules and "vpr_ros.image_encoding" in modules
    code = (
        "import importlib, json, sys\n"
        f"mods = {modules!r}\n"
        "failed = {}\n"
        "for m in mods:\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as exc:\n"
        "        failed[m] = repr(exc)\n"
        "print(json.dumps({'loaded': sorted(sys.modules), 'failed': failed}))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["failed"], out["failed"]
    ros = [m for m in out["loaded"] if _is_ros(m) or m.startswith("vpr_ros.ros")]
    assert not ros, f"ROS modules loaded by the core: {ros}"
