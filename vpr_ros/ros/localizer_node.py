"""ROS 2 lifecycle node: camera images in, place matches and poses out.

Lifecycle (rclpy.lifecycle):

* configure: load the model and the map (a failure logs one clear error and leaves the
  node unconfigured; with ``autostart`` the process exits with status 1),
* activate: subscribe to the camera and start the worker thread,
* deactivate: unsubscribe, stop the worker,
* cleanup: free the model and the map.

With ``autostart`` (default true) the node configures and activates itself, so
``ros2 run vpr_ros localizer_node --ros-args --params-file config/localizer.yaml`` works
without a lifecycle manager; with ``autostart:=false`` drive it with
``ros2 lifecycle set /vpr_localizer configure|activate`` or nav2's lifecycle manager.

The subscription callback only stores (message, receive time) in a one-frame slot; a
worker thread converts and localizes the newest frame.  Frames replaced before the worker
took them are counted as dropped.  Topics, parameters and the JSON schema of ``~/matches``
are documented in docs/ros.md.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                SetParametersResult)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import QoSProfile, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header, String

from ..constants import PRECISIONS, RERANK_COMPUTES
from ..errors import ConfigError, ImageError, VprError
from .conversions import msg_to_rgb, pose_from_arrays, rgb_to_image_msg, stamp_to_ns
from .latest_slot import LatestSlot
from .node_stats import NodeStats

NODE_NAME = "vpr_localizer"
TRANSPORTS = ("raw", "compressed")
VERIFY_MODES = ("full", "size", "none")
MIN_CONFIDENCE_FOR_COVARIANCE = 0.05

# name: (default, description, read_only, range (lo, hi, step) or choices or None)
PARAMETERS = {
    "autostart": (True, "configure and activate at start (no lifecycle manager needed)",
                  True, None),
    "map_path": ("", "map directory built with `vpr map build` (required)", True, None),
    "map_verify": ("size", "map file check at configure: full (sha256), size, none", True,
                   VERIFY_MODES),
    "model": ("", "model card name or YAML path; empty = the card the map was built with",
              True, None),
    "weights": ("", "weights file (.pth/.safetensors); empty = the card's own weights", True,
                None),
    "rerank": (False, "re-rank candidates with SelaVPR local features (map must store them)",
               True, None),
    "rerank_model": ("", "SelaVPR card; empty = the card of the map's local features", True,
                     None),
    "rerank_weights": ("", "SelaVPR weights file", True, None),
    "device": ("auto", "torch device: auto, cpu, cuda, cuda:N", True, None),
    "precision": ("fp32", "inference precision: fp32, bf16, fp16 (CUDA only), int8 (CPU only)",
                  True, PRECISIONS),
    "top_k": (10, "number of candidates published on ~/candidates and ~/matches", False,
              (1, 100, 1)),
    "rerank_k": (20, "candidates re-ranked when rerank is true", False, (1, 200, 1)),
    "rerank_compute": ("fp32", "re-ranking similarity matmul: fp32 (exact official counts) or "
                               "bf16 (faster, approximate counts)", False, RERANK_COMPUTES),
    "confidence_threshold": (0.5, "a match is confident (pose published) at confidence >= this",
                             False, (0.0, 1.0, 0.0)),
    "temporal_filter": (False, "Bayes filter over places along the image stream", True, None),
    "frame_id": ("map", "frame_id of published poses (the map frame)", False, None),
    "image_topic": ("/camera/image_raw", "camera topic (compressed: <image_topic>/compressed)",
                    True, None),
    "image_transport": ("raw", "raw (sensor_msgs/Image) or compressed (CompressedImage)", True,
                        TRANSPORTS),
    "max_rate_hz": (0.0, "process at most this many frames per second (0 = as fast as "
                         "possible)", False, (0.0, 1000.0, 0.0)),
    "publish_debug_image": (False, "publish ~/debug_image (query beside best match)", False,
                            None),
    "map_images_dir": ("", "folder holding the map's images by name (debug image only)", False,
                       None),
    "queue_depth": (1, "subscription queue depth (sensor-data QoS, best effort)", True,
                    (1, 100, 1)),
    "position_sigma_m": (10.0, "position std-dev (m) of the published pose at confidence 1",
                         False, (0.01, 1000.0, 0.0)),
    "orientation_sigma_rad": (0.5, "orientation std-dev (rad) at confidence 1", False,
                              (0.001, 10.0, 0.0)),
}


def validate_parameter(name: str, value) -> Optional[str]:
    """Reason why ``value`` is not acceptable for parameter ``name``, or None."""
    if name not in PARAMETERS:
        return None
    default, _, _, constraint = PARAMETERS[name]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            return f"{name} must be true or false, got {value!r}"
        return None
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            return f"{name} must be a number, got {value!r}"
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name} must be an integer, got {value!r}"
    elif isinstance(default, str) and not isinstance(value, str):
        return f"{name} must be a string, got {value!r}"
    if isinstance(constraint, tuple) and len(constraint) == 3 \
            and not isinstance(constraint[0], str):
        lo, hi, _ = constraint
        if not lo <= value <= hi:
            return f"{name} must be in [{lo}, {hi}], got {value}"
    elif isinstance(constraint, tuple) and value not in constraint:
        return f"{name} must be one of {', '.join(constraint)}, got {value!r}"
    if name == "device" and not (value in ("auto", "cpu", "cuda", "mps")
                                 or (value.startswith("cuda:") and value[5:].isdigit())):
        return f"device must be auto, cpu, cuda or cuda:N, got {value!r}"
    if name == "image_topic" and not value.strip():
        return "image_topic must not be empty"
    if name == "frame_id" and not value.strip():
        return "frame_id must not be empty"
    return None


def covariance_from_confidence(confidence: float, position_sigma_m: float,
                               orientation_sigma_rad: float) -> List[float]:
    """6x6 row-major covariance: std-devs = sigma / max(confidence, 0.05), diagonal.

    Confidence 1 -> position_sigma_m (about the map's place spacing); confidence 0.5 ->
    twice that; the floor 0.05 caps the std-dev at 20 sigma.  x, y, z share the position
    sigma; roll, pitch, yaw the orientation sigma.
    """
    c = max(float(confidence), MIN_CONFIDENCE_FOR_COVARIANCE)
    sp = position_sigma_m / c
    so = orientation_sigma_rad / c
    cov = [0.0] * 36
    for i, s in enumerate((sp, sp, sp, so, so, so)):
        cov[i * 7] = s * s
    return cov


def _descriptor(name: str) -> ParameterDescriptor:
    default, description, read_only, constraint = PARAMETERS[name]
    d = ParameterDescriptor(name=name, description=description, read_only=read_only)
    if isinstance(constraint, tuple) and not isinstance(constraint[0], str):
        lo, hi, step = constraint
        if isinstance(default, int) and not isinstance(default, bool):
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=int(step))]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi),
                                                         step=float(step))]
    elif isinstance(constraint, tuple):
        d.additional_constraints = "one of: " + ", ".join(constraint)
    return d


class LocalizerNode(LifecycleNode):
    """The VPR localizer as a managed (lifecycle) node."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, *_rest) in PARAMETERS.items():
            self.declare_parameter(name, default, _descriptor(name))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.stats = NodeStats()
        self.slot = LatestSlot()
        self.localizer = None
        self.info: Dict[str, object] = {}
        self.state_label = "unconfigured"
        self.configure_error = ""
        self._sub = None
        self._pubs: Dict[str, object] = {}
        self._worker: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._work_lock = threading.Lock()
        self._last_start = 0.0
        self._bad_at_last_diag = 0
        self._processed_seq = 0
        self._debug_cache: Dict[str, np.ndarray] = {}
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self.publish_diagnostics)

    # ------------------------------------------------------------------ parameters
    def p(self, name: str):
        return self.get_parameter(name).value

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            reason = validate_parameter(param.name, param.value)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        loc = self.localizer
        if loc is not None:
            for param in params:
                if param.name == "top_k":
                    loc.top_k = int(param.value)
                elif param.name == "rerank_k" and loc.rerank_k > 0:
                    loc.rerank_k = int(param.value)
                elif param.name == "rerank_compute":
                    loc.rerank_compute = str(param.value)
                elif param.name == "confidence_threshold":
                    loc.confidence_threshold = float(param.value)
        return SetParametersResult(successful=True)

    def _check_parameters(self) -> None:
        problems = [r for r in (validate_parameter(n, self.p(n)) for n in PARAMETERS) if r]
        if problems:
            raise ConfigError("invalid parameters: " + "; ".join(problems))
        if not self.p("map_path"):
            raise ConfigError("parameter map_path is empty: pass the map folder built with "
                              "`vpr map build` (e.g. map_path:=/maps/site)")

    # ------------------------------------------------------------------ loading
    def _load(self):
        from pathlib import Path

        from ..errors import MapError

        self._check_parameters()
        map_path = Path(self.p("map_path"))
        if not map_path.is_dir():      # fail fast, before the heavy imports
            raise MapError(f"map folder not found: {map_path} (build one with `vpr map build`)")
        if not (map_path / "manifest.json").is_file():
            raise MapError(f"{map_path} is not a vpr_ros map (no manifest.json); build one with "
                           "`vpr map build`")
        from ..inference import GlobalDescriber, LocalFeatureExtractor
        from ..localizer import Localizer
        from ..maps import PlaceMap, read_manifest
        from ..temporal import PlaceBeliefFilter

        manifest = read_manifest(map_path)
        card = self.p("model") or (manifest.get("model") or {}).get("card")
        device, precision = self.p("device"), self.p("precision")
        describer = GlobalDescriber(card=card, weights=self.p("weights") or None,
                                    device=device, precision=precision, batch_size=1)
        local = None
        if self.p("rerank"):
            lf = (manifest.get("local_features") or {}).get("model") or {}
            rcard = self.p("rerank_model") or lf.get("card")
            if not rcard:
                raise ConfigError(f"rerank is true but map {map_path} has no local features; "
                                  "rebuild the map with local features or set rerank:=false")
            local = LocalFeatureExtractor(card=rcard, weights=self.p("rerank_weights") or None,
                                          device=device, precision=precision, batch_size=1)
        verify = {"none": False}.get(self.p("map_verify"), self.p("map_verify"))
        place_map = PlaceMap.open_for(map_path, describer, local, verify=verify, device=device)
        temporal = PlaceBeliefFilter(place_map.places.positions) if self.p("temporal_filter") \
            else None
        localizer = Localizer(place_map, describer, local, top_k=self.p("top_k"),
                              rerank_k=self.p("rerank_k") if local is not None else 0,
                              confidence_threshold=self.p("confidence_threshold"),
                              temporal_filter=temporal,
                              rerank_compute=self.p("rerank_compute"))
        info = {"map": str(map_path), "map_size": len(place_map), "model": describer.card.name,
                "fingerprint": describer.fingerprint, "device": str(describer.device),
                "precision": describer.precision,
                "rerank_model": local.card.name if local is not None else "",
                "map_frame_id": place_map.places.frame_id}
        return localizer, info

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t = time.monotonic()
        try:
            self.localizer, self.info = self._load()
        except VprError as exc:
            self.configure_error = str(exc)
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # a bug or an environment problem: say what it was
            self.configure_error = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self._pubs = {
            "pose": self.create_publisher(PoseWithCovarianceStamped, "~/pose", 10),
            "candidates": self.create_publisher(PoseArray, "~/candidates", 10),
            "matches": self.create_publisher(String, "~/matches", 10),
            "debug_image": self.create_publisher(Image, "~/debug_image", 2),
        }
        self.state_label = "inactive"
        self.get_logger().info(
            f"configured in {time.monotonic() - t:.1f} s: map {self.info['map']} "
            f"({self.info['map_size']} places), model {self.info['model']} on "
            f"{self.info['device']}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        topic = self.p("image_topic")
        qos = QoSProfile(depth=self.p("queue_depth"), reliability=qos_profile_sensor_data.reliability,
                         history=qos_profile_sensor_data.history,
                         durability=qos_profile_sensor_data.durability)
        if self.p("image_transport") == "compressed":
            topic = topic.rstrip("/") + "/compressed"
            self._sub = self.create_subscription(CompressedImage, topic, self._on_image, qos)
        else:
            self._sub = self.create_subscription(Image, topic, self._on_image, qos)
        self.slot.reopen()
        self._stop.clear()
        self._worker = threading.Thread(target=self._work, name="vpr_worker", daemon=True)
        self._worker.start()
        self.state_label = "active"
        self.get_logger().info(f"active: listening on {self._sub.topic_name} "
                               f"({self.p('image_transport')})")
        return super().on_activate(state)

    def _stop_worker(self) -> None:
        if self._sub is not None:
            self.destroy_subscription(self._sub)
            self._sub = None
        self._stop.set()
        self.slot.close()
        if self._worker is not None:
            self._worker.join(timeout=30.0)
            self._worker = None
        self.slot.discard()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self.state_label = "inactive"
        return super().on_deactivate(state)

    def _free(self) -> None:
        for pub in self._pubs.values():
            self.destroy_publisher(pub)
        self._pubs = {}
        device = str(self.info.get("device", ""))
        self.localizer = None
        self._debug_cache.clear()
        import gc

        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._free()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._free()
        self.state_label = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        self._free()
        self.state_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ hot path
    def _on_image(self, msg) -> None:
        """Subscription callback: O(1), no conversion."""
        self.stats.input()
        self.slot.put((msg, time.monotonic()))

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self.slot.take(timeout=0.2)
            if item is None:
                continue
            rate = float(self.p("max_rate_hz"))
            if rate > 0:
                wait = self._last_start + 1.0 / rate - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                newer = self.slot.take(timeout=0)
                if newer is not None:       # a newer frame came in while waiting
                    self.slot.count_drop()
                    item = newer
            self._last_start = time.monotonic()
            try:
                self.process(*item)
            except Exception as exc:  # keep the node alive whatever one frame does
                self.stats.error(f"{type(exc).__name__}: {exc}")
                self.get_logger().error(f"frame failed: {type(exc).__name__}: {exc}",
                                        throttle_duration_sec=5.0)

    def process(self, msg, received: float) -> None:
        t0 = time.monotonic()
        timings = {"queue": (t0 - received) * 1e3}
        try:
            rgb = msg_to_rgb(msg)
        except ImageError as exc:
            self.stats.bad(str(exc))
            self.get_logger().warning(f"skipping bad frame: {exc}", throttle_duration_sec=5.0)
            return
        timings["convert"] = (time.monotonic() - t0) * 1e3
        localizer = self.localizer
        if localizer is None:
            return
        stamp_ns = stamp_to_ns(msg.header.stamp)
        with self._work_lock:
            result = localizer.localize(rgb, stamp_ns=stamp_ns)
        timings.update(result.timings_ms)
        timings.pop("total", None)
        t_pub = time.monotonic()
        self._publish(msg.header, rgb, result, timings, received, t_pub)

    def _publish(self, in_header, rgb, result, timings, received, t_pub) -> None:
        frame_id = self.p("frame_id")
        header = Header(stamp=in_header.stamp, frame_id=frame_id)
        k = int(self.p("top_k"))
        cands = result.candidates[:k]
        pubs = self._pubs
        if not pubs:
            return
        arr = PoseArray(header=header)
        orientations = self.localizer.place_map.places.orientations if self.localizer else None
        for c in cands:
            q = orientations[c.place_index] if orientations is not None else (0, 0, 0, 1)
            arr.poses.append(pose_from_arrays(c.position, q))
        pubs["candidates"].publish(arr)
        if result.confident:
            pose = PoseWithCovarianceStamped(header=header)
            pose.pose.pose = pose_from_arrays(result.position, result.orientation)
            pose.pose.covariance = covariance_from_confidence(
                result.confidence, self.p("position_sigma_m"), self.p("orientation_sigma_rad"))
            pubs["pose"].publish(pose)
        self._processed_seq += 1
        timings["publish"] = (time.monotonic() - t_pub) * 1e3
        timings["total"] = (time.monotonic() - received) * 1e3
        stamp_ns = stamp_to_ns(in_header.stamp)
        doc = {
            "stamp": {"sec": int(in_header.stamp.sec), "nanosec": int(in_header.stamp.nanosec)},
            "stamp_ns": stamp_ns,
            "frame_id": frame_id,
            "camera_frame_id": in_header.frame_id,
            "seq": self._processed_seq,
            "place_id": int(result.place_id),
            "image_name": result.image_name,
            "position": [float(v) for v in result.position],
            "orientation": [float(v) for v in result.orientation],
            "score": _json_float(result.similarity),
            "confidence": float(result.confidence),
            "confident": bool(result.confident),
            "confidence_threshold": float(result.confidence_threshold),
            "place_ids": [int(c.place_id) for c in cands],
            "image_names": [c.image_name for c in cands],
            "scores": [_json_float(c.similarity) for c in cands],
            "rerank_scores": ([_json_float(c.rerank_score) for c in cands]
                              if result.reranked else None),
            "reranked": bool(result.reranked),
            "temporal": bool(result.temporal),
            "frames_dropped": int(self.slot.dropped),
            "timings_ms": {k2: round(float(v), 3) for k2, v in timings.items()},
        }
        pubs["matches"].publish(String(data=json.dumps(doc)))
        self.stats.output(timings, result.confidence, result.confident)
        if self.p("publish_debug_image"):
            try:
                from .debug_image import mutual_nn_pairs, render_debug_image

                pairs = None
                loc = self.localizer
                if result.reranked and result.query_local is not None and loc is not None \
                        and loc.place_map.local_features is not None:
                    # the localizer's own query features: no second SelaVPR pass per frame
                    pairs = mutual_nn_pairs(result.query_local,
                                            loc.place_map.local_features[result.place_index])
                img = render_debug_image(rgb, result, self.p("map_images_dir"), self._debug_cache,
                                         correspondences=pairs)
                pubs["debug_image"].publish(rgb_to_image_msg(img, in_header.stamp, frame_id))
            except Exception as exc:  # never let a debug view break localization
                self.get_logger().warning(f"debug image failed: {exc}", throttle_duration_sec=10.0)

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        snap = self.stats.snapshot()
        snap.update({
            "state": self.state_label,
            "frames_received": self.slot.received,
            "frames_dropped": self.slot.dropped,
            "image_topic": self._sub.topic_name if self._sub is not None else "",
        })
        snap.update({k: v for k, v in self.info.items()})
        return snap

    def publish_diagnostics(self) -> None:
        values = self.diagnostics_values()
        level, message = DiagnosticStatus.OK, self.state_label
        new_bad = values["frames_bad"] - self._bad_at_last_diag
        self._bad_at_last_diag = values["frames_bad"]
        if self.state_label == "unconfigured" and self.configure_error:
            level, message = DiagnosticStatus.ERROR, f"configure failed: {self.configure_error}"
        elif self.state_label == "active":
            since = values["seconds_since_input"]
            if since is None or since > 5.0:
                level, message = DiagnosticStatus.WARN, f"no images on {values['image_topic']}"
            elif new_bad > 0:
                level, message = DiagnosticStatus.WARN, f"{new_bad} bad frames: " \
                                                        f"{values['last_error']}"
            else:
                message = (f"localizing at {values['processing_rate_hz']:.1f} Hz "
                           f"(input {values['input_rate_hz']:.1f} Hz)")
        kv: List[KeyValue] = []
        for key, value in values.items():
            if key == "latency_ms":
                for stage, st in value.items():
                    kv.append(KeyValue(key=f"latency_{stage}_ms_mean", value=f"{st['mean']:.2f}"))
                    kv.append(KeyValue(key=f"latency_{stage}_ms_p95", value=f"{st['p95']:.2f}"))
            elif isinstance(value, float):
                kv.append(KeyValue(key=key, value=f"{value:.3f}"))
            else:
                kv.append(KeyValue(key=key, value="" if value is None else str(value)))
        status = DiagnosticStatus(level=level, name=f"{self.get_fully_qualified_name()}: "
                                  "visual place recognition", message=message,
                                  hardware_id=str(self.info.get("device", "")), values=kv)
        arr = DiagnosticArray(status=[status])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)


def _json_float(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def run(args: Optional[List[str]] = None, context=None) -> int:
    """Create the node, autostart it when asked, spin until shutdown; the exit status."""
    node = LocalizerNode(context=context) if context is not None else LocalizerNode()
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    code = 0
    try:
        if node.p("autostart"):
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                return 1
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("activate failed")
                return 1
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node._stop_worker()
        executor.remove_node(node)
        node.destroy_node()
    return code


def main(args: Optional[List[str]] = None) -> int:
    rclpy.init(args=args)
    try:
        code = run(args)
    finally:
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
