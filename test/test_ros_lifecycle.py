"""The localizer node's lifecycle, relocalization, Nav2 seed, RViz markers and several
cameras, with real rclpy nodes over Fast DDS on loopback (private domain per test).

Everything a robot or an operator does goes through ROS interfaces from a peer node:
lifecycle transitions and parameters through the standard services, ~/relocalize, topics.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseWithCovarianceStamped  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from nav_msgs.msg import Odometry  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Bool, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402
from visualization_msgs.msg import Marker, MarkerArray  # noqa: E402

from vpr_ros.ros.conversions import (ns_to_stamp, rgb_to_compressed_msg,  # noqa: E402
                                     rgb_to_image_msg)
from vpr_ros.ros.localizer_node import (LocalizerNode, camera_topics,  # noqa: E402
                                        change_refused)
from vpr_ros.ros.outputs import place_spacing, score_colour  # noqa: E402

from test_ros_node import Harness, wait_for  # noqa: E402

CARD = "scicevpr_tiny_random"
SEC = 1_000_000_000
NS = "/vpr_localizer"
LATCHED = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)


def _build(sample_dir, out, start, stop, frame_id):
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.maps import benchmark_source, build_map

    build_map(benchmark_source(sample_dir, "database")[start:stop], out,
              GlobalDescriber(CARD, device="cpu"), index="Flat", progress=False,
              frame_id=frame_id)
    return out


@pytest.fixture(scope="module")
def two_maps(tmp_path_factory, sample_dir):
    """Map A: database images 0..11 in frame map; map B: images 12..23 in frame utm."""
    root = tmp_path_factory.mktemp("lifecycle_maps")
    return (_build(sample_dir, root / "a", 0, 12, "map"),
            _build(sample_dir, root / "b", 12, 24, "utm"))


@pytest.fixture(scope="module")
def images(sample_dir):
    from vpr_ros.preprocess import load_image

    return [load_image(p) for p in
            sorted((sample_dir / "images" / "test" / "database").glob("*.jpg"))[:24]]


class Rig(Harness):
    """The node and a peer in one private context, spun by a background executor; the
    peer talks to the node only through topics and services (Harness.close cleans up)."""

    def __init__(self, domain: int, params: dict):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        self.node = LocalizerNode(context=self.context, parameter_overrides=[
            Parameter(k, value=v) for k, v in params.items()])
        self.peer = Node("vpr_lifecycle_peer", context=self.context)
        self.lock = threading.Lock()
        self.got = {"matches": [], "initialpose": [], "markers": [], "map_markers": [],
                    "diag": [], "pose": [], "localized": []}
        self._sub(String, f"{NS}/matches", "matches", 100, lambda m: json.loads(m.data))
        self._sub(PoseWithCovarianceStamped, f"{NS}/pose", "pose", 100)
        self._sub(Bool, f"{NS}/localized", "localized", LATCHED, lambda m: m.data)
        self._sub(PoseWithCovarianceStamped, "/initialpose", "initialpose", LATCHED)
        self._sub(MarkerArray, f"{NS}/markers", "markers", 100)
        self._sub(DiagnosticArray, "/diagnostics", "diag", 100)
        self.executor = MultiThreadedExecutor(num_threads=3, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _sub(self, msg_type, topic, key, qos, convert=lambda m: m):
        def cb(msg):
            with self.lock:
                self.got[key].append(convert(msg))
        self.peer.create_subscription(msg_type, topic, cb, qos)

    def call(self, srv_type, name, request, timeout=180):
        client = self.peer.create_client(srv_type, name)
        assert client.wait_for_service(timeout_sec=30), name
        future = client.call_async(request)
        wait_for(future.done, timeout, f"{name} reply")
        return future.result()

    def transition(self, transition_id) -> bool:
        return self.call(ChangeState, f"{NS}/change_state",
                         ChangeState.Request(transition=Transition(id=transition_id))).success

    def set_params(self, **params):
        req = SetParameters.Request(parameters=[Parameter(k, value=v).to_parameter_msg()
                                                for k, v in params.items()])
        return self.call(SetParameters, f"{NS}/set_parameters", req).results

    def publisher(self, msg_type, topic):
        pub = self.peer.create_publisher(msg_type, topic, QoSProfile(depth=10))
        wait_for(lambda: pub.get_subscription_count() > 0, 30, f"a subscriber on {topic}")
        return pub

    def frame(self, pub, msg, n_before):
        pub.publish(msg)
        wait_for(lambda: len(self.got["matches"]) > n_before, 120, "a match")
        with self.lock:
            return self.got["matches"][-1]

    def diag_values(self):
        with self.lock:
            arrays = list(self.got["diag"])
        for arr in reversed(arrays):
            for st in arr.status:
                if st.name.startswith(NS):
                    return {kv.key: kv.value for kv in st.values}
        return {}


@pytest.fixture()
def rig_factory(ros_domain):
    made = []

    def make(params):
        r = Rig(ros_domain, params)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_switch_maps_without_restart(rig_factory, two_maps, images):
    """cleanup -> set map_path -> configure -> activate, all over DDS, switches from map A
    (frame map) to map B (frame utm); poses follow the map's frame unless frame_id says."""
    map_a, map_b = two_maps
    rig = rig_factory({"map_path": str(map_a), "device": "cpu", "autostart": False,
                       "confidence_threshold": 0.0, "stream": False})
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    pub = rig.publisher(Image, "/camera/image_raw")
    m = rig.frame(pub, rgb_to_image_msg(images[3], ns_to_stamp(SEC), "cam"), 0)
    assert m["image_name"] == "database_0003.jpg" or m["place_ids"][0] == 3
    assert m["frame_id"] == "map"
    a_name = m["image_name"]

    refused = rig.set_params(map_path=str(map_b))[0]
    assert not refused.successful and "unconfigured" in refused.reason
    refused = rig.set_params(image_topic="other/image")[0]
    assert not refused.successful and "not active" in refused.reason

    assert rig.transition(Transition.TRANSITION_DEACTIVATE)
    assert rig.transition(Transition.TRANSITION_CLEANUP)
    results = rig.set_params(map_path=str(map_b), precision="fp32", device="cpu", model=CARD,
                             weights="")
    assert all(r.successful for r in results), [r.reason for r in results]
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: pub.get_subscription_count() > 0, 30, "resubscription")
    time.sleep(0.5)
    m = rig.frame(pub, rgb_to_image_msg(images[15], ns_to_stamp(2 * SEC), "cam"), 1)
    assert m["place_ids"][0] == 3 and m["image_name"] != a_name   # place 3 of map B
    assert m["frame_id"] == "utm"                                 # the map's own frame
    wait_for(lambda: rig.diag_values().get("map") == str(map_b), 10, "diagnostics of map B")
    assert rig.diag_values()["map_size"] == "12"

    assert rig.set_params(frame_id="world")[0].successful          # live override
    m = rig.frame(pub, rgb_to_image_msg(images[16], ns_to_stamp(3 * SEC), "cam"), 2)
    assert m["frame_id"] == "world"


