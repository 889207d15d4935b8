"""Start the vpr_ros localizer node (a lifecycle node that configures and activates itself).

    ros2 launch vpr_ros localization.launch.py map:=/maps/site weights:=/models/scicevpr_b.pth

Arguments (docs/ros.md, "Launch file"): map, camera_topic, params_file, namespace, device,
model, weights, use_sim_time, omp_wait_policy.

* An argument given a value always wins over the params file; an argument left empty (the
  default) sets nothing, so the params file (or the node's default) decides: the map can come
  from the params file alone.
* camera_topic sets the node's ``image_topic`` parameter: one source of truth, no remapping.
  A relative name (``camera/image_raw``, the node's default) resolves inside ``namespace``.
* A failed start (missing map, bad weights, ``device:=cuda`` without a GPU, a bad argument)
  ends the launch with a failure: the node exits with status 1, this file's ``on_exit``
  handler raises, and ``LaunchService.run()`` (so ``ros2 launch``) returns 1 after shutting
  down with the reason. A clean stop (Ctrl-C, SIGTERM) returns 0.
* omp_wait_policy sets ``OMP_WAIT_POLICY`` for the node's process (read by the OpenMP
  runtimes of torch and of the native kernels when they load, so it cannot be a node
  parameter): ``passive`` (the default) lets idle OpenMP threads sleep, so a robot's other
  processes keep their cores and the node does not slow down 2-4x beside them; ``active``
  spins (~4% faster on an otherwise idle CPU); empty leaves the environment's value or the
  runtime's default (docs/ros.md and docs/performance.md section 5 have the numbers).
* The node configures and activates itself (its ``autostart`` parameter, default true), so
  the process itself fails when configure fails; no ``LifecycleNode(autostart=...)`` is
  passed, so this file behaves the same with launch_ros releases that have that option and
  those that do not. To drive the node from a lifecycle manager (nav2's, or launch_ros's own
  ``autostart``), set ``autostart: false`` in the params file.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, EmitEvent, OpaqueFunction
from launch.events import Shutdown
from launch.substitutions import LaunchConfiguration

NODE_NAME = "vpr_localizer"
# launch argument -> node parameter it overrides when given a value
OVERRIDES = {
    "map": "map_path",
    "camera_topic": "image_topic",
    "device": "device",
    "model": "model",
    "weights": "weights",
    "use_sim_time": "use_sim_time",
}
DESCRIPTIONS = {
    "map": "map folder built with `vpr map build` (empty: map_path of the params file)",
    "camera_topic": "camera topic, relative names resolve in the namespace (empty: "
                    "image_topic of the params file)",
    "device": "torch device: auto, cpu, cuda, cuda:N (empty: the params file's)",
    "model": "model card name or YAML (empty: the params file's, else the map's card)",
    "weights": "weights file (empty: the params file's, else the card's own)",
    "use_sim_time": "true/false: use /clock (rosbag play --clock); empty: the params file's",
    "namespace": "namespace of the node and of its relative topics",
    "params_file": "parameters YAML (default: the installed config/localizer.yaml)",
    "omp_wait_policy": "idle OpenMP threads: passive (sleep; default, for CPUs shared with "
                       "other processes), active (spin), empty: the environment's "
                       "OMP_WAIT_POLICY or the runtime's default",
}
OMP_WAIT_POLICIES = ("passive", "active")


class LocalizerStartFailed(RuntimeError):
    """The localizer process ended with a non-zero status (LaunchService.run() returns 1)."""


def _default_params_file() -> str:
    try:
        from ament_index_python.packages import get_package_share_directory

        return os.path.join(get_package_share_directory("vpr_ros"), "config", "localizer.yaml")
    except Exception:  # not installed in an ament prefix: the source tree's copy
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "config", "localizer.yaml")


def _bool(name: str, text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise LocalizerStartFailed(f"launch argument {name} must be true or false, got {text!r}")


def _on_exit(event, context):
    """The node's process ended: a failure (non-zero status) fails the launch, a clean
    exit ends it. Nothing to do when the launch is already shutting down (Ctrl-C): a second
    Shutdown event would make launch_ros fail on its already stopped ROS adapter."""
    if context.is_shutdown:
        return None
    if event.returncode != 0:
        raise LocalizerStartFailed(
            f"{NODE_NAME} exited with status {event.returncode} (its error line is above); "
            "failing the launch")
    return [EmitEvent(event=Shutdown(reason=f"{NODE_NAME} exited with status "
                                            f"{event.returncode}"))]


def _make_node(context):
    from launch_ros.actions import LifecycleNode
    from launch_ros.parameter_descriptions import ParameterValue

    values = {name: LaunchConfiguration(name).perform(context).strip() for name in DESCRIPTIONS}
    params = []
    params_file = values["params_file"]
    if params_file:
        if not os.path.isfile(params_file):
            raise LocalizerStartFailed(f"params_file not found: {params_file}")
        params.append(params_file)
    overrides = {}
    for arg, param in OVERRIDES.items():
        text = values[arg]
        if not text:
            continue                    # empty: the params file decides
        # value_type=str: "0" or "true" stay strings instead of becoming YAML int/bool
        overrides[param] = (_bool(arg, text) if arg == "use_sim_time"
                            else ParameterValue(text, value_type=str))
    if overrides:
        params.append(overrides)        # after the file: command-line arguments win
    policy = values["omp_wait_policy"].lower()
    if policy and policy not in OMP_WAIT_POLICIES:
        raise LocalizerStartFailed(f"launch argument omp_wait_policy must be one of "
                                   f"{', '.join(OMP_WAIT_POLICIES)} or empty, got "
                                   f"{values['omp_wait_policy']!r}")
    return [LifecycleNode(
        package="vpr_ros",
        executable="localizer_node",
        name=NODE_NAME,
        namespace=values["namespace"],
        output="screen",
        parameters=params,
        on_exit=_on_exit,
        # the OpenMP runtimes read it when they load: an environment variable of the
        # process, set here from the launch argument (empty: inherited unchanged)
        additional_env={"OMP_WAIT_POLICY": policy.upper()} if policy else None,
    )]


def generate_launch_description():
    defaults = {name: "" for name in DESCRIPTIONS}
    defaults["params_file"] = _default_params_file()
    defaults["omp_wait_policy"] = "passive"
    args = [DeclareLaunchArgument(name, default_value=defaults[name], description=text)
            for name, text in DESCRIPTIONS.items()]
    return LaunchDescription(args + [OpaqueFunction(function=_make_node)])
