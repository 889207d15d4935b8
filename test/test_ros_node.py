"""The ROS 2 localizer node, for real: rclpy nodes talking over Fast DDS on loopback.

Every test runs on its own DDS domain (``ros_domain`` fixture) with its own rclpy context,
and removes its nodes and context at the end.  Waits poll with generous timeouts.
"""

from __future__ import annotations

import json
import os
import py_compile
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402

from vpr_ros.preprocess import load_image  # noqa: E402
from vpr_ros.ros.conversions import (ns_to_stamp, rgb_to_compressed_msg,  # noqa: E402
                                     rgb_to_image_msg)
from vpr_ros.ros.localizer_node import (LocalizerNode, covariance_from_confidence,  # noqa: E402
                                        validate_parameter)

CARD = "scicevpr_tiny_random"
SEC = 1_000_000_000


def wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def tiny_map(tmp_path_factory, sample_dir):
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.maps import benchmark_source, build_map

    out = tmp_path_factory.mktemp("rosmap") / "map"
    describer = GlobalDescriber(CARD, device="cpu")
    build_map(benchmark_source(sample_dir, "database")[:20], out, describer, index="Flat",
              progress=False)
    return out


@pytest.fixture(scope="module")
def query_images(sample_dir):
    paths = sorted((sample_dir / "images" / "test" / "database").glob("*.jpg"))[:20]
    return [load_image(p) for p in paths]


class Harness:
    """A LocalizerNode and a test node in one private context, spun by a background executor."""

    def __init__(self, domain: int, params: dict, autostart: bool = True):
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain)
        overrides = [Parameter(k, value=v) for k, v in params.items()]
        self.node = LocalizerNode(context=self.context, parameter_overrides=overrides)
        self.peer = Node("vpr_test_peer", context=self.context)
        self.lock = threading.Lock()
        self.matches, self.poses, self.candidates, self.diags = [], [], [], []
        ns = "/vpr_localizer"
        self.peer.create_subscription(String, f"{ns}/matches", self._add(self.matches, True), 100)
        self.peer.create_subscription(PoseWithCovarianceStamped, f"{ns}/pose",
                                      self._add(self.poses), 100)
        self.peer.create_subscription(PoseArray, f"{ns}/candidates", self._add(self.candidates),
                                      100)
        self.peer.create_subscription(DiagnosticArray, "/diagnostics", self._add(self.diags), 100)
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        self.raw_pub = self.peer.create_publisher(Image, "/camera/image_raw", qos)
        self.jpeg_pub = self.peer.create_publisher(CompressedImage, "/camera/image_raw/compressed",
                                                   qos)
        self.executor = MultiThreadedExecutor(num_threads=2, context=self.context)
        self.executor.add_node(self.node)
        self.executor.add_node(self.peer)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()
        if autostart:
            assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS, \
                self.node.configure_error
            assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS

    def _add(self, bucket, is_json=False):
        def cb(msg):
            with self.lock:
                bucket.append(json.loads(msg.data) if is_json else msg)
        return cb

    def wait_subscribed(self, pub):
        wait_for(lambda: pub.get_subscription_count() > 0, 30, "the node to subscribe")
        wait_for(lambda: self.peer.count_publishers("/vpr_localizer/matches") > 0, 30,
                 "the matches publisher")
        time.sleep(0.5)

    def close(self):
        try:
            self.executor.shutdown(timeout_sec=5.0)
            self.node._stop_worker()
            self.node.destroy_node()
            self.peer.destroy_node()
        finally:
            rclpy.try_shutdown(context=self.context)


@pytest.fixture()
def harness_factory(ros_domain):
    made = []

    def make(params, autostart=True):
        h = Harness(ros_domain, params, autostart)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _params(tiny_map, **extra):
    # frame by frame: these tests check the single-frame pipeline (the stream localizer
    # inside the node is tested in test_ros_lifecycle.py)
    p = {"map_path": str(tiny_map), "device": "cpu", "autostart": False, "stream": False}
    p.update(extra)
    return p