def test_acceleration_switches_are_node_parameters(rig_factory, two_maps, images, tmp_path):
    """native_kernels / integer_attention / kernel_cache are parameters (unconfigured): off
    runs int8 on torch ops; on builds the kernels into kernel_cache at configure; the
    diagnostics say what the switches came to."""
    cache = tmp_path / "kernels"
    rig = rig_factory({"map_path": str(two_maps[0]), "device": "cpu", "precision": "int8",
                       "autostart": False, "stream": False, "native_kernels": "off",
                       "integer_attention": "off", "kernel_cache": str(cache),
                       "patch_conv": "fp32"})
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    pub = rig.publisher(Image, "/camera/image_raw")
    m = rig.frame(pub, rgb_to_image_msg(images[3], ns_to_stamp(SEC), "cam"), 0)
    first_off = m["place_ids"][0]
    wait_for(lambda: rig.diag_values().get("native_kernels") == "off", 10, "diagnostics")
    assert rig.diag_values()["integer_attention"] == "off"
    assert rig.diag_values()["patch_conv"] == "fp32"
    assert rig.diag_values()["conv_transpose"] == "bf16"
    assert not cache.exists() or not any(cache.rglob("*.so"))      # nothing was built

    refused = rig.set_params(native_kernels="on")[0]
    assert not refused.successful and "unconfigured" in refused.reason
    assert rig.transition(Transition.TRANSITION_DEACTIVATE)
    assert rig.transition(Transition.TRANSITION_CLEANUP)
    bad = rig.set_params(native_kernels="fast")[0]
    assert not bad.successful and "auto, on, off" in bad.reason
    bad = rig.set_params(conv_transpose="fp8")[0]
    assert not bad.successful and "bf16, int8" in bad.reason
    results = rig.set_params(native_kernels="on", integer_attention="on")
    assert all(r.successful for r in results), [r.reason for r in results]
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert any(cache.rglob("*.so")), "the kernels are built into kernel_cache at configure"
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: pub.get_subscription_count() > 0, 30, "resubscription")
    time.sleep(0.5)
    m = rig.frame(pub, rgb_to_image_msg(images[3], ns_to_stamp(2 * SEC), "cam"), 1)
    assert m["place_ids"][0] == first_off
    wait_for(lambda: rig.diag_values().get("native_kernels") == "on", 10, "diagnostics")
    assert rig.diag_values()["integer_attention"] == "on"
    assert float(rig.diag_values()["warm_up_s"]) > 0     # one blank frame at configure


