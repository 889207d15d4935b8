"""The package is a well-formed ament_python package: manifest, marker, entry points, data files."""

import ast
import re
import xml.etree.ElementTree as ET


def test_package_xml_is_format_3_with_ros_dependencies(repo_root):
    root = ET.parse(repo_root / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "vpr_ros"
    deps = {e.text for e in root.iter("exec_depend")}
    for dep in ("rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "cv_bridge",
                "diagnostic_msgs", "python3-numpy"):
        assert dep in deps
    assert root.find("export/build_type").text == "ament_python"


def test_resource_marker_and_layout(repo_root):
    assert (repo_root / "resource" / "vpr_ros").is_file()
    for folder in ("vpr_ros", "launch", "config", "models", "test"):
        assert (repo_root / folder).is_dir(), folder


def test_setup_py_declares_console_scripts_and_data_files(repo_root):
    source = (repo_root / "setup.py").read_text()
    tree = ast.parse(source)
    assert any(isinstance(n, ast.Constant) and n.value == "vpr = vpr_ros.cli.main:main"
               for n in ast.walk(tree))
    assert "localizer_node = vpr_ros.ros.localizer_node:main" in source
    for needle in ("resource_index/packages", "launch", "config", "models", "samples"):
        assert needle in source


def test_setup_cfg_installs_scripts_for_ros2_run(repo_root):
    cfg = (repo_root / "setup.cfg").read_text()
    assert "install_scripts=$base/lib/vpr_ros" in cfg
    assert "script_dir=$base/lib/vpr_ros" in cfg


def test_makefile_targets_parse(repo_root):
    import subprocess

    proc = subprocess.run(["make", "-n", "demo", "test", "demo-model", "bench-quick", "clean"],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ROS packages the manifest may declare without a Python import of them, and why.
USED_WITHOUT_IMPORT = {
    "lifecycle_msgs": "rclpy.lifecycle serves the node's lifecycle services with it",
    "launch": "ros2 launch runs launch/*.launch.py",
    "ament_index_python": "imported lazily (models.cards, demo) inside try blocks",
}
NOT_ROS = ("python3-",)
ROSDEP_KEYS = {"PIL": "python3-pil", "numpy": "python3-numpy", "yaml": "python3-yaml",
               "scipy": "python3-scipy"}
NO_ROSDEP_KEY = {"__future__", "torch", "vpr_ros"}   # torch: pip (package.xml comment)


def _ros_imports(repo_root):
    """Top-level modules imported by the ROS layer and the launch files."""
    files = sorted((repo_root / "vpr_ros" / "ros").glob("*.py"))
    files += sorted((repo_root / "launch").glob("*.py"))
    names = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    import sys
    return {n for n in names if n not in sys.stdlib_module_names and n not in NO_ROSDEP_KEY}


def test_package_xml_declares_exactly_the_ros_packages_used(repo_root):
    root = ET.parse(repo_root / "package.xml").getroot()
    all_declared = {e.text for e in root.iter("exec_depend")}
    used = {ROSDEP_KEYS.get(n, n) for n in _ros_imports(repo_root)}
    missing = used - all_declared
    assert not missing, f"imported but not declared in package.xml: {missing}"
    declared = {d for d in all_declared if not d.startswith(NOT_ROS)}
    unused = declared - used - set(USED_WITHOUT_IMPORT)
    assert not unused, f"declared in package.xml but never imported: {unused}"
    email = root.find("maintainer").get("email")
    assert re.fullmatch(r"[^@\s]+@[^@\s]+\.[a-z]+", email) and "example." not in email
