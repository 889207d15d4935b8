"""launch/localization.launch.py run by the real ROS 2 launch system, as `ros2 launch` runs it.

Each launch is a process that calls ``ros2launch.api.launch_a_launch_file`` (what the
``ros2 launch`` verb calls; its return value is the verb's exit status), which runs a
``LaunchService``.  launch_ros starts the node through the ament index, from a prefix the
``ament_prefix`` fixture lays out as colcon installs it (``lib/vpr_ros/localizer_node``,
``share/vpr_ros/config``, the package marker; test_colcon_build.py checks colcon makes that
layout).  A peer rclpy node in this process publishes frames and reads the results over
DDS on a private domain.

The launch system comes from the sourced system ROS 2, or from ``../shared/ros2_launch``
installed into the venv by ``make install`` (scripts/install_ros2_launch.sh).  Where neither
is there, the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy")

from conftest import shared_dir  # noqa: E402

CARD = "scicevpr_tiny_random"
SEC = 1_000_000_000
REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "localization.launch.py"


def _launch_missing() -> str:
    try:
        import launch  # noqa: F401
        import launch_ros.actions  # noqa: F401
        import ros2launch.api  # noqa: F401
    except Exception as exc:  # ImportError, or composition_interfaces missing
        return f"{type(exc).__name__}: {exc}"
    return ""


@pytest.fixture(scope="module")
def launch_system():
    missing = _launch_missing()
    if not missing:
        return
    src = shared_dir() / "ros2_launch"
    if src.is_dir():
        pytest.fail(f"the ROS 2 launch system does not import ({missing}) although {src} is "
                    "there: run `make install` (scripts/install_ros2_launch.sh installs it)")
    pytest.skip(f"no ROS 2 launch system: {src} is absent and no system ROS 2 is sourced "
                f"({missing})")


@pytest.fixture(scope="module")
def ament_prefix(tmp_path_factory):
    """An install prefix as colcon lays it out for this package (lib/, share/, marker)."""
    prefix = tmp_path_factory.mktemp("ament_prefix")
    marker = prefix / "share" / "ament_index" / "resource_index" / "packages" / "vpr_ros"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    share = prefix / "share" / "vpr_ros"
    (share / "config").mkdir(parents=True)
    (share / "config" / "localizer.yaml").write_bytes(
        (REPO / "config" / "localizer.yaml").read_bytes())
    (share / "package.xml").write_bytes((REPO / "package.xml").read_bytes())
    exe = prefix / "lib" / "vpr_ros" / "localizer_node"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!{sys.executable}\nimport sys\nfrom vpr_ros.ros.localizer_node import "
                   "main\nsys.exit(main())\n")
    exe.chmod(0o755)
    return prefix


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory, sample_dir):
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.maps import benchmark_source, build_map

    out = tmp_path_factory.mktemp("launchmap") / "map"
    build_map(benchmark_source(sample_dir, "database")[:12], out,
              GlobalDescriber(CARD, device="cpu"), index="Flat", progress=False)
    return out


@pytest.fixture(scope="module")
def query_image(sample_dir):
    from vpr_ros.preprocess import load_image

    return load_image(sorted((sample_dir / "images" / "test" / "database").glob("*.jpg"))[3])


class Launch:
    """`ros2 launch <file> args...` as a process; its output goes to a file."""

    def __init__(self, args, env, prefix: Path, log: Path, launch_file: Path = LAUNCH_FILE):
        env = dict(env)
        env["AMENT_PREFIX_PATH"] = os.pathsep.join(
            [str(prefix)] + [p for p in env.get("AMENT_PREFIX_PATH", "").split(os.pathsep) if p])
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        # SIGINT as in a terminal even when pytest runs as a background job (which starts
        # with SIGINT ignored, and an ignored signal never reaches launch's handler)
        code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                "from ros2launch.api import launch_a_launch_file\n"
                "sys.exit(launch_a_launch_file(launch_file_path=sys.argv[1], "
                "launch_file_arguments=sys.argv[2:], noninteractive=True))\n")
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(launch_file)] + list(args),
                                     env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout=240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"launch did not end in {timeout} s:\n{self.output()[-3000:]}")
        finally:
            self._out.close()

    def stop(self) -> int:
        """Ctrl-C, as a person or systemd (KillSignal=SIGINT) stops it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.wait(60)