def test_relocalize_initialpose_markers_and_lost_state(rig_factory, two_maps, images):
    map_a, _ = two_maps
    rig = rig_factory({"map_path": str(map_a), "device": "cpu", "confidence_threshold": 0.0,
                       "publish_initialpose": True, "top_k": 4, "lost_after_frames": 1,
                       "autostart": False, "stream": False})
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    pub = rig.publisher(Image, "/camera/image_raw")
    m = rig.frame(pub, rgb_to_image_msg(images[2], ns_to_stamp(SEC), "cam"), 0)
    assert m["localized"] and m["state"] == "localized" and m["initialpose"]
    wait_for(lambda: len(rig.got["initialpose"]) == 1, 30, "/initialpose")
    seed = rig.got["initialpose"][0]
    spacing = rig.node._spacing_m
    assert seed.header.frame_id == "map" and seed.header.stamp.sec == 1
    assert seed.pose.covariance[0] == pytest.approx((spacing / m["confidence"]) ** 2, rel=1e-6)
    assert seed.pose.pose.position.y == pytest.approx(m["position"][1])
    m = rig.frame(pub, rgb_to_image_msg(images[5], ns_to_stamp(2 * SEC), "cam"), 1)
    assert m["localized"] and not m["initialpose"]              # only once ...
    reply = rig.call(Trigger, f"{NS}/relocalize", Trigger.Request())
    assert reply.success and "relocalizing" in reply.message
    m = rig.frame(pub, rgb_to_image_msg(images[6], ns_to_stamp(3 * SEC), "cam"), 2)
    assert m["initialpose"]                                      # ... and after relocalize
    wait_for(lambda: len(rig.got["initialpose"]) == 2, 30, "the second /initialpose")

    # RViz: the map's places, latched for a late subscriber
    late = []
    rig.peer.create_subscription(MarkerArray, f"{NS}/map_markers", late.append, LATCHED)
    wait_for(lambda: late, 30, "the latched map markers")
    points = [mk for mk in late[0].markers if mk.ns == "places"][0]
    assert points.type == Marker.POINTS and len(points.points) == 12
    wait_for(lambda: len(rig.got["markers"]) >= 3, 30, "per-frame markers")
    by_ns = {mk.ns: mk for mk in rig.got["markers"][-1].markers}
    assert by_ns["best"].color.g > 0.5 and by_ns["best"].color.r < 0.5   # confident: green
    cands = by_ns["candidates"]
    assert len(cands.points) == 4 == len(cands.colors)
    assert cands.colors[0].g >= cands.colors[-1].g                      # best score greenest

    # nothing confident for lost_after_frames frames: lost, orange marker, no pose, no seed
    assert rig.set_params(confidence_threshold=1.0)[0].successful
    m = rig.frame(pub, rgb_to_image_msg(images[7], ns_to_stamp(4 * SEC), "cam"), 3)
    assert not m["confident"] and m["state"] == "lost" and not m["initialpose"]
    wait_for(lambda: len(rig.got["markers"]) >= 4, 30, "markers of the unconfident frame")
    best = {mk.ns: mk for mk in rig.got["markers"][-1].markers}["best"]
    assert best.color.r > 0.9 and best.color.g < 0.9                    # orange
    wait_for(lambda: rig.diag_values().get("localized") == "false"
             and rig.diag_values().get("relocalizations") == "1", 10, "lost in diagnostics")
    assert len(rig.got["initialpose"]) == 2
    # ~/localized (latched) changed exactly with the state
    wait_for(lambda: rig.got["localized"] == [False, True, False, True, False], 10,
             f"~/localized changes, got {rig.got['localized']}")
    late = []
    rig.peer.create_subscription(Bool, f"{NS}/localized", late.append, LATCHED)
    wait_for(lambda: late, 30, "the latched state")
    assert late[0].data is False