@pytest.mark.parametrize("transport", ["raw", "compressed"])
def test_frames_in_matches_poses_candidates_out(harness_factory, tiny_map, query_images,
                                                transport):
    h = harness_factory(_params(tiny_map, image_transport=transport, frame_id="world",
                                top_k=5, confidence_threshold=0.0))
    pub = h.raw_pub if transport == "raw" else h.jpeg_pub
    h.wait_subscribed(pub)
    stamps = [(7 + i) * SEC + 123 for i in range(3)]
    for i, stamp in enumerate(stamps):
        img = query_images[i * 3]
        msg = (rgb_to_image_msg(img, ns_to_stamp(stamp), "cam", encoding="bgr8")
               if transport == "raw" else rgb_to_compressed_msg(img, ns_to_stamp(stamp), "cam",
                                                                fmt="png"))
        pub.publish(msg)
        wait_for(lambda: len(h.matches) > i, 60, f"matches for frame {i}")
    with h.lock:
        matches = list(h.matches)
    assert [m["stamp_ns"] for m in matches] == stamps
    for i, m in enumerate(matches):
        assert m["frame_id"] == "world" and m["camera_frame_id"] == "cam"
        assert len(m["place_ids"]) == 5 == len(m["scores"]) == len(m["image_names"])
        assert m["scores"] == sorted(m["scores"], reverse=True)
        assert m["confident"] and 0.0 <= m["confidence"] <= 1.0
        # the query is a map image itself: the best match is that very place
        assert m["place_ids"][0] == i * 3
        assert m["score"] == pytest.approx(1.0, abs=1e-3 if transport == "raw" else 1e-4)
        assert {"convert", "describe", "search", "total"} <= set(m["timings_ms"])
    wait_for(lambda: len(h.poses) == 3 and len(h.candidates) == 3, 30, "poses and candidates")
    for pose, cand, stamp in zip(h.poses, h.candidates, stamps):
        for msg in (pose, cand):
            assert msg.header.frame_id == "world"
            assert msg.header.stamp.sec * SEC + msg.header.stamp.nanosec == stamp
        assert len(cand.poses) == 5
        assert pose.pose.covariance[0] > 0 and pose.pose.covariance[35] > 0
    i0 = matches[0]["place_ids"][0]
    assert h.poses[0].pose.pose.position.y == pytest.approx(31500.0 + 20.0 * i0)

    def active_diag():
        with h.lock:
            for arr in h.diags:
                for st in arr.status:
                    vals = {kv.key: kv.value for kv in st.values}
                    if vals.get("state") == "active" and vals.get("frames_processed") == "3":
                        return vals
        return None
    wait_for(lambda: active_diag() is not None, 10, "diagnostics after 3 frames")
    vals = active_diag()
    assert vals["map_size"] == "20" and vals["device"] == "cpu"
    assert vals["frames_dropped"] == "0" and vals["frames_bad"] == "0"
    assert "latency_describe_ms_mean" in vals and "input_rate_hz" in vals