class Peer:
    """A plain rclpy node on the test's domain: publishes frames, collects ~/matches."""

    def __init__(self, domain: int):
        from rclpy.executors import SingleThreadedExecutor

        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = rclpy.create_node("vpr_launch_test_peer", context=self.context)
        self.lock = threading.Lock()
        self.matches = {}
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def listen(self, matches_topic: str):
        from std_msgs.msg import String

        self.matches[matches_topic] = []

        def cb(msg, topic=matches_topic):
            with self.lock:
                self.matches[topic].append(json.loads(msg.data))
        self.node.create_subscription(String, matches_topic, cb, 10)

    def answer(self, image_topic: str, matches_topic: str, rgb, launch: Launch, timeout=240):
        """Publish a frame on image_topic every second until the node answers."""
        from sensor_msgs.msg import Image

        from vpr_ros.ros.conversions import ns_to_stamp, rgb_to_image_msg

        pub = self.node.create_publisher(Image, image_topic, 10)
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            if launch.proc.poll() is not None:
                raise AssertionError(f"launch ended ({launch.proc.returncode}):\n"
                                     f"{launch.output()[-3000:]}")
            with self.lock:
                if self.matches[matches_topic]:
                    return self.matches[matches_topic][0]
            if pub.get_subscription_count() > 0:
                n += 1
                pub.publish(rgb_to_image_msg(rgb, ns_to_stamp(n * SEC), "launch_cam"))
            time.sleep(1.0)
        raise AssertionError(f"no answer on {matches_topic} in {timeout} s:\n"
                             f"{launch.output()[-3000:]}")

    def parameters(self, node: str, names):
        from rcl_interfaces.srv import GetParameters
        from rclpy.parameter import parameter_value_to_python

        client = self.node.create_client(GetParameters, f"{node}/get_parameters")
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(GetParameters.Request(names=list(names)))
        deadline = time.monotonic() + 30
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {n: parameter_value_to_python(v) for n, v in zip(names, future.result().values)}

    def diagnostics_stamp_under_sim_clock(self, node: str, start_sec: int = 5000) -> int:
        """Publish /clock from start_sec on, 1 s per 0.1 s; the stamp (s) of the first
        /diagnostics status of ``node`` that follows it, or of the last one seen."""
        from diagnostic_msgs.msg import DiagnosticArray
        from rosgraph_msgs.msg import Clock

        stamps = []

        def cb(arr):
            if any(st.name.startswith(node + ":") for st in arr.status):
                stamps.append(arr.header.stamp.sec)
        sub = self.node.create_subscription(DiagnosticArray, "/diagnostics", cb, 50)
        pub = self.node.create_publisher(Clock, "/clock", 10)
        for k in range(60):
            msg = Clock()
            msg.clock.sec = start_sec + k
            pub.publish(msg)
            time.sleep(0.1)
            if any(s >= start_sec for s in stamps):
                break
        self.node.destroy_subscription(sub)
        return max(stamps) if stamps else -1

    def diagnostics_value(self, node: str, key: str, timeout: float = 30.0,
                          clock_from: int = 7000) -> str:
        """The value of ``key`` in the first /diagnostics status of ``node`` that has it;
        /clock advances meanwhile (1 s per 0.1 s from ``clock_from``), for a node on sim time."""
        from diagnostic_msgs.msg import DiagnosticArray
        from rosgraph_msgs.msg import Clock

        found = []

        def cb(arr):
            for st in arr.status:
                if st.name.startswith(node + ":"):
                    found.extend(kv.value for kv in st.values if kv.key == key)
        sub = self.node.create_subscription(DiagnosticArray, "/diagnostics", cb, 50)
        pub = self.node.create_publisher(Clock, "/clock", 10)
        deadline, tick = time.monotonic() + timeout, 0
        while not found and time.monotonic() < deadline:
            msg = Clock()
            msg.clock.sec = clock_from + tick
            pub.publish(msg)
            tick += 1
            time.sleep(0.1)
        self.node.destroy_subscription(sub)
        self.node.destroy_publisher(pub)
        assert found, f"no /diagnostics status of {node} with {key!r}"
        return found[0]

    def change_state(self, node: str, transition: int) -> bool:
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        client = self.node.create_client(ChangeState, f"{node}/change_state")
        assert client.wait_for_service(timeout_sec=30)
        future = client.call_async(ChangeState.Request(transition=Transition(id=transition)))
        deadline = time.monotonic() + 60
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.05)
        return future.result().success

    def close(self):
        self.executor.shutdown(timeout_sec=5.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@pytest.fixture()
def peer(ros_domain):
    p = Peer(ros_domain)
    yield p
    p.close()


def _params_file(path: Path, **params) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}))
    return path