def test_several_cameras_and_odometry(rig_factory, two_maps, images):
    """Two cameras (raw and compressed), each with its own slot and belief, frames tagged
    with their camera; bad odometry is skipped and counted."""
    map_a, _ = two_maps
    rig = rig_factory({"map_path": str(map_a), "device": "cpu", "autostart": False,
                       "confidence_threshold": 0.0, "stream": False,
                       "image_topics": ["front/image_raw", "rear/image_raw/compressed"],
                       "odometry_topic": "odom"})
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    front = rig.publisher(Image, "/front/image_raw")
    rear = rig.publisher(CompressedImage, "/rear/image_raw/compressed")
    m1 = rig.frame(front, rgb_to_image_msg(images[1], ns_to_stamp(SEC), "front_cam"), 0)
    m2 = rig.frame(rear, rgb_to_compressed_msg(images[8], ns_to_stamp(SEC), "rear_cam",
                                               fmt="png"), 1)
    assert (m1["camera"], m1["camera_index"], m1["camera_frame_id"]) == \
        ("/front/image_raw", 0, "front_cam")
    assert (m2["camera"], m2["camera_index"], m2["camera_frame_id"]) == \
        ("/rear/image_raw/compressed", 1, "rear_cam")
    assert m1["place_ids"][0] == 1 and m2["place_ids"][0] == 8
    cams = rig.node.cameras
    assert [c.slot.received for c in cams] == [1, 1]
    assert cams[0].localizer is not cams[1].localizer           # a belief per camera
    wait_for(lambda: rig.diag_values().get("camera1_frames_processed") == "1", 10,
             "per-camera diagnostics")
    vals = rig.diag_values()
    assert vals["cameras"] == "2" and vals["camera0_topic"] == "/front/image_raw"

    odom = rig.publisher(Odometry, "/odom")
    bad = Odometry()
    bad.header.stamp = ns_to_stamp(SEC)
    bad.pose.pose.position.x = float("nan")
    good = Odometry()
    good.header.stamp = ns_to_stamp(2 * SEC)
    odom.publish(bad)
    odom.publish(good)
    wait_for(lambda: rig.node.odometry["received"] == 2, 30, "two odometry messages")
    assert rig.node.odometry["bad"] == 1
    wait_for(lambda: rig.diag_values().get("odometry_bad") == "1", 10, "odometry counters")
    m3 = rig.frame(front, rgb_to_image_msg(images[2], ns_to_stamp(3 * SEC), "front_cam"), 2)
    assert m3["place_ids"][0] == 2                               # still running


