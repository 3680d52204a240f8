"""The package layout a ROS 2 workspace and the venv both rely on."""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

from ament_index_python.packages import get_package_share_directory

REPO = Path(__file__).resolve().parents[1]


def test_package_xml_is_ament_python_format3() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "aceg_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root if e.tag.endswith("depend")}
    for dep in ["rclpy", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_srvs", "diagnostic_msgs",
                "visualization_msgs", "tf2_ros", "cv_bridge", "python3-numpy", "python3-opencv",
                "python3-yaml", "python3-scipy", "python3-pytest"]:
        assert dep in deps, dep


def test_ament_index_finds_the_package() -> None:
    share = Path(get_package_share_directory("aceg_ros"))
    assert (share / "package.xml").is_file()
    assert (share / "config").is_dir() and (share / "launch").is_dir()


def test_aceg_model_never_imports_ros() -> None:
    ros_roots = {"rclpy", "rosbags", "sensor_msgs", "geometry_msgs", "nav_msgs", "std_msgs",
                 "tf2_msgs", "tf2_ros", "cv_bridge", "aceg_ros", "builtin_interfaces", "rosidl_runtime_py"}
    offenders = []
    for path in (REPO / "aceg_model").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ros_roots]
    assert not offenders, offenders