PARENT_LAUNCH = """
from launch import LaunchDescription
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource


def generate_launch_description():
    # a robot's bringup passing its own (empty) values through
    return LaunchDescription([IncludeLaunchDescription(
        PythonLaunchDescriptionSource({launch!r}),
        launch_arguments={{"map": "", "camera_topic": "", "device": "", "model": "",
                           "weights": "", "use_sim_time": "", "namespace": "",
                           "params_file": {params!r}}}.items())])
"""


def test_launch_arguments_win_and_node_answers(launch_system, ament_prefix, tiny_map,
                                               query_image, peer, tmp_path):
    """Two launches at once: (1) every argument given, over a params file that would fail
    with its own values, in a namespace with a relative camera topic, sim time on; (2) a
    parent launch file including this one with every argument empty: the map and camera
    come from the params file alone. Both reach active and answer frames; Ctrl-C ends each
    with status 0.  (`ros2 launch` itself refuses `name:=` with no value, so on the command
    line "empty" means "not given".)"""
    from lifecycle_msgs.msg import Transition

    bad = _params_file(tmp_path / "bad.yaml", map_path=str(tmp_path / "no_map"),
                       image_topic="wrong/topic", device="cuda:7", model="no_such_card",
                       use_sim_time=False)
    good = _params_file(tmp_path / "good.yaml", map_path=str(tiny_map), device="cpu",
                        image_topic="/cam2/image")
    peer.listen("/robot1/vpr_localizer/matches")
    peer.listen("/vpr_localizer/matches")
    args_win = Launch([f"map:={tiny_map}", "camera_topic:=front/image_raw", "namespace:=robot1",
                       "device:=cpu", f"model:={CARD}", "use_sim_time:=true",
                       f"params_file:={bad}", "omp_wait_policy:=active"], os.environ,
                      ament_prefix, tmp_path / "a.log")
    parent = tmp_path / "bringup.launch.py"
    parent.write_text(PARENT_LAUNCH.format(launch=str(LAUNCH_FILE), params=str(good)))
    from_file = Launch([], os.environ, ament_prefix, tmp_path / "b.log", launch_file=parent)
    try:
        m = peer.answer("/robot1/front/image_raw", "/robot1/vpr_localizer/matches", query_image,
                        args_win)
        assert m["camera"] == "/robot1/front/image_raw" and m["camera_frame_id"] == "launch_cam"
        assert m["place_ids"][0] == 3 and m["frame_id"] == "map"
        values = peer.parameters("/robot1/vpr_localizer",
                                 ["map_path", "image_topic", "device", "model", "weights",
                                  "use_sim_time"])
        assert values == {"map_path": str(tiny_map), "image_topic": "front/image_raw",
                          "device": "cpu", "model": CARD, "weights": "", "use_sim_time": True}
        # use_sim_time:=true is in effect: the node's clock follows /clock
        assert 5000 <= peer.diagnostics_stamp_under_sim_clock("/robot1/vpr_localizer") < 6000
        # a lifecycle manager (or launch_ros's LifecycleNode(autostart=True)) driving the
        # already self-started node: its transitions are refused, the node keeps working
        assert not peer.change_state("/robot1/vpr_localizer", Transition.TRANSITION_CONFIGURE)
        assert not peer.change_state("/robot1/vpr_localizer", Transition.TRANSITION_ACTIVATE)

        m = peer.answer("/cam2/image", "/vpr_localizer/matches", query_image, from_file)
        assert m["camera"] == "/cam2/image" and m["place_ids"][0] == 3
        # omp_wait_policy reaches the node's process: given, and the default (passive)
        assert peer.diagnostics_value("/robot1/vpr_localizer", "omp_wait_policy") == "ACTIVE"
        assert peer.diagnostics_value("/vpr_localizer", "omp_wait_policy") == "PASSIVE"
        assert peer.parameters("/vpr_localizer", ["map_path"])["map_path"] == str(tiny_map)
        with peer.lock:
            peer.matches["/robot1/vpr_localizer/matches"].clear()
        peer.answer("/robot1/front/image_raw", "/robot1/vpr_localizer/matches", query_image,
                    args_win, timeout=60)
    finally:
        codes = (args_win.stop(), from_file.stop())
    assert codes == (0, 0), args_win.output()[-2000:] + from_file.output()[-2000:]
    assert "active: listening on /robot1/front/image_raw" in args_win.output()