def test_parameter_rules():
    assert change_refused("map_path", "active") and change_refused("map_path", "inactive")
    assert change_refused("map_path", "unconfigured") is None
    assert change_refused("image_topic", "inactive") is None
    assert "not active" in change_refused("image_topics", "active")
    assert change_refused("top_k", "active") is None
    assert "starts" in change_refused("autostart", "unconfigured")
    assert camera_topics([], "camera/image_raw", "compressed") == \
        [("camera/image_raw/compressed", "compressed")]
    assert camera_topics(["a", "b/compressed"], "camera/image_raw", "raw") == \
        [("a", "raw"), ("b/compressed", "compressed")]
    from vpr_ros.errors import ConfigError

    with pytest.raises(ConfigError, match="not both"):
        camera_topics(["a"], "/front/image", "raw")
    with pytest.raises(ConfigError, match="twice"):
        camera_topics(["a", "a"], "camera/image_raw", "raw")
    grid = np.array([[x * 20.0, 0.0, 0.0] for x in range(10)])
    assert place_spacing(grid) == pytest.approx(20.0)
    assert place_spacing(grid[:1]) == pytest.approx(0.5)
    colours = score_colour([0.9, 0.5, 0.1])
    assert colours[0, 1] == 1.0 and colours[-1, 0] == 1.0


def test_out_of_range_parameter_at_start_is_one_line(ros_domain, two_maps):
    """`localizer_node --ros-args -p top_k:=0`: one clear line and status 1, no traceback;
    the same for a camera topic that is not a valid ROS name (found at activate)."""
    import os

    from test_ros_node import _collect, _start_node

    for args, word in ((["-p", "top_k:=0"], "top_k"), (["-p", "queue_depth:=abc"], "queue_depth"),
                       (["-p", f"map_path:={two_maps[0]}", "-p", "device:=cpu", "-p",
                         "image_topic:=bad topic"], "activate failed: InvalidTopicName")):
        code, out = _collect(_start_node(args, os.environ), timeout=180)
        out = "\n".join(line for line in out.splitlines() if ": configured in" not in line)
        assert code == 1, out
        assert ("bad parameter" in out or "activate failed" in out) and word in out, out
        assert "Traceback" not in out, out
        assert len([line for line in out.splitlines() if line.strip()]) == 1, out


def test_rviz_config_shows_the_node_topics(repo_root):
    import yaml

    doc = yaml.safe_load((repo_root / "config" / "vpr_localizer.rviz").read_text())
    displays = {d["Topic"]["Value"]: d for d in doc["Visualization Manager"]["Displays"]
                if "Topic" in d}
    for topic in ("markers", "map_markers", "pose", "candidates"):
        assert f"{NS}/{topic}" in displays, topic
    assert displays[f"{NS}/map_markers"]["Topic"]["Durability Policy"] == "Transient Local"
    assert displays[f"{NS}/map_markers"]["Class"] == "rviz_default_plugins/MarkerArray"


