"""Replay a bag into a running localizer node and collect what the node publishes.

Used by `vpr eval bag --realtime` and `vpr demo`.  The bag's camera messages are
published unchanged (raw CDR deserialized by rclpy, so every encoding reaches the node as
recorded) with their original timing (scaled by ``rate``); the node's ``~/matches``,
``~/pose`` and ``/diagnostics`` are collected.  ``start_node_process`` runs the real node
as a subprocess on an isolated DDS domain (``isolated_ros_env``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from ..errors import BagError, VprError
from .conversions import ns_to_stamp, stamp_to_ns

NODE_NAME = "vpr_localizer"


def isolated_ros_env(domain_id: Optional[int] = None, base: Optional[dict] = None) -> dict:
    """Environment for a private DDS graph: a random domain id, localhost discovery only."""
    env = dict(os.environ if base is None else base)
    if domain_id is None:
        domain_id = random.SystemRandom().randint(120, 200)
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.pop("ROS_LOCALHOST_ONLY", None)
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return env


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def write_params_file(params: dict, folder: str) -> str:
    import yaml

    path = os.path.join(folder, "localizer_params.yaml")
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump({"/**": {"ros__parameters": params}}, fh, sort_keys=False)
    return path


def start_node_process(params: dict, env: dict, log_path: Optional[str] = None,
                       params_file: Optional[str] = None) -> subprocess.Popen:
    """Start ``localizer_node`` (this Python, this package) with ``params`` in a subprocess."""
    tmp = tempfile.mkdtemp(prefix="vpr_node_")
    cmd = [sys.executable, "-m", "vpr_ros.ros.localizer_node", "--ros-args"]
    if params_file:
        cmd += ["--params-file", str(params_file)]
    cmd += ["--params-file", write_params_file(params, tmp)]
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([_package_root()] + [p for p in env.get(
        "PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    log_path = log_path or os.path.join(tmp, "node.log")
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def _log_tail(proc, lines: int = 6) -> str:
    path = getattr(proc, "log_path", None)
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            tail = [ln.rstrip() for ln in fh.readlines()[-lines:] if ln.strip()]
    except (OSError, TypeError):
        return ""
    return (f"; node log {path}:\n  " + "\n  ".join(tail)) if tail else ""


def stop_node_process(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class ReplayResult:
    sent: List[Tuple[int, int]] = field(default_factory=list)      # (frame index, stamp_ns)
    matches: List[dict] = field(default_factory=list)              # parsed ~/matches JSON
    poses: Dict[int, dict] = field(default_factory=dict)           # stamp_ns -> pose
    diagnostics: Dict[str, str] = field(default_factory=dict)      # last node status values
    diagnostics_level: int = -1
    duration_s: float = 0.0
    rate: float = 1.0

    @property
    def frames_dropped(self) -> int:
        v = self.diagnostics.get("frames_dropped")
        if v not in (None, ""):
            return int(v)
        return max(0, len(self.sent) - len(self.matches))


def _iter_raw(bag, topic, max_frames: Optional[int] = None) -> Iterator[Tuple[int, bytes]]:
    """(bag_time_ns, raw CDR) of a topic via rosbags, streamed (no decoding, no buffering)."""
    from ..bags import IMAGE_TYPES, _Bag

    with _Bag(bag) as b:
        conns = b.connections(topic, IMAGE_TYPES, "an image topic")
        for n, (_c, t, raw) in enumerate(b.reader.messages(connections=conns)):
            if max_frames is not None and n >= max_frames:
                return
            yield int(t), bytes(raw)


class _Collector(Node):
    def __init__(self, node_name: str, image_topic: str, compressed: bool, context):
        super().__init__("vpr_replay", context=context)
        ns = "/" + node_name.strip("/")
        self.lock = threading.Lock()
        self.result = ReplayResult()
        self.node_name = node_name.strip("/").split("/")[-1]
        self.matches_topic = f"{ns}/matches"
        self.status_seen = threading.Event()
        self.last_state = ""
        self.callbacks: List[Callable[[dict], None]] = []
        self.pub = self.create_publisher(CompressedImage if compressed else Image, image_topic,
                                         QoSProfile(depth=10,
                                                    reliability=ReliabilityPolicy.RELIABLE))
        self.create_subscription(String, self.matches_topic, self._on_matches, 100)
        self.create_subscription(PoseWithCovarianceStamped, f"{ns}/pose", self._on_pose, 100)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 10)

    def _on_matches(self, msg: String) -> None:
        doc = json.loads(msg.data)
        doc["_received_monotonic"] = time.monotonic()
        with self.lock:
            self.result.matches.append(doc)
        for cb in self.callbacks:
            cb(doc)

    def _on_pose(self, msg: PoseWithCovarianceStamped) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        with self.lock:
            self.result.poses[stamp_to_ns(msg.header.stamp)] = {
                "position": [p.x, p.y, p.z], "orientation": [q.x, q.y, q.z, q.w],
                "covariance": list(msg.pose.covariance), "frame_id": msg.header.frame_id}

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for status in msg.status:
            if self.node_name in status.name:
                values = {kv.key: kv.value for kv in status.values}
                with self.lock:
                    self.result.diagnostics = values
                    self.result.diagnostics_level = int.from_bytes(status.level, "little") \
                        if isinstance(status.level, (bytes, bytearray)) else int(status.level)
                self.last_state = values.get("state", "")
                self.status_seen.set()


def _spin_politely(executor, stop: threading.Event) -> None:
    """``executor.spin()`` that sleeps a millisecond between rounds.

    When the node process dies, the collector's wait set can become ready on every
    round (graph changes) and a bare ``spin()`` then loops at full speed, holding the
    GIL so that the thread watching the node process hardly runs: a CI run hung for
    20 minutes that way.  The sleep hands the GIL over and bounds the CPU use.
    """
    while not stop.is_set() and executor.context.ok():
        try:
            executor.spin_once(timeout_sec=0.05)
        except Exception:   # noqa: BLE001 - context shut down under us: stop spinning
            if not executor.context.ok():
                return
            raise
        time.sleep(0.001)


def replay_bag(bag, image_topic: str, node_name: str = NODE_NAME,
               node_image_topic: str = "/camera/image_raw", rate: float = 1.0,
               context=None, ready_timeout_s: float = 120.0, settle_s: float = 5.0,
               max_frames: Optional[int] = None,
               on_match: Optional[Callable[[dict], None]] = None,
               node_process: Optional[subprocess.Popen] = None) -> ReplayResult:
    """Publish the bag's ``image_topic`` into the node and collect its outputs.

    Waits (up to ``ready_timeout_s``) until the node is active and subscribed, then
    publishes every frame at its recorded time divided by ``rate``, then waits until the
    answer for the last frame arrives or nothing came for ``settle_s``.  ``context`` is an
    initialised rclpy Context (domain set by the caller); ``node_process``, when given, is
    watched so a node that died is reported at once.
    """
    if rate <= 0:
        raise VprError(f"--rate must be > 0, got {rate}")
    from ..bags import IMAGE_TYPES, bag_topics

    topics = bag_topics(bag)
    if image_topic not in topics or topics[image_topic][0] not in IMAGE_TYPES:
        raise BagError(f"{image_topic!r} is not an image topic of bag {bag}")
    msgtype = topics[image_topic][0]
    compressed = msgtype.endswith("CompressedImage")
    topic = node_image_topic.rstrip("/") + ("/compressed" if compressed else "")
    cls = CompressedImage if compressed else Image
    col = _Collector(node_name, topic, compressed, context)
    if on_match is not None:
        col.callbacks.append(on_match)
    executor = SingleThreadedExecutor(context=col.context)
    executor.add_node(col)
    stop = threading.Event()
    spinner = threading.Thread(target=_spin_politely, args=(executor, stop), daemon=True)
    spinner.start()
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if node_process is not None and node_process.poll() is not None:
                raise VprError(f"the localizer node exited with status {node_process.returncode} "
                               f"before it was ready{_log_tail(node_process)}")
            ready = (col.pub.get_subscription_count() > 0
                     and col.count_publishers(col.matches_topic) > 0)
            if ready:
                break
            if time.monotonic() > deadline:
                raise VprError(f"the localizer node did not subscribe to {topic} within "
                               f"{ready_timeout_s:.0f} s (state: {col.last_state or 'unknown'})")
            time.sleep(0.1)
        time.sleep(1.0)   # let both directions of DDS discovery settle
        t0 = time.monotonic()
        first_bag_ns = None
        for index, (bag_ns, raw) in enumerate(_iter_raw(bag, image_topic, max_frames)):
            if first_bag_ns is None:
                first_bag_ns = bag_ns
            target = t0 + (bag_ns - first_bag_ns) / 1e9 / rate
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            msg = deserialize_message(raw, cls)
            if stamp_to_ns(msg.header.stamp) == 0:
                # unstamped camera: use the recording time, as vpr_ros.bags does when reading
                msg.header.stamp = ns_to_stamp(bag_ns)
            col.pub.publish(msg)
            col.result.sent.append((index, stamp_to_ns(msg.header.stamp)))
            if node_process is not None and node_process.poll() is not None:
                raise VprError(f"the localizer node exited with status {node_process.returncode} "
                               f"during the replay{_log_tail(node_process)}")
        if not col.result.sent:
            raise BagError(f"no frames on {image_topic} in bag {bag}")
        last_stamp = col.result.sent[-1][1]
        last_count, last_change = -1, time.monotonic()
        while True:
            with col.lock:
                n = len(col.result.matches)
                done = any(m.get("stamp_ns") == last_stamp for m in col.result.matches)
            if done:
                break
            if n != last_count:
                last_count, last_change = n, time.monotonic()
            if time.monotonic() - last_change > settle_s:
                break
            time.sleep(0.05)
        # one more diagnostics message so the drop counters include the end of the run
        col.status_seen.clear()
        col.status_seen.wait(timeout=2.5)
        col.result.duration_s = time.monotonic() - t0
        col.result.rate = rate
        with col.lock:
            return col.result
    finally:
        stop.set()
        spinner.join(timeout=5.0)
        executor.shutdown(timeout_sec=2.0)
        col.destroy_node()


def run_node_and_replay(bag, image_topic: str, node_params: dict, rate: float = 1.0,
                        log_path: Optional[str] = None, on_match=None,
                        ready_timeout_s: float = 180.0, params_file: Optional[str] = None,
                        max_frames: Optional[int] = None) -> ReplayResult:
    """Start the real node as a subprocess on a private domain, replay, stop the node."""
    if not Path(bag).exists():
        raise BagError(f"bag not found: {bag}")
    env = isolated_ros_env()
    domain = int(env["ROS_DOMAIN_ID"])
    saved = {k: os.environ.get(k) for k in ("ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOCALHOST_ONLY",
                                            "RMW_IMPLEMENTATION")}
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.pop("ROS_LOCALHOST_ONLY", None)
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    proc = start_node_process(node_params, env, log_path, params_file)
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=domain)
    try:
        result = replay_bag(bag, image_topic, rate=rate, context=context, on_match=on_match,
                            ready_timeout_s=ready_timeout_s, node_process=proc,
                            max_frames=max_frames)
    finally:
        code = stop_node_process(proc)
        rclpy.try_shutdown(context=context)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result.diagnostics.setdefault("exit_code", str(code))
    return result