def test_failed_start_fails_the_launch(launch_system, ament_prefix, tiny_map, ros_domain,
                                       tmp_path):
    """A start that cannot work ends the launch with status 1 and says why, in one line
    from the node and one from the launch; nothing keeps running."""
    import torch

    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not a checkpoint")
    empty = _params_file(tmp_path / "empty.yaml", device="cpu")
    cases = {
        "missing map": (["map:=" + str(tmp_path / "nope"), "device:=cpu"], "map folder not found"),
        "bad weights": ([f"map:={tiny_map}", f"weights:={bogus}", f"model:={CARD}",
                         "device:=cpu"], str(bogus)),
        "no map anywhere": ([f"params_file:={empty}"], "map_path is empty"),
        "bad sim time": ([f"map:={tiny_map}", "use_sim_time:=maybe"],
                         "use_sim_time must be true or false"),
        "missing params file": ([f"params_file:={tmp_path / 'none.yaml'}"],
                                "params_file not found"),
        "bad omp wait policy": ([f"map:={tiny_map}", "omp_wait_policy:=sometimes"],
                                "omp_wait_policy must be one of passive, active or empty"),
    }
    if not torch.cuda.is_available():
        cases["cuda without a GPU"] = ([f"map:={tiny_map}", "device:=cuda"], "CUDA")
    launches = {name: Launch(args, os.environ, ament_prefix, tmp_path / f"{i}.log")
                for i, (name, (args, _)) in enumerate(cases.items())}
    for name, launch in launches.items():
        code = launch.wait(300)
        out = launch.output()
        assert code == 1, f"{name}: status {code}\n{out[-3000:]}"
        assert cases[name][1] in out, f"{name}:\n{out[-3000:]}"
        assert "Traceback" not in out, f"{name}:\n{out[-3000:]}"
        if name not in ("bad sim time", "missing params file", "bad omp wait policy"):
            # the node ran and failed
            assert out.count("configure failed") == 1, f"{name}:\n{out[-3000:]}"
            assert "vpr_localizer exited with status 1" in out, f"{name}:\n{out[-3000:]}"


def test_launch_file_declares_the_documented_arguments(launch_system):
    import importlib.util

    spec = importlib.util.spec_from_file_location("vpr_launch", LAUNCH_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from launch.actions import DeclareLaunchArgument

    ld = mod.generate_launch_description()
    names = {e.name for e in ld.entities if isinstance(e, DeclareLaunchArgument)}
    assert names == {"map", "camera_topic", "params_file", "namespace", "device", "model",
                     "weights", "use_sim_time", "omp_wait_policy"}
    docs = (REPO / "docs" / "ros.md").read_text()
    for name in names:
        assert f"`{name}`" in docs, f"launch argument {name} is not documented in docs/ros.md"