@pytest.fixture(scope="module")
def route_map(tmp_path_factory, sample_dir):
    """30 consecutive places with a stream calibration in the manifest, as `vpr eval` stores
    a fitted one (here: confidence = the stream's belief mass near the answer)."""
    out = _build(sample_dir, tmp_path_factory.mktemp("route") / "map", 0, 30, "map")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stream_calibration"] = {"model": "logistic", "bias": 0.0, "w_mass": 1.0,
                                      "w_fit": 0.0, "threshold": 0.5, "fitted": True}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def test_stream_localizer_in_the_node(rig_factory, route_map, images, sample_dir):
    """stream on (the default): one stream per camera drives localized/lost, ~/pose and
    /initialpose only when the stream is confident, ~/relocalize resets it, odometry feeds
    it (bad and rejected odometry counted)."""
    from vpr_ros.preprocess import load_image

    frames = [load_image(p) for p in
              sorted((sample_dir / "images" / "test" / "database").glob("*.jpg"))[:30]]
    rig = rig_factory({"map_path": str(route_map), "device": "cpu", "autostart": False,
                       "publish_initialpose": True, "odometry_topic": "odom"})
    assert rig.transition(Transition.TRANSITION_CONFIGURE)
    assert rig.transition(Transition.TRANSITION_ACTIVATE)
    assert rig.node.cameras[0].stream is not None and rig.node.info["stream"] == "on"
    pub = rig.publisher(Image, "/camera/image_raw")
    odom = rig.publisher(Odometry, "/odom")

    def odometry(stamp_ns, x):
        msg = Odometry()
        msg.header.stamp = ns_to_stamp(stamp_ns)
        msg.pose.pose.position.x = float(x)
        before = rig.node.odometry["received"]
        odom.publish(msg)
        # odometry and images are separate topics: the frame published next must find this
        # message queued (on a robot odometry runs ahead of the camera's latency)
        wait_for(lambda: rig.node.odometry["received"] > before, 30, "the odometry message")

    def drive(first, last, t0):
        out = []
        for i in range(first, last):
            stamp = t0 + i * SEC // 4
            odometry(stamp, 20.0 * i)                # one place spacing (20 m) per frame
            out.append(rig.frame(pub, rgb_to_image_msg(frames[i], ns_to_stamp(stamp), "cam"),
                                 len(rig.got["matches"])))
        return out

    ms = drive(0, 12, 100 * SEC)
    assert all(m["stream"] and m["stream"]["method"] for m in ms)
    assert ms[-1]["localized"] and ms[-1]["state"] == "localized", \
        [(m["confidence"], m["place_id"]) for m in ms]
    assert [m["place_id"] for m in ms[-4:]] == [8, 9, 10, 11]
    wait_for(lambda: len(rig.got["pose"]) == sum(m["confident"] for m in ms), 30, "poses")
    assert sum(m["initialpose"] for m in ms) == 1
    wait_for(lambda: len(rig.got["initialpose"]) == 1, 30, "/initialpose")
    assert rig.node.odometry["received"] == 12 and rig.node.odometry["rejected"] == 0

    assert rig.call(Trigger, f"{NS}/relocalize", Trigger.Request()).success
    assert rig.node.cameras[0].stream.localized is False
    odometry(200 * SEC, 1e9)                           # a jump: rejected by the stream
    bad = Odometry()
    bad.pose.pose.position.y = float("inf")            # not finite: skipped by the node
    odom.publish(bad)
    wait_for(lambda: rig.node.odometry["received"] == 14, 30, "the bad odometry")
    assert rig.node.odometry["bad"] == 1        # the jump is judged by the stream, later
    ms = drive(12, 30, 300 * SEC)
    assert not ms[0]["localized"]                      # relocalizing from scratch
    assert ms[-1]["localized"] and ms[-1]["place_id"] == 29
    wait_for(lambda: len(rig.got["initialpose"]) == 2, 30, "/initialpose after relocalize")
    # the stream restarts its odometry track at a jump, so the first message after it is a
    # jump back: rejected too, then the track goes on
    assert rig.node.odometry["rejected"] == 2
    wait_for(lambda: rig.diag_values().get("odometry_rejected") == "2"
             and rig.diag_values().get("stream") == "on", 10, "stream diagnostics")


def test_every_message_package_the_node_imports_is_declared(repo_root):
    """package.xml (rosdep on a robot) and requirements-ros-wheels.txt (the venv) name every
    interface package that vpr_ros/ros imports."""
    import re
    import xml.etree.ElementTree as ET

    used = set()
    for path in (repo_root / "vpr_ros" / "ros").glob("*.py"):
        used |= set(re.findall(r"^\s*from (\w+)\.(?:msg|srv) import", path.read_text(), re.M))
    assert {"std_srvs", "visualization_msgs", "nav_msgs", "geometry_msgs"} <= used
    deps = {e.text for e in ET.parse(repo_root / "package.xml").getroot().iter("exec_depend")}
    wheels = set((repo_root / "requirements-ros-wheels.txt").read_text().split())
    for pkg in sorted(used - {"builtin_interfaces", "rcl_interfaces"}):   # come with rclpy
        assert pkg in deps, f"{pkg} missing from package.xml"
        assert "ros-" + pkg.replace("_", "-") in wheels, f"{pkg} missing from the wheels list"
