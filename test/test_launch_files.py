"""launch/localize.launch.py and config/aceg.rviz, checked without ROS 2's ``launch`` where it is missing.

The launch file is written for real ROS 2 installs. Here it is compiled, its
``generate_launch_description`` is run against small stand-ins for the
``launch`` / ``launch_ros`` classes it uses (the real packages when they are
importable), and everything it names is checked to exist: the executable (a
console script resolving to the node's ``main``), the parameter file and its
keys, the RViz config, the remapped topic names, and the arguments the README
documents.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import sys
import types
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "localize.launch.py"
RVIZ_FILE = REPO / "config" / "aceg.rviz"
REQUIRED_ARGUMENTS = {"map", "model", "params_file", "rviz", "use_sim_time", "image_topic", "camera_info_topic"}
HAVE_LAUNCH = importlib.util.find_spec("launch") is not None and importlib.util.find_spec("launch_ros") is not None


# --- stand-ins for launch / launch_ros (used only where those packages are missing) -------------------

class _Action:
    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs


class _LaunchDescription(_Action):
    @property
    def entities(self):
        return self.args[0]


class _Substitution(_Action):
    def perform(self, context: dict) -> str:
        raise NotImplementedError


class _LaunchConfiguration(_Substitution):
    def perform(self, context: dict) -> str:
        return context[self.args[0]]


class _FindPackageShare(_Substitution):
    def perform(self, context: dict) -> str:
        from ament_index_python.packages import get_package_share_directory

        return get_package_share_directory(self.args[0])


class _PathJoinSubstitution(_Substitution):
    def perform(self, context: dict) -> str:
        return str(Path(*[p.perform(context) if isinstance(p, _Substitution) else p for p in self.args[0]]))


def _stub_modules() -> dict[str, types.ModuleType]:
    mods = {name: types.ModuleType(name) for name in (
        "launch", "launch.actions", "launch.conditions", "launch.substitutions",
        "launch_ros", "launch_ros.actions", "launch_ros.substitutions")}
    mods["launch"].LaunchDescription = _LaunchDescription
    mods["launch.actions"].DeclareLaunchArgument = type("DeclareLaunchArgument", (_Action,), {})
    mods["launch.actions"].OpaqueFunction = type("OpaqueFunction", (_Action,), {})
    mods["launch.conditions"].IfCondition = type("IfCondition", (_Action,), {})
    mods["launch.substitutions"].LaunchConfiguration = _LaunchConfiguration
    mods["launch.substitutions"].PathJoinSubstitution = _PathJoinSubstitution
    mods["launch_ros.actions"].Node = type("Node", (_Action,), {})
    mods["launch_ros.substitutions"].FindPackageShare = _FindPackageShare
    return mods


@pytest.fixture(scope="module")
def launch_module(tmp_path_factory):
    """The launch file as a module, imported with the stand-ins in sys.modules (restored afterwards)."""
    if HAVE_LAUNCH:
        pytest.skip("real launch installed: covered by test_real_launch_description")
    saved = {name: sys.modules.get(name) for name in _stub_modules()}
    sys.modules.update(_stub_modules())
    try:
        spec = importlib.util.spec_from_file_location("aceg_localize_launch", LAUNCH_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def _declared(description) -> dict:
    return {a.args[0]: a.kwargs.get("default_value") for a in description.entities
            if type(a).__name__ == "DeclareLaunchArgument"}


def _context(description, **given) -> dict:
    """Launch configurations as ``ros2 launch ... name:=value`` would set them (defaults performed)."""
    ctx: dict = {}
    for name, default in _declared(description).items():
        ctx[name] = default.perform(ctx) if isinstance(default, _Substitution) else default
    ctx.update(given)
    return ctx


def _localizer_node(module, description, **given):
    opaque = [a for a in description.entities if type(a).__name__ == "OpaqueFunction"]
    assert len(opaque) == 1
    nodes = opaque[0].kwargs["function"](_context(description, **given))
    assert len(nodes) == 1
    return nodes[0]


# --- tests -------------------------------------------------------------------------------------------

def test_launch_file_compiles_and_names_only_declared_arguments() -> None:
    source = LAUNCH_FILE.read_text()
    tree = ast.parse(source, str(LAUNCH_FILE))
    compile(tree, str(LAUNCH_FILE), "exec")
    declared = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "DeclareLaunchArgument"}
    used = {n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
            and getattr(n.func, "id", "") == "LaunchConfiguration" and isinstance(n.args[0], ast.Constant)}
    used |= set(re.findall(r'value\("(\w+)"\)', source))
    assert REQUIRED_ARGUMENTS <= declared, f"missing arguments: {REQUIRED_ARGUMENTS - declared}"
    assert used <= declared, f"used but never declared: {used - declared}"
    doc = ast.get_docstring(tree)
    for name in declared:
        assert name in doc, f"argument {name} is not described in the launch file's docstring"


def test_executable_is_the_nodes_console_script() -> None:
    scripts = {e.name: e for e in entry_points(group="console_scripts")}
    assert "aceg_localizer" in scripts, "run ./scripts/setup.sh: the aceg_localizer console script is not installed"
    assert scripts["aceg_localizer"].value == "aceg_ros.localizer_node:main"
    assert callable(scripts["aceg_localizer"].load())
    setup_py = (REPO / "setup.py").read_text()
    assert '"aceg_localizer = aceg_ros.localizer_node:main"' in setup_py
    # setup.py installs launch/*.py and config/* to share/aceg_ros (what FindPackageShare finds).
    assert 'share("launch", "*.py")' in setup_py and 'share("config")' in setup_py
    # rviz2 is an exec_depend, so rosdep installs it with the package.
    assert "<exec_depend>rviz2</exec_depend>" in (REPO / "package.xml").read_text()


def test_launch_description_with_defaults(launch_module) -> None:
    description = launch_module.generate_launch_description()
    assert REQUIRED_ARGUMENTS <= set(_declared(description))
    node = _localizer_node(launch_module, description)
    kw = node.kwargs
    assert (kw["package"], kw["executable"], kw["name"], kw["namespace"]) == \
        ("aceg_ros", "aceg_localizer", "aceg_localizer", "aceg")
    params_file, overrides = kw["parameters"]
    assert Path(params_file).resolve() == (REPO / "config" / "aceg.yaml").resolve(), params_file
    assert overrides == {"use_sim_time": False}, "empty arguments must not blank the parameter file's values"
    assert dict(kw["remappings"]) == {"image": "image", "image/compressed": "image/compressed",
                                      "camera_info": "camera_info"}
    # The remapped names are the node's own relative topic names.
    node_source = (REPO / "aceg_ros" / "localizer_node.py").read_text()
    for topic in dict(kw["remappings"]):
        assert re.search(rf'create_subscription\(\w+, "{re.escape(topic)}"', node_source), topic
    # RViz: off by default, started from the package's config with -d.
    rviz = [a for a in description.entities if type(a).__name__ == "Node" and a.kwargs["executable"] == "rviz2"]
    assert len(rviz) == 1
    assert type(rviz[0].kwargs["condition"]).__name__ == "IfCondition"
    config = rviz[0].kwargs["arguments"][1].perform({})
    assert Path(config).resolve() == RVIZ_FILE.resolve()


def test_launch_arguments_reach_the_node(launch_module, tmp_path) -> None:
    from aceg_ros import params as P

    description = launch_module.generate_launch_description()
    node = _localizer_node(launch_module, description, map="/maps/kitchen.map.safetensors", model="/m.safetensors",
                           image_topic="/camera/image_raw", camera_info_topic="/camera/camera_info",
                           device="cpu", image_transport="compressed", use_sim_time="true", namespace="robot1")
    kw = node.kwargs
    _, overrides = kw["parameters"]
    assert overrides == {"use_sim_time": True, "map_path": "/maps/kitchen.map.safetensors",
                         "model_path": "/m.safetensors", "device": "cpu", "image_transport": "compressed"}
    assert set(overrides) - {"use_sim_time"} <= set(P.SPECS), "every override is a declared parameter"
    for name, value in overrides.items():
        if name in P.SPECS:
            assert P.check_value(name, value) is None, (name, value)
    assert dict(kw["remappings"]) == {"image": "/camera/image_raw",
                                      "image/compressed": "/camera/image_raw/compressed",
                                      "camera_info": "/camera/camera_info"}
    assert kw["namespace"] == "robot1"


def test_parameter_file_is_loadable_by_ros() -> None:
    """config/aceg.yaml in the format rcl reads (checked with rclpy's own parser), values pass validation."""
    yaml = pytest.importorskip("yaml")
    from rclpy.parameter import Parameter, parameter_dict_from_yaml_file

    from aceg_ros import params as P

    loaded = parameter_dict_from_yaml_file(str(REPO / "config" / "aceg.yaml"), use_wildcard=True)
    values = {name: Parameter.from_parameter_msg(p).value for name, p in loaded.items()}
    assert set(values) == set(P.SPECS)
    for name, value in values.items():
        assert P.check_value(name, value) is None, (name, value)
    assert yaml.safe_load((REPO / "config" / "aceg.yaml").read_text())


def test_rviz_config_shows_the_node_outputs() -> None:
    yaml = pytest.importorskip("yaml")
    cfg = yaml.safe_load(RVIZ_FILE.read_text())
    manager = cfg["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "map"
    displays = {d["Class"].split("/")[-1]: d for d in manager["Displays"]}
    expected = {"Image": "/aceg/image", "PoseWithCovariance": "/aceg/pose", "Path": "/aceg/path",
                "PointCloud2": "/aceg/map_points"}
    for cls, topic in expected.items():
        assert cls in displays and displays[cls]["Topic"]["Value"] == topic, cls
    assert "TF" in displays
    assert displays["PointCloud2"]["Color Transformer"] == "RGB8", "the cloud is drawn with its colours"
    # The pose is latched by the node; RViz must ask for TRANSIENT_LOCAL to get it on start.
    assert displays["PoseWithCovariance"]["Topic"]["Durability Policy"] == "Transient Local"


@pytest.mark.skipif(not HAVE_LAUNCH, reason="ROS 2 launch / launch_ros are not installed here")
def test_real_launch_description() -> None:  # pragma: no cover - runs on real ROS 2 installs
    from launch import LaunchDescription

    spec = importlib.util.spec_from_file_location("aceg_localize_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert isinstance(description, LaunchDescription)
    names = {a.name for a in description.get_launch_arguments()}
    assert REQUIRED_ARGUMENTS <= names
