"""The package is a well-formed ament_python package: manifest, marker, entry points, data files."""

import ast
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
