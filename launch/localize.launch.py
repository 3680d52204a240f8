"""Launch the ACE-G localizer (and optionally RViz) on a real ROS 2 install.

    ros2 launch aceg_ros localize.launch.py map:=/path/scene.map.safetensors \
        image_topic:=/camera/image_raw camera_info_topic:=/camera/camera_info rviz:=true

Arguments (``ros2 launch aceg_ros localize.launch.py --show-args``):
  map, model          map / model files; '' keeps the value of params_file
  params_file         node parameters (default: the package's config/aceg.yaml)
  namespace           node namespace (default aceg: topics /aceg/pose, /aceg/map_scene, ...)
  image_topic, camera_info_topic
                      remap the node's image and camera_info inputs
  image_transport     raw | compressed ('' keeps params_file)
  device              auto | cpu | cuda ('' keeps params_file)
  use_sim_time        true for bag replay (ros2 bag play --clock)
  rviz                true to start RViz with config/aceg.rviz

The node configures and activates itself (``autostart: true`` in the
parameter file); set it false to drive it from a lifecycle manager instead.
"""
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "aceg_ros"
EXECUTABLE = "aceg_localizer"
NODE_NAME = "aceg_localizer"


def node_from_arguments(context, *args, **kwargs):
    """The localizer node, with only the overrides the user gave (so params_file values are not blanked)."""
    value = lambda name: LaunchConfiguration(name).perform(context)  # noqa: E731
    overrides = {"use_sim_time": value("use_sim_time").lower() in ("true", "1", "yes")}
    for argument, parameter in (("map", "map_path"), ("model", "model_path"), ("device", "device"),
                                ("image_transport", "image_transport")):
        if value(argument):
            overrides[parameter] = value(argument)
    image_topic = value("image_topic")
    remappings = [("image", image_topic), ("image/compressed", image_topic.rstrip("/") + "/compressed"),
                  ("camera_info", value("camera_info_topic"))]
    return [Node(package=PACKAGE, executable=EXECUTABLE, name=NODE_NAME, namespace=value("namespace"),
                 parameters=[value("params_file"), overrides], remappings=remappings, output="screen",
                 emulate_tty=True)]


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    return LaunchDescription([
        DeclareLaunchArgument("map", default_value="",
                              description="map file (safetensors); '' = params_file's map_path"),
        DeclareLaunchArgument("model", default_value="", description="model file (safetensors); '' = params_file's "
                              "model_path (default: the shipped model)"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "aceg.yaml"]),
                              description="parameter file of the node"),
        DeclareLaunchArgument("namespace", default_value="aceg", description="namespace of the node and its topics"),
        DeclareLaunchArgument("image_topic", default_value="image",
                              description="image topic to localize (raw; '<topic>/compressed' when compressed)"),
        DeclareLaunchArgument("camera_info_topic", default_value="camera_info", description="CameraInfo topic"),
        DeclareLaunchArgument("image_transport", default_value="", description="raw | compressed; '' = params_file"),
        DeclareLaunchArgument("device", default_value="", description="auto | cpu | cuda; '' = params_file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("rviz", default_value="false", description="start RViz with config/aceg.rviz"),
        OpaqueFunction(function=node_from_arguments),
        Node(package="rviz2", executable="rviz2", name="rviz2", output="screen",
             arguments=["-d", PathJoinSubstitution([share, "config", "aceg.rviz"])],
             parameters=[{"use_sim_time": LaunchConfiguration("use_sim_time")}],
             condition=IfCondition(LaunchConfiguration("rviz"))),
    ])