def test_unconfident_match_publishes_no_pose_and_debug_image(harness_factory, tiny_map,
                                                             query_images, sample_dir):
    h = harness_factory(_params(tiny_map, confidence_threshold=1.0, publish_debug_image=True,
                                map_images_dir=str(sample_dir / "images/test/database")))
    debug = []
    h.peer.create_subscription(Image, "/vpr_localizer/debug_image", debug.append, 10)
    h.wait_subscribed(h.raw_pub)
    wait_for(lambda: h.node.count_subscribers("/vpr_localizer/debug_image") > 0, 30,
             "the debug image subscription")
    h.raw_pub.publish(rgb_to_image_msg(query_images[0], ns_to_stamp(SEC), "cam"))
    wait_for(lambda: len(h.matches) == 1 and len(h.candidates) == 1 and debug, 60,
             "one match and a debug image")
    time.sleep(0.5)
    assert h.matches[0]["confident"] is False
    assert h.poses == []
    img = debug[0]
    assert img.encoding == "rgb8" and img.header.frame_id == "map"
    assert img.header.stamp.sec == 1 and img.height > 100 and img.width > 2 * img.height
    pixels = np.frombuffer(bytes(img.data), np.uint8).reshape(img.height, img.width, 3)
    left, right = pixels[:192, : img.width // 2 - 2], pixels[:192, img.width // 2 + 2:]
    # both panels are real images (the match was found in map_images_dir), not the grey box
    assert left.std() > 5 and right.std() > 5


def test_burst_drops_stale_frames(harness_factory, tiny_map, query_images):
    h = harness_factory(_params(tiny_map, max_rate_hz=1.0))
    h.wait_subscribed(h.raw_pub)
    n = 30
    stamps = [(100 + i) * SEC for i in range(n)]
    for i, s in enumerate(stamps):
        h.raw_pub.publish(rgb_to_image_msg(query_images[i % 20], ns_to_stamp(s), "cam"))
        time.sleep(0.01)
        assert h.node.slot.pending <= 1        # never more than one frame held
    wait_for(lambda: any(m["stamp_ns"] == stamps[-1] for m in list(h.matches)), 60,
             "the newest frame to be processed")
    time.sleep(1.0)
    processed = [m["stamp_ns"] for m in h.matches]
    slot = h.node.slot
    assert len(processed) < n / 2, "a 1 Hz node cannot have processed most of a fast burst"
    assert processed == sorted(processed) and len(set(processed)) == len(processed)
    assert processed[-1] == stamps[-1], "the newest frame must be the last one processed"
    assert slot.dropped > 0 and slot.pending == 0
    assert slot.received == len(processed) + slot.dropped
    assert h.matches[-1]["frames_dropped"] == slot.dropped


def test_bad_frames_are_skipped_and_node_keeps_running(harness_factory, tiny_map, query_images):
    h = harness_factory(_params(tiny_map))
    h.wait_subscribed(h.raw_pub)
    good = rgb_to_image_msg(query_images[1], ns_to_stamp(50 * SEC), "cam")
    hdr = Header(stamp=ns_to_stamp(40 * SEC), frame_id="cam")
    bad = [
        Image(header=hdr, height=4, width=4, encoding="rgb8", step=5, data=bytes(20)),   # step
        Image(header=hdr, height=4, width=4, encoding="rgb8", step=12, data=bytes(30)),  # short
        Image(header=hdr, height=1, width=1, encoding="32FC1", step=4, data=bytes(4)),   # enc
        Image(header=hdr, height=0, width=0, encoding="rgb8", step=0, data=b""),          # empty
    ]
    for k, msg in enumerate(bad, start=1):
        h.raw_pub.publish(msg)
        wait_for(lambda: h.node.stats.bad_frames == k, 30, f"bad frame {k} to be counted")
    h.raw_pub.publish(good)
    wait_for(lambda: len(h.matches) == 1, 60, "the good frame after the bad ones")
    assert h.matches[0]["stamp_ns"] == 50 * SEC
    assert h.node.stats.errors == 0
    assert "encoding" in h.node.stats.last_error or "size" in h.node.stats.last_error


def test_corrupt_jpeg_is_skipped(harness_factory, tiny_map, query_images):
    h = harness_factory(_params(tiny_map, image_transport="compressed"))
    h.wait_subscribed(h.jpeg_pub)
    hdr = Header(stamp=ns_to_stamp(SEC), frame_id="cam")
    h.jpeg_pub.publish(CompressedImage(header=hdr, format="jpeg", data=b"\xff\xd8\xff garbage"))
    wait_for(lambda: h.node.stats.bad_frames == 1, 30, "the corrupt JPEG to be counted")
    h.jpeg_pub.publish(rgb_to_compressed_msg(query_images[2], ns_to_stamp(2 * SEC), "cam"))
    wait_for(lambda: len(h.matches) == 1, 60, "the good frame")
    # a frame above the pixel limit is a counted bad frame, never decoded
    limit = query_images[2].shape[0] * query_images[2].shape[1] - 1
    assert h.node.set_parameters([Parameter("max_pixels", value=limit)])[0].successful
    h.jpeg_pub.publish(rgb_to_compressed_msg(query_images[2], ns_to_stamp(3 * SEC), "cam"))
    wait_for(lambda: h.node.stats.bad_frames == 2, 30, "the oversized frame to be counted")
    assert "pixels" in h.node.stats.last_error and len(h.matches) == 1

    def warn_diag():
        for arr in list(h.diags):
            for st in arr.status:
                if st.level == b"\x01" and "bad frames" in st.message:
                    return True
        return False
    wait_for(warn_diag, 10, "a WARN diagnostic about the bad frame")


def test_lifecycle_and_parameters(harness_factory, tiny_map, query_images):
    h = harness_factory(_params(tiny_map), autostart=False)
    node = h.node
    assert node.localizer is None and node.state_label == "unconfigured"
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.localizer is not None and h.raw_pub.get_subscription_count() == 0
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    h.wait_subscribed(h.raw_pub)
    # run-time parameters are validated and applied
    results = node.set_parameters([Parameter("top_k", value=0)])
    assert not results[0].successful and "top_k" in results[0].reason
    results = node.set_parameters([Parameter("image_transport", value="compressed")])
    assert not results[0].successful        # read-only: needs a restart
    results = node.set_parameters([Parameter("confidence_threshold", value=0.0),
                                   Parameter("top_k", value=3)])
    assert all(r.successful for r in results)
    assert node.localizer.confidence_threshold == 0.0 and node.localizer.top_k == 3
    h.raw_pub.publish(rgb_to_image_msg(query_images[4], ns_to_stamp(SEC), "cam"))
    wait_for(lambda: len(h.matches) == 1, 60, "a match")
    assert len(h.matches[0]["place_ids"]) == 3
    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    wait_for(lambda: h.raw_pub.get_subscription_count() == 0, 30, "unsubscribe on deactivate")
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert node.localizer is None
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS


def test_configure_failure_is_reported_not_half_working(harness_factory, tmp_path):
    h = harness_factory({"map_path": str(tmp_path / "missing"), "device": "cpu",
                         "autostart": False}, autostart=False)
    assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "not found" in h.node.configure_error
    assert h.node.localizer is None and h.node.state_label == "unconfigured"


def test_parameter_rules_and_covariance():
    assert validate_parameter("image_transport", "theora")
    assert validate_parameter("device", "gpu0")
    assert validate_parameter("device", "cuda:1") is None
    assert validate_parameter("max_rate_hz", -1.0)
    assert validate_parameter("confidence_threshold", 0.3) is None
    c1 = covariance_from_confidence(1.0, 10.0, 0.5)
    c05 = covariance_from_confidence(0.5, 10.0, 0.5)
    c0 = covariance_from_confidence(0.0, 10.0, 0.5)
    assert c1[0] == pytest.approx(100.0) and c05[0] == pytest.approx(400.0)
    assert c0[0] == pytest.approx((10.0 / 0.05) ** 2)
    assert c1[35] == pytest.approx(0.25) and c1[1] == 0.0


# ------------------------------------------------------------- the process, as `ros2 run` starts it

def _start_node(args, env):
    cmd = [sys.executable, "-m", "vpr_ros.ros.localizer_node", "--ros-args"] + args
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _collect(proc, timeout=180, stop_when=None):
    """All output of ``proc``; SIGINT once ``stop_when`` appears."""
    lines = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if stop_when and stop_when in line:
                proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines)


