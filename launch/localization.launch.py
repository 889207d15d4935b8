"""Start the vpr_ros localizer node (a lifecycle node that configures and activates itself).

    ros2 launch vpr_ros localization.launch.py map:=/maps/site weights:=/models/scicevpr_b.pth

Arguments: map, weights, model, device, camera_topic (remapped onto the node's image
topic, and <camera_topic>/compressed for image_transport compressed), namespace,
params_file (default: the installed config/localizer.yaml).  The node configures and
activates itself (autostart); to drive it from a lifecycle manager instead, set
autostart: false in the params file.
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("vpr_ros"), "config",
                                  "localizer.yaml")
    args = [
        DeclareLaunchArgument("map", description="map folder built with `vpr map build`"),
        DeclareLaunchArgument("weights", default_value="",
                              description="model weights; empty = the card's own"),
        DeclareLaunchArgument("model", default_value="",
                              description="model card; empty = the map's card"),
        DeclareLaunchArgument("device", default_value="auto", description="auto, cpu, cuda:N"),
        DeclareLaunchArgument("camera_topic", default_value="/camera/image_raw",
                              description="camera image topic"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="parameters YAML"),
    ]
    node = LifecycleNode(
        package="vpr_ros",
        executable="localizer_node",
        name="vpr_localizer",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        parameters=[
            LaunchConfiguration("params_file"),
            {   # value_type=str: an empty argument stays "" instead of becoming YAML null
                "map_path": ParameterValue(LaunchConfiguration("map"), value_type=str),
                "weights": ParameterValue(LaunchConfiguration("weights"), value_type=str),
                "model": ParameterValue(LaunchConfiguration("model"), value_type=str),
                "device": ParameterValue(LaunchConfiguration("device"), value_type=str),
            },
        ],
        remappings=[
            ("/camera/image_raw", LaunchConfiguration("camera_topic")),
            ("/camera/image_raw/compressed", [LaunchConfiguration("camera_topic"), "/compressed"]),
        ],
    )
    return LaunchDescription(args + [node])