def test_node_process_start_failures_and_params_yaml(ros_domain, tmp_path, tiny_map, repo_root):
    """As `ros2 run` starts it: a bad map or bad weights exit 1 with one clear error; the
    shipped params YAML loads (--ros-args --params-file) and the node runs until SIGINT.
    The three processes run at the same time to keep the test short."""
    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"this is not a checkpoint")
    yaml_path = repo_root / "config" / "localizer.yaml"
    procs = {
        "bad_map": _start_node(["-p", f"map_path:={tmp_path / 'nope'}", "-p", "device:=cpu"],
                               os.environ),
        "bad_weights": _start_node(["-p", f"map_path:={tiny_map}", "-p", f"weights:={bogus}",
                                    "-p", "device:=cpu", "-p", f"model:={CARD}"], os.environ),
        "yaml": _start_node(["--params-file", str(yaml_path), "-p", f"map_path:={tiny_map}",
                             "-p", "device:=cpu"], os.environ),
    }
    results = {}
    threads = [threading.Thread(target=lambda k=k, p=p: results.__setitem__(
        k, _collect(p, stop_when="active: listening" if k == "yaml" else None)))
        for k, p in procs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    code, out = results["bad_map"]
    assert code == 1, out
    assert "configure failed" in out and "map folder not found" in out
    assert out.count("configure failed") == 1 and "Traceback" not in out

    code, out = results["bad_weights"]
    assert code == 1, out
    assert "configure failed" in out and str(bogus) in out and "Traceback" not in out

    code, out = results["yaml"]
    assert "active: listening on /camera/image_raw (raw)" in out, out
    assert code == 0, out


def test_launch_file_compiles_and_points_at_the_params_file(repo_root, tmp_path):
    launch = repo_root / "launch" / "localization.launch.py"
    py_compile.compile(str(launch), cfile=str(tmp_path / "launch.pyc"), doraise=True)
    text = launch.read_text()
    assert '"localizer.yaml"' in text and "localizer_node" in text
    import yaml

    doc = yaml.safe_load((repo_root / "config" / "localizer.yaml").read_text())
    params = doc["/**"]["ros__parameters"]
    from vpr_ros.ros.localizer_node import PARAMETERS

    assert set(params) == set(PARAMETERS), "the YAML documents every parameter, nothing else"
    for name, value in params.items():
        assert validate_parameter(name, value) is None, name
    assert np.isfinite(params["confidence_threshold"])


def test_debug_image_mutual_matches_and_layout():
    from types import SimpleNamespace

    from vpr_ros.ros.debug_image import mutual_nn_pairs, render_debug_image

    rng = np.random.default_rng(0)
    grid = rng.normal(size=(6, 5, 8)).astype(np.float32)
    grid /= np.linalg.norm(grid, axis=-1, keepdims=True)
    pairs = mutual_nn_pairs(grid, grid, max_pairs=100)
    assert len(pairs) == 30                                  # every cell matches itself
    np.testing.assert_allclose(pairs[:, :2], pairs[:, 2:])
    shifted = np.roll(grid, 1, axis=1)                       # place content moved right by 1
    pairs = mutual_nn_pairs(grid, shifted, max_pairs=10)
    assert len(pairs) == 10
    np.testing.assert_allclose((pairs[:, 3] - pairs[:, 1]) % 1.0, 1 / 5)
    result = SimpleNamespace(place_id=3, image_name="missing.jpg", similarity=0.5,
                             confidence=0.7, confident=True, reranked=True,
                             candidates=[SimpleNamespace(rerank_score=12.0)])
    img = render_debug_image(np.zeros((32, 64, 3), np.uint8), result, "", {}, pairs)
    assert img.dtype == np.uint8 and img.shape[0] == 192 + 44 and img.shape[1] == 2 * 384 + 4


def test_driven_by_a_lifecycle_manager_over_services(harness_factory, tiny_map, query_images):
    """autostart false: the standard lifecycle services (what nav2's manager and
    `ros2 lifecycle set` call) configure and activate the node."""
    from lifecycle_msgs.msg import State, Transition
    from lifecycle_msgs.srv import ChangeState, GetState

    h = harness_factory(_params(tiny_map), autostart=False)
    change = h.peer.create_client(ChangeState, "/vpr_localizer/change_state")
    get = h.peer.create_client(GetState, "/vpr_localizer/get_state")
    assert change.wait_for_service(timeout_sec=30) and get.wait_for_service(timeout_sec=30)

    def call(client, request):
        future = client.call_async(request)
        wait_for(future.done, 120, f"{client.srv_name} reply")
        return future.result()
    assert call(get, GetState.Request()).current_state.id == State.PRIMARY_STATE_UNCONFIGURED
    for transition in (Transition.TRANSITION_CONFIGURE, Transition.TRANSITION_ACTIVATE):
        assert call(change, ChangeState.Request(transition=Transition(id=transition))).success
    assert call(get, GetState.Request()).current_state.id == State.PRIMARY_STATE_ACTIVE
    h.wait_subscribed(h.raw_pub)
    h.raw_pub.publish(rgb_to_image_msg(query_images[5], ns_to_stamp(SEC), "cam"))
    wait_for(lambda: len(h.matches) == 1, 60, "a match")


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "bgra8", "16UC1", "yuv422",
                                      "bayer_grbg8"])
def test_message_conversions(encoding, query_images):
    from vpr_ros.ros.conversions import msg_to_rgb, using_cv_bridge

    rgb = np.repeat(query_images[0][:, ::2], 2, axis=1)       # pixel pairs share chroma
    msg = rgb_to_image_msg(rgb, ns_to_stamp(SEC), "cam", encoding=encoding)
    assert isinstance(msg, Image) and msg.encoding == encoding
    out = msg_to_rgb(msg)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.writeable
    diff = np.abs(out.astype(int) - rgb.astype(int))
    if encoding in ("rgb8", "bgr8", "bgra8"):
        assert diff.max() == 0
    elif encoding in ("mono8", "16UC1"):       # the sample is (almost) grey: luma ~ channels
        assert diff.max() <= 8
    else:                                      # chroma subsampling / demosaic: close on average
        assert diff.mean() < 6
    jpeg = rgb_to_compressed_msg(rgb, ns_to_stamp(SEC), "cam", fmt="png")
    np.testing.assert_array_equal(msg_to_rgb(jpeg), rgb)
    assert using_cv_bridge() in (True, False)
