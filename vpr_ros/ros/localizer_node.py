"""ROS 2 lifecycle node: camera images in, place matches and poses out.

Lifecycle (rclpy.lifecycle):

* configure: load the model and the map (a failure logs one clear error and leaves the
  node unconfigured; with ``autostart`` the process exits with status 1),
* activate: subscribe to the camera(s) (and odometry), start one worker thread per camera,
  publish the map's places for RViz,
* deactivate: unsubscribe, stop the workers,
* cleanup: free the model and the map.  While unconfigured, the "configure" parameters
  (map_path, model, weights, device, precision, ...) can be changed, so cleanup -> set
  parameters -> configure -> activate switches maps or models without a restart.

With ``autostart`` (default true) the node configures and activates itself, so
``ros2 run vpr_ros localizer_node --ros-args --params-file config/localizer.yaml`` works
without a lifecycle manager; with ``autostart:=false`` drive it with
``ros2 lifecycle set /vpr_localizer configure|activate`` or nav2's lifecycle manager.

Each camera's subscription callback only stores (message, receive time) in that camera's
one-frame slot; the camera's worker thread converts and localizes the newest frame (one
inference at a time across cameras).  Frames replaced before the worker took them are
counted as dropped.  Topics, parameters and the JSON schema of ``~/matches`` are
documented in docs/ros.md.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import threading
import time
from typing import Dict, List, Optional

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseArray, PoseWithCovarianceStamped
from nav_msgs.msg import Odometry
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor,
                                ParameterType, SetParametersResult)
from rclpy.exceptions import ParameterException, ParameterUninitializedException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Header, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from ..constants import (CONFIDENCE_THRESHOLD, CONV_TRANSPOSE_COMPUTES, PATCH_CONV_COMPUTES,
                         PRECISIONS, RERANK_COMPUTES)
from ..constants import MAX_IMAGE_PIXELS as DEFAULT_MAX_PIXELS
from ..errors import ConfigError, ImageError, VprError
from .conversions import msg_to_rgb, pose_from_arrays, rgb_to_image_msg, stamp_to_ns
from .latest_slot import LatestSlot
from .node_stats import NodeStats
from .outputs import (covariance_from_confidence, initialpose_msg, map_markers, marker_scale,
                      match_markers, place_spacing)

NODE_NAME = "vpr_localizer"
TRANSPORTS = ("raw", "compressed")
VERIFY_MODES = ("full", "size", "none")
SWITCHES = ("auto", "on", "off")   # acceleration switches: auto = override / default
DEFAULT_FRAME = "map"
ODOMETRY_QUEUE = 2000      # odometry messages held per camera between two processed frames

# When a parameter may change (the 3rd field of PARAMETERS):
START = "start"              # read-only: applies when the process starts
CONFIGURE = "unconfigured"   # only while unconfigured (cleanup, set, configure, activate)
ACTIVATE = "inactive"        # only while not active (deactivate, set, activate)
LIVE = "live"                # any time, validated, applied to the next frame
CHANGE_CLASSES = (START, CONFIGURE, ACTIVATE, LIVE)

# name: (default, description, change class, range (lo, hi, step) or choices or None)
# A default of `list` declares a string array that may stay unset (= empty list).
PARAMETERS = {
    "autostart": (True, "configure and activate at start (no lifecycle manager needed)",
                  START, None),
    "map_path": ("", "map directory built with `vpr map build` (required)", CONFIGURE, None),
    "map_verify": ("size", "map file check at configure: full (sha256), size, none", CONFIGURE,
                   VERIFY_MODES),
    "model": ("", "model card name or YAML path; empty = the card the map was built with",
              CONFIGURE, None),
    "weights": ("", "weights file (.pth/.safetensors); empty = the card's own weights",
                CONFIGURE, None),
    "rerank": (False, "re-rank candidates with SelaVPR local features (map must store them)",
               CONFIGURE, None),
    "rerank_model": ("", "SelaVPR card; empty = the card of the map's local features",
                     CONFIGURE, None),
    "rerank_weights": ("", "SelaVPR weights file", CONFIGURE, None),
    "device": ("auto", "torch device: auto, cpu, cuda, cuda:N", CONFIGURE, None),
    "precision": ("fp32", "inference precision: fp32, bf16, fp16 (CUDA only), int8 (CPU only)",
                  CONFIGURE, PRECISIONS),
    "native_kernels": ("auto", "C kernels built on first use (fused int8 passes, int8 "
                               "matmuls on AVX-512 VNNI, integer attention, verified exact "
                               "re-ranking): auto (on where a C compiler exists; override "
                               "VPR_ROS_NATIVE_KERNELS), on, off (torch ops: same results, "
                               "slower)", CONFIGURE, SWITCHES),
    "integer_attention": ("auto", "int8 models: int16 integer attention (auto = on; override "
                                  "VPR_ROS_INTEGER_ATTENTION), on, or off (float32 SDPA)",
                          CONFIGURE, SWITCHES),
    "kernel_cache": ("", "folder of the compiled kernels; empty = ~/.cache/vpr_ros/kernels "
                         "(override VPR_ROS_KERNEL_CACHE)", CONFIGURE, None),
    "conv_transpose": ("bf16", "int8 models: transposed convolutions (SelaVPR's LocalAdapt) as "
                               "a bf16 or int8 (faster, ~10x the rounding error) matmul + "
                               "col2im", CONFIGURE, CONV_TRANSPOSE_COMPUTES),
    "patch_conv": ("bf16", "int8 models: the ViT patch embedding as one bf16 matmul per image "
                           "(about half the time) or the fp32 convolution", CONFIGURE,
                   PATCH_CONV_COMPUTES),
    "top_k": (10, "number of candidates published on ~/candidates and ~/matches", LIVE,
              (1, 100, 1)),
    "rerank_k": (20, "candidates re-ranked when rerank is true", LIVE, (1, 200, 1)),
    "rerank_compute": ("fp32", "re-ranking similarity matmul: fp32 (exact official counts) or "
                               "bf16 (faster, approximate counts)", LIVE, RERANK_COMPUTES),
    "confidence_threshold": (CONFIDENCE_THRESHOLD, "a match is confident (pose published) at "
                                                   "confidence >= this", LIVE, (0.0, 1.0, 0.0)),
    "temporal_filter": (False, "Bayes filter over places along each camera's image stream",
                        CONFIGURE, None),
    "stream": (True, "stream localizer per camera (vpr_ros.stream: route structure, odometry, "
                     "calibrated confidence); false = frame by frame", CONFIGURE, None),
    "stream_candidates": (50, "stream: retrieval candidates per frame used as evidence",
                          CONFIGURE, (1, 500, 1)),
    "stream_max_hypotheses": (500, "stream: (place, direction, speed) states kept per frame",
                              CONFIGURE, (10, 100000, 1)),
    "stream_kidnap_prob": (0.02, "stream: chance per frame of a jump anywhere (kidnap)",
                           CONFIGURE, (0.0001, 0.5, 0.0)),
    "stream_reverse_prob": (0.02, "stream: chance per frame that the camera turns around",
                            CONFIGURE, (0.0, 0.5, 0.0)),
    "stream_speed_change_prob": (0.1, "stream: chance per frame of a new speed class "
                                      "(without odometry)", CONFIGURE, (0.0, 0.9, 0.0)),
    "stream_max_speed_mps": (0.0, "stream: > 0 bounds the step per frame by speed x time "
                                  "between frames (without odometry)", CONFIGURE,
                             (0.0, 1000.0, 0.0)),
    "stream_still_cosine": (0.995, "stream: a frame at least this alike the last one is a "
                                   "stop, not new evidence (1 = off)", CONFIGURE,
                            (0.5, 1.0, 0.0)),
    "stream_rerank_weight": (1.0, "stream: weight of the re-ranking scores as evidence next to "
                                  "the global similarity (0 = global only)", CONFIGURE,
                             (0.0, 10.0, 0.0)),
    "stream_radius_m": (25.0, "stream: an answer is right within this distance (confidence "
                              "mass)", CONFIGURE, (0.01, 10000.0, 0.0)),
    "stream_odometry_sigma": (0.25, "stream: relative error of the odometry's travelled "
                                    "distance", CONFIGURE, (0.001, 10.0, 0.0)),
    "stream_odometry_max_gap_s": (2.0, "stream: odometry older than this around a frame is "
                                       "stale", CONFIGURE, (0.01, 3600.0, 0.0)),
    "frame_id": ("", "frame_id of published poses; empty = the map's own frame (manifest)",
                 LIVE, None),
    "image_topic": ("camera/image_raw", "camera topic (compressed: <image_topic>/compressed); "
                                        "relative names resolve in the node's namespace",
                    ACTIVATE, None),
    "image_transport": ("raw", "raw (sensor_msgs/Image) or compressed (CompressedImage)",
                        ACTIVATE, TRANSPORTS),
    "image_topics": (list, "several cameras: one topic each, a name ending in /compressed is "
                           "a CompressedImage topic, any other an Image topic; replaces "
                           "image_topic/image_transport when set", ACTIVATE, None),
    "odometry_topic": ("", "nav_msgs/Odometry fed to the stream localizer; empty = none",
                       ACTIVATE, None),
    "max_rate_hz": (0.0, "process at most this many frames per second per camera (0 = as "
                         "fast as possible)", LIVE, (0.0, 1000.0, 0.0)),
    "publish_debug_image": (False, "publish ~/debug_image (query beside best match)", LIVE,
                            None),
    "map_images_dir": ("", "folder holding the map's images by name (debug image only)", LIVE,
                       None),
    "max_pixels": (DEFAULT_MAX_PIXELS, "compressed frames above this many pixels (read from "
                                       "the header) are bad frames, never decoded; 0 = no "
                                       "limit", LIVE, (0, 2_000_000_000, 1)),
    "queue_depth": (1, "subscription queue depth (sensor-data QoS, best effort)", ACTIVATE,
                    (1, 100, 1)),
    "position_sigma_m": (10.0, "position std-dev (m) of ~/pose at confidence 1", LIVE,
                         (0.01, 1000.0, 0.0)),
    "orientation_sigma_rad": (0.5, "orientation std-dev (rad) at confidence 1", LIVE,
                              (0.001, 10.0, 0.0)),
    "lost_after_frames": (5, "without the stream localizer: a camera is lost after this many "
                             "unconfident frames in a row", LIVE, (1, 10000, 1)),
    "publish_initialpose": (False, "publish the pose on initialpose_topic when a camera becomes "
                                   "confidently localized (at start and after ~/relocalize)",
                            LIVE, None),
    "initialpose_topic": ("initialpose", "topic for publish_initialpose (Nav2 AMCL listens on "
                                         "initialpose)", CONFIGURE, None),
    "publish_markers": (True, "RViz markers: ~/map_markers (places, latched) and ~/markers "
                              "(best place and candidates per frame)", LIVE, None),
    "markers_max_places": (20000, "map places drawn on ~/map_markers (evenly subsampled)",
                           ACTIVATE, (1, 1000000, 1)),
}


def camera_topics(image_topics, image_topic: str, image_transport: str) -> List[tuple]:
    """[(topic, transport)] the node subscribes to.  ``image_topics`` (several cameras) wins
    when set; a name ending in /compressed is a CompressedImage topic.  Setting it together
    with a non-default ``image_topic`` is an error (two sources of truth)."""
    topics = [t.strip() for t in (image_topics or []) if t and t.strip()]
    if topics:
        if image_topic != PARAMETERS["image_topic"][0]:
            raise ConfigError(f"set either image_topic ({image_topic!r}) or image_topics "
                              f"({topics}), not both")
        if len(set(topics)) != len(topics):
            raise ConfigError(f"image_topics lists a topic twice: {topics}")
        return [(t, "compressed" if t.rstrip("/").endswith("/compressed") else "raw")
                for t in topics]
    if image_transport == "compressed":
        return [(image_topic.rstrip("/") + "/compressed", "compressed")]
    return [(image_topic, "raw")]


def validate_parameter(name: str, value) -> Optional[str]:
    """Reason why ``value`` is not acceptable for parameter ``name``, or None."""
    if name not in PARAMETERS:
        return None
    default, _, _, constraint = PARAMETERS[name]
    if default is list:
        if value is None:
            return None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            return f"{name} must be a list of strings, got {value!r}"
        if any(not v.strip() for v in value):
            return f"{name} must not contain empty names"
        return None
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
    if name in ("image_topic", "initialpose_topic") and not value.strip():
        return f"{name} must not be empty"
    return None


def change_refused(name: str, state: str) -> Optional[str]:
    """Reason why parameter ``name`` cannot change in lifecycle state ``state``, or None."""
    if name not in PARAMETERS:
        return None
    when = PARAMETERS[name][2]
    if when == START:
        return f"{name} applies when the process starts: set it in the params file or with -p"
    if when == CONFIGURE and state != "unconfigured":
        return (f"{name} can only change while unconfigured (now {state}): deactivate, "
                f"cleanup, set it, then configure and activate")
    if when == ACTIVATE and state == "active":
        return f"{name} can only change while not active: deactivate, set it, activate"
    return None


def _descriptor(name: str) -> ParameterDescriptor:
    default, description, when, constraint = PARAMETERS[name]
    d = ParameterDescriptor(name=name, description=description, read_only=when == START)
    if default is list:
        d.type = ParameterType.PARAMETER_STRING_ARRAY
    if isinstance(constraint, tuple) and not isinstance(constraint[0], str):
        lo, hi, step = constraint
        if isinstance(default, int) and not isinstance(default, bool):
            d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=int(step))]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi),
                                                         step=float(step))]
    elif isinstance(constraint, tuple):
        d.additional_constraints = "one of: " + ", ".join(constraint)
    if when != LIVE:
        d.additional_constraints = (d.additional_constraints + "; " if d.additional_constraints
                                    else "") + {START: "read-only",
                                                CONFIGURE: "changeable while unconfigured",
                                                ACTIVATE: "changeable while not active"}[when]
    return d


class Camera:
    """One camera stream: its subscription, latest-frame slot, worker, localizer (with its
    own temporal filter / stream localizer) and localized/lost state."""

    def __init__(self, index: int, topic: str, transport: str, localizer):
        self.index = index
        self.topic = topic                 # as configured (relative or absolute)
        self.transport = transport
        self.slot = LatestSlot()
        self.localizer = localizer
        self.sub = None
        self.worker: Optional[threading.Thread] = None
        self.last_start = 0.0
        self.localized = False
        self.unconfident_run = 0
        self.processed = 0
        # odometry waiting for the worker: (stamp_ns, xyz); bounded, the oldest go first
        self.odometry = collections.deque(maxlen=ODOMETRY_QUEUE)

    @property
    def stream(self):
        """The camera's stream localizer (inside its Localizer), or None."""
        return getattr(self.localizer, "stream", None)

    @property
    def resolved_topic(self) -> str:
        return self.sub.topic_name if self.sub is not None else self.topic

    def reset(self) -> None:
        """Forget the belief (temporal filter, stream localizer, queued odometry): localize
        globally again."""
        loc = self.localizer
        if loc is not None and loc.temporal_filter is not None:
            loc.temporal_filter.reset()
        if self.stream is not None:
            self.stream.reset()
        self.odometry.clear()
        self.localized = False
        self.unconfident_run = 0

    def update_state(self, confident: bool, lost_after: int) -> bool:
        """Track localized/lost after one result; True when it just became localized."""
        if self.stream is not None:
            was, self.localized = self.localized, bool(self.stream.localized)
            return self.localized and not was
        if confident:
            self.unconfident_run = 0
            if not self.localized:
                self.localized = True
                return True
            return False
        self.unconfident_run += 1
        if self.unconfident_run >= lost_after:
            self.localized = False
        return False


class LocalizerNode(LifecycleNode):
    """The VPR localizer as a managed (lifecycle) node."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs):
        super().__init__(node_name, **kwargs)
        for name, (default, *_rest) in PARAMETERS.items():
            value = Parameter.Type.STRING_ARRAY if default is list else default
            self.declare_parameter(name, value, _descriptor(name))
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.stats = NodeStats()
        self.localizer = None            # camera 0's; cameras 1.. get their own at activate
        self.info: Dict[str, object] = {}
        self.state_label = "unconfigured"
        self.configure_error = ""
        self.cameras: List[Camera] = []
        self._idle_slot = LatestSlot()
        self._pubs: Dict[str, object] = {}
        self._odom_sub = None
        self._stop = threading.Event()
        self._work_lock = threading.Lock()
        self._bad_at_last_diag = 0
        self._processed_seq = 0
        self._debug_cache: Dict[str, np.ndarray] = {}
        self._make_localizer = None
        self._spacing_m: Optional[float] = None
        self._initialpose_due = True
        self._localized_sent = None
        self.odometry = {"received": 0, "bad": 0, "rejected": 0}
        self.relocalizations = 0
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._diag_timer = self.create_timer(1.0, self.publish_diagnostics)
        self._relocalize_srv = self.create_service(Trigger, "~/relocalize", self._on_relocalize)

    # ------------------------------------------------------------------ parameters
    def p(self, name: str):
        try:
            value = self.get_parameter(name).value
        except ParameterUninitializedException:     # a string array left unset
            return []
        return list(value) if PARAMETERS.get(name, (None,))[0] is list else value

    @property
    def slot(self) -> LatestSlot:
        """Camera 0's latest-frame slot (an idle one while not active)."""
        return self.cameras[0].slot if self.cameras else self._idle_slot

    def _localizers(self):
        locs = [self.localizer] + [c.localizer for c in self.cameras[1:]]
        return [loc for loc in locs if loc is not None]

    def _on_set_parameters(self, params) -> SetParametersResult:
        for param in params:
            reason = validate_parameter(param.name, param.value) \
                or change_refused(param.name, self.state_label)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        for loc in self._localizers():
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
        camera_topics(self.p("image_topics"), self.p("image_topic"), self.p("image_transport"))

    def pose_frame(self) -> str:
        """frame_id of published poses: the parameter, else the map's own frame."""
        return self.p("frame_id") or str(self.info.get("map_frame_id") or DEFAULT_FRAME)

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
        accel = self.accel_options()
        describer = GlobalDescriber(card=card, weights=self.p("weights") or None,
                                    device=device, precision=precision, batch_size=1,
                                    accel=accel)
        local = None
        if self.p("rerank"):
            lf = (manifest.get("local_features") or {}).get("model") or {}
            rcard = self.p("rerank_model") or lf.get("card")
            if not rcard:
                raise ConfigError(f"rerank is true but map {map_path} has no local features; "
                                  "rebuild the map with local features or set rerank:=false")
            local = LocalFeatureExtractor(card=rcard, weights=self.p("rerank_weights") or None,
                                          device=device, precision=precision, batch_size=1,
                                          accel=accel)
        verify = {"none": False}.get(self.p("map_verify"), self.p("map_verify"))
        place_map = PlaceMap.open_for(map_path, describer, local, verify=verify, device=device)
        temporal = bool(self.p("temporal_filter"))

        def make_localizer():
            """One per camera: they share the model and the map, not the belief (temporal
            filter or stream localizer; the stream wins when both are on)."""
            return Localizer(place_map, describer, local, top_k=self.p("top_k"),
                             rerank_k=self.p("rerank_k") if local is not None else 0,
                             confidence_threshold=self.p("confidence_threshold"),
                             temporal_filter=(PlaceBeliefFilter(place_map.places.positions)
                                              if temporal else None),
                             rerank_compute=self.p("rerank_compute"),
                             stream=self._make_stream(place_map))
        localizer = make_localizer()
        warm_up_s = localizer.warm_up()      # first-call costs here, not on the first frame
        info = {"map": str(map_path), "map_size": len(place_map), "model": describer.card.name,
                "fingerprint": describer.fingerprint, "device": str(describer.device),
                "precision": describer.precision,
                **self._accel_state(accel, describer, local),
                "rerank_model": local.card.name if local is not None else "",
                "map_frame_id": place_map.places.frame_id,
                "stream": "on" if localizer.stream is not None else "off",
                "warm_up_s": round(warm_up_s, 3),
                # set for the process by the launch file's omp_wait_policy argument
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "") or "runtime default"}
        return localizer, make_localizer, info

    def accel_options(self):
        """AccelOptions from the native_kernels / integer_attention / kernel_cache /
        conv_transpose / patch_conv parameters (auto = the documented environment override,
        else the default)."""
        from ..accel.options import AccelOptions

        switch = {"auto": None, "on": True, "off": False}
        return AccelOptions(native_kernels=switch[self.p("native_kernels")],
                            integer_attention=switch[self.p("integer_attention")],
                            kernel_cache=self.p("kernel_cache") or None,
                            conv_transpose=self.p("conv_transpose"),
                            patch_conv=self.p("patch_conv"))

    @staticmethod
    def _accel_state(accel, describer, local) -> Dict[str, str]:
        """What the acceleration switches came to (diagnostics): the kernels are built here,
        at configure, where a model or the re-ranking uses them, not at the first frame."""
        int8 = describer.precision == "int8"
        computes = {"conv_transpose": accel.conv_transpose if int8 else "unused",
                    "patch_conv": accel.patch_conv if int8 else "unused"}
        if describer.device.type != "cpu":
            return {"native_kernels": "unused (not on the CPU)", "integer_attention": "unused",
                    **computes}
        uses = int8 or local is not None
        if not uses:
            return {"native_kernels": "unused (fp32, no re-ranking)",
                    "integer_attention": "unused", **computes}
        from ..accel.int8_kernels import native_kernels

        built = native_kernels(accel.native_kernels, accel.kernel_cache) is not None
        state = "on" if built else ("off" if accel.use_native_kernels() is False
                                    else "unavailable (no C compiler; see the log)")
        attention = ("on" if built and accel.use_integer_attention() else "off") \
            if int8 else "unused"
        return {"native_kernels": state, "integer_attention": attention, **computes}

    def _make_stream(self, place_map):
        """A stream localizer for one camera (route and calibration from the map), or None."""
        if not self.p("stream"):
            return None
        from ..stream import StreamConfig, StreamLocalizer

        config = StreamConfig(
            candidates=int(self.p("stream_candidates")),
            max_hypotheses=int(self.p("stream_max_hypotheses")),
            kidnap_prob=float(self.p("stream_kidnap_prob")),
            reverse_prob=float(self.p("stream_reverse_prob")),
            speed_change_prob=float(self.p("stream_speed_change_prob")),
            max_speed_mps=float(self.p("stream_max_speed_mps")),
            still_cosine=float(self.p("stream_still_cosine")),
            rerank_weight=float(self.p("stream_rerank_weight")),
            radius_m=float(self.p("stream_radius_m")),
            odometry_sigma=float(self.p("stream_odometry_sigma")),
            odometry_max_gap_s=float(self.p("stream_odometry_max_gap_s")))
        return StreamLocalizer.for_map(place_map, config.validate())

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        t = time.monotonic()
        try:
            self.localizer, self._make_localizer, self.info = self._load()
            self._spacing_m = place_spacing(self.localizer.place_map.places.positions)
        except VprError as exc:
            self.configure_error = str(exc)
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        except Exception as exc:  # a bug or an environment problem: say what it was
            self.configure_error = f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"configure failed: {type(exc).__name__}: {exc}")
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self.info["place_spacing_m"] = round(self._spacing_m, 3)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        pub = self.create_lifecycle_publisher
        self._pubs = {
            "pose": pub(PoseWithCovarianceStamped, "~/pose", 10),
            "candidates": pub(PoseArray, "~/candidates", 10),
            "matches": pub(String, "~/matches", 10),
            "debug_image": pub(Image, "~/debug_image", 2),
            "markers": pub(MarkerArray, "~/markers", 10),
            "map_markers": pub(MarkerArray, "~/map_markers", latched),
            "initialpose": pub(PoseWithCovarianceStamped, self.p("initialpose_topic"), latched),
            "localized": pub(Bool, "~/localized", latched),
        }
        self._localized_sent = None
        self.state_label = "inactive"
        self.get_logger().info(
            f"configured in {time.monotonic() - t:.1f} s: map {self.info['map']} "
            f"({self.info['map_size']} places, frame {self.info['map_frame_id']}), model "
            f"{self.info['model']} on {self.info['device']}")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            topics = camera_topics(self.p("image_topics"), self.p("image_topic"),
                                   self.p("image_transport"))
        except ConfigError as exc:
            self.get_logger().error(f"activate failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        qos = QoSProfile(depth=self.p("queue_depth"),
                         reliability=qos_profile_sensor_data.reliability,
                         history=qos_profile_sensor_data.history,
                         durability=qos_profile_sensor_data.durability)
        self.cameras = []
        try:
            for i, (topic, transport) in enumerate(topics):
                loc = self.localizer if i == 0 else self._make_localizer()
                cam = Camera(i, topic, transport, loc)
                cam.reset()         # camera 0 reuses its localizer: no belief from before
                self.cameras.append(cam)
                msg_type = CompressedImage if transport == "compressed" else Image
                cam.sub = self.create_subscription(
                    msg_type, topic, lambda msg, c=cam: self._on_image(c, msg), qos)
            odom_topic = self.p("odometry_topic")
            if odom_topic:
                self._odom_sub = self.create_subscription(Odometry, odom_topic,
                                                          self._on_odometry, 50)
        except Exception as exc:     # e.g. an invalid topic name: one line, stay inactive
            self._stop_worker()
            reason = " ".join(str(exc).split())       # rclpy's messages span lines
            self.get_logger().error(f"activate failed: {type(exc).__name__}: {reason}")
            return TransitionCallbackReturn.FAILURE
        self._stop.clear()
        self._initialpose_due = True
        for cam in self.cameras:
            cam.worker = threading.Thread(target=self._work, args=(cam,),
                                          name=f"vpr_worker_{cam.index}", daemon=True)
            cam.worker.start()
        self.state_label = "active"
        ret = super().on_activate(state)      # enables the lifecycle publishers
        self._publish_map_markers()
        with self._work_lock:
            self._publish_localized()
        self.get_logger().info(
            "active: listening on " + ", ".join(f"{c.resolved_topic} ({c.transport})"
                                                for c in self.cameras)
            + (f", odometry {self._odom_sub.topic_name}" if self._odom_sub else ""))
        return ret

    def _stop_worker(self) -> None:
        """Unsubscribe and stop every camera's worker (the pending frames are dropped)."""
        self._stop.set()
        if self._odom_sub is not None:
            self.destroy_subscription(self._odom_sub)
            self._odom_sub = None
        for cam in self.cameras:
            if cam.sub is not None:
                self.destroy_subscription(cam.sub)
                cam.sub = None
            cam.slot.close()
        for cam in self.cameras:
            if cam.worker is not None:
                cam.worker.join(timeout=30.0)
                cam.worker = None
            cam.slot.discard()

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_worker()
        with self._work_lock:
            for cam in self.cameras:
                cam.localized = False
            self._publish_localized()       # a late subscriber must not read a stale true
        self.state_label = "inactive"
        return super().on_deactivate(state)

    def _free(self) -> None:
        for p in self._pubs.values():
            self.destroy_lifecycle_publisher(p)
        self._pubs = {}
        device = str(self.info.get("device", ""))
        self.localizer = None
        self._make_localizer = None
        for cam in self.cameras:
            cam.localizer = None
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

    # ------------------------------------------------------------------ services, odometry
    def _on_relocalize(self, request, response):
        """~/relocalize (std_srvs/Trigger): forget every camera's belief, localize globally
        again; /initialpose is published again at the next confident localization."""
        if self.state_label not in ("inactive", "active"):
            response.success = False
            response.message = f"not relocalizing: node is {self.state_label}"
            return response
        with self._work_lock:
            for cam in self.cameras:
                cam.reset()
            self._publish_localized()
            self._initialpose_due = True
            self.relocalizations += 1
        response.success = True
        response.message = (f"relocalizing: belief reset on {len(self.cameras)} camera(s); "
                            "state lost until the next confident match")
        self.get_logger().info(response.message)
        return response

    def _on_odometry(self, msg) -> None:
        """Odometry callback: O(1). A good message is queued for every camera's stream; the
        camera's worker hands it to the stream before its next frame (the stream is not
        thread-safe, and waiting here for an inference would stall every callback).  The
        message is counted once it is queued (or skipped), so a count seen from outside
        means the next frame's stream update has it."""
        p = msg.pose.pose.position
        xyz = (p.x, p.y, p.z)
        stamp_ns = stamp_to_ns(msg.header.stamp)
        if not all(math.isfinite(v) for v in xyz) or stamp_ns <= 0:
            self.odometry["bad"] += 1
            self.odometry["received"] += 1           # last: a reader sees both counts
            topic = self._odom_sub.topic_name if self._odom_sub is not None else "odometry"
            self.get_logger().warning(f"skipping bad odometry on {topic}: "
                                      f"position {xyz}, stamp {stamp_ns} ns",
                                      throttle_duration_sec=5.0)
            return
        for cam in self.cameras:
            if cam.stream is not None:
                cam.odometry.append((stamp_ns, xyz))
        self.odometry["received"] += 1

    def _feed_odometry(self, cam: Camera) -> None:
        """Queued odometry into the camera's stream (worker thread, _work_lock held)."""
        while cam.odometry:
            stamp_ns, xyz = cam.odometry.popleft()
            if cam.stream.add_odometry(stamp_ns, xyz) is False:
                self.odometry["rejected"] += 1
                why = getattr(cam.stream, "last_odometry_rejection", None) or "rejected"
                self.get_logger().warning(f"odometry rejected by the stream localizer of "
                                          f"{cam.resolved_topic}: {why}",
                                          throttle_duration_sec=5.0)

    # ------------------------------------------------------------------ hot path
    def _on_image(self, cam: Camera, msg) -> None:
        """Subscription callback: O(1), no conversion."""
        self.stats.input()
        cam.slot.put((msg, time.monotonic()))

    def _work(self, cam: Camera) -> None:
        while not self._stop.is_set():
            item = cam.slot.take(timeout=0.2)
            if item is None:
                continue
            rate = float(self.p("max_rate_hz"))
            if rate > 0:
                wait = cam.last_start + 1.0 / rate - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    break
                newer = cam.slot.take(timeout=0)
                if newer is not None:       # a newer frame came in while waiting
                    cam.slot.count_drop()
                    item = newer
            cam.last_start = time.monotonic()
            try:
                self.process(cam, *item)
            except Exception as exc:  # keep the node alive whatever one frame does
                self.stats.error(f"{type(exc).__name__}: {exc}")
                self.get_logger().error(f"frame failed ({cam.topic}): {type(exc).__name__}: "
                                        f"{exc}", throttle_duration_sec=5.0)

    def process(self, cam: Camera, msg, received: float) -> None:
        t0 = time.monotonic()
        timings = {"queue": (t0 - received) * 1e3}
        try:
            rgb = msg_to_rgb(msg, int(self.p("max_pixels")))
        except ImageError as exc:
            self.stats.bad(f"{cam.resolved_topic}: {exc}")
            self.get_logger().warning(f"skipping bad frame on {cam.resolved_topic}: {exc}",
                                      throttle_duration_sec=5.0)
            return
        timings["convert"] = (time.monotonic() - t0) * 1e3
        localizer = cam.localizer
        if localizer is None:
            return
        stamp_ns = stamp_to_ns(msg.header.stamp)
        with self._work_lock:
            if cam.stream is not None:
                self._feed_odometry(cam)
            result = localizer.localize(rgb, stamp_ns=stamp_ns)    # stream applied inside
            cam.update_state(bool(result.confident), int(self.p("lost_after_frames")))
            self._publish_localized()
        quality = getattr(result, "quality", None)
        if quality is not None and quality.degenerate:
            self.stats.degenerate(f"{cam.resolved_topic}: {quality.reason}")
            self.get_logger().warning(f"degenerate frame on {cam.resolved_topic} "
                                      f"({quality.reason}): never confident, no evidence",
                                      throttle_duration_sec=5.0)
        timings.update(result.timings_ms)
        timings.pop("total", None)
        t_pub = time.monotonic()
        self._publish(cam, msg.header, rgb, result, timings, received, t_pub)

    def _publish(self, cam: Camera, in_header, rgb, result, timings, received, t_pub) -> None:
        frame_id = self.pose_frame()
        header = Header(stamp=in_header.stamp, frame_id=frame_id)
        k = int(self.p("top_k"))
        cands = result.candidates[:k]
        pubs = self._pubs
        loc = cam.localizer
        if not pubs or loc is None:
            return
        arr = PoseArray(header=header)
        orientations = loc.place_map.places.orientations
        for c in cands:
            arr.poses.append(pose_from_arrays(c.position, orientations[c.place_index]))
        pubs["candidates"].publish(arr)
        initialpose = False
        if result.confident:
            pose = PoseWithCovarianceStamped(header=header)
            pose.pose.pose = pose_from_arrays(result.position, result.orientation)
            pose.pose.covariance = covariance_from_confidence(
                result.confidence, self.p("position_sigma_m"), self.p("orientation_sigma_rad"))
            pubs["pose"].publish(pose)
            if cam.localized and self._initialpose_due and self.p("publish_initialpose"):
                self._initialpose_due = False
                initialpose = True
                pubs["initialpose"].publish(initialpose_msg(
                    header, result.position, result.orientation, result.confidence,
                    self._spacing_m or 1.0, self.p("orientation_sigma_rad")))
                self.get_logger().info(
                    f"published {pubs['initialpose'].topic_name}: place {result.place_id} "
                    f"(confidence {result.confidence:.2f}, camera {cam.resolved_topic})")
        if self.p("publish_markers"):
            label = (f"{cam.index}: place {result.place_id} "
                     f"{result.confidence:.2f}{'' if result.confident else ' ?'}")
            pubs["markers"].publish(match_markers(
                header, cam.index, result.position, bool(result.confident), label,
                [c.position for c in cands], [c.similarity for c in cands],
                marker_scale(self._spacing_m)))
        self._processed_seq += 1
        cam.processed += 1
        timings["publish"] = (time.monotonic() - t_pub) * 1e3
        timings["total"] = (time.monotonic() - received) * 1e3
        stamp_ns = stamp_to_ns(in_header.stamp)
        stream = getattr(result, "stream", None)
        quality = getattr(result, "quality", None)
        doc = {
            "stamp": {"sec": int(in_header.stamp.sec), "nanosec": int(in_header.stamp.nanosec)},
            "stamp_ns": stamp_ns,
            "frame_id": frame_id,
            "camera_frame_id": in_header.frame_id,
            "camera": cam.resolved_topic,
            "camera_index": cam.index,
            "seq": self._processed_seq,
            "place_id": int(result.place_id),
            "image_name": result.image_name,
            "position": [float(v) for v in result.position],
            "orientation": [float(v) for v in result.orientation],
            "score": _json_float(result.similarity),
            "confidence": float(result.confidence),
            "confident": bool(result.confident),
            "confidence_threshold": float(result.confidence_threshold),
            "localized": bool(cam.localized),
            "state": "localized" if cam.localized else "lost",
            "initialpose": initialpose,
            "place_ids": [int(c.place_id) for c in cands],
            "image_names": [c.image_name for c in cands],
            "scores": [_json_float(c.similarity) for c in cands],
            "rerank_scores": ([_json_float(c.rerank_score) for c in cands]
                              if result.reranked else None),
            "reranked": bool(result.reranked),
            "temporal": bool(result.temporal),
            "candidates": [_jsonable(c.to_dict()) for c in cands],
            "single_frame": _jsonable(getattr(result, "single_frame", None)),
            "raw_place_index": (int(result.raw_place_index)
                                if getattr(result, "raw_place_index", None) is not None
                                else None),
            "stream": _jsonable(stream) if stream is not None else None,
            "degenerate": bool(quality is not None and quality.degenerate),
            "degenerate_reason": quality.reason if quality is not None and quality.degenerate
            else None,
            "frames_dropped": int(cam.slot.dropped),
            "timings_ms": {k2: round(float(v), 3) for k2, v in timings.items()},
        }
        pubs["matches"].publish(String(data=json.dumps(doc)))
        self.stats.output(timings, result.confidence, result.confident)
        if self.p("publish_debug_image"):
            try:
                from .debug_image import mutual_nn_pairs, render_debug_image

                pairs = None
                if result.reranked and result.query_local is not None \
                        and loc.place_map.local_features is not None:
                    # the localizer's own query features: no second SelaVPR pass per frame
                    pairs = mutual_nn_pairs(result.query_local,
                                            loc.place_map.local_features[result.place_index])
                img = render_debug_image(rgb, result, self.p("map_images_dir"), self._debug_cache,
                                         correspondences=pairs)
                pubs["debug_image"].publish(rgb_to_image_msg(img, in_header.stamp, frame_id))
            except Exception as exc:  # never let a debug view break localization
                self.get_logger().warning(f"debug image failed: {exc}", throttle_duration_sec=10.0)

    def _publish_localized(self) -> None:
        """~/localized (latched std_msgs/Bool): any camera localized; sent on change only.
        Called with _work_lock held."""
        pub = self._pubs.get("localized")
        now = any(c.localized for c in self.cameras)
        if pub is not None and now != self._localized_sent:
            pub.publish(Bool(data=now))
            self._localized_sent = now

    def _publish_map_markers(self) -> None:
        pub = self._pubs.get("map_markers")
        if pub is None or self.localizer is None or not self.p("publish_markers"):
            return
        header = Header(stamp=self.get_clock().now().to_msg(), frame_id=self.pose_frame())
        pub.publish(map_markers(header, self.localizer.place_map.places.positions,
                                int(self.p("markers_max_places")),
                                marker_scale(self._spacing_m)))

    # ------------------------------------------------------------------ diagnostics
    def diagnostics_values(self) -> dict:
        snap = self.stats.snapshot()
        cams = list(self.cameras) if self.state_label == "active" else []
        snap.update({
            "state": self.state_label,
            "localized": any(c.localized for c in cams),
            "frames_received": sum(c.slot.received for c in cams),
            "frames_dropped": sum(c.slot.dropped for c in cams),
            "image_topic": ", ".join(c.resolved_topic for c in cams),
            "cameras": len(cams),
            "relocalizations": self.relocalizations,
            "odometry_received": self.odometry["received"],
            "odometry_bad": self.odometry["bad"],
            "odometry_rejected": self.odometry["rejected"],
            "pose_frame_id": self.pose_frame() if self.info else "",
        })
        for c in cams:
            snap.update({f"camera{c.index}_topic": c.resolved_topic,
                         f"camera{c.index}_state": "localized" if c.localized else "lost",
                         f"camera{c.index}_frames_received": c.slot.received,
                         f"camera{c.index}_frames_processed": c.processed,
                         f"camera{c.index}_frames_dropped": c.slot.dropped})
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
                message = (f"{'localized' if values['localized'] else 'lost'}, localizing at "
                           f"{values['processing_rate_hz']:.1f} Hz "
                           f"(input {values['input_rate_hz']:.1f} Hz)")
        kv: List[KeyValue] = []
        for key, value in values.items():
            if key == "latency_ms":
                for stage, st in value.items():
                    kv.append(KeyValue(key=f"latency_{stage}_ms_mean", value=f"{st['mean']:.2f}"))
                    kv.append(KeyValue(key=f"latency_{stage}_ms_p95", value=f"{st['p95']:.2f}"))
            elif isinstance(value, bool):
                kv.append(KeyValue(key=key, value="true" if value else "false"))
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


def _jsonable(value):
    """The stream localizer's answer (a dict, or an object with to_dict()) as JSON-safe
    values (numpy scalars, non-finite floats)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_float(value)
    return value if value is None or isinstance(value, str) else str(value)


def run(args: Optional[List[str]] = None, context=None) -> int:
    """Create the node, autostart it when asked, spin until shutdown; the exit status."""
    try:
        node = LocalizerNode(context=context) if context is not None else LocalizerNode()
    except ParameterException as exc:   # e.g. -p top_k:=0: one line, not a traceback
        rclpy.logging.get_logger(NODE_NAME).error(f"bad parameter: {exc}")
        return 1
    executor = SingleThreadedExecutor(context=node.context)
    executor.add_node(node)
    code = 0
    try:
        if node.p("autostart"):
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                return 0 if not node.context.ok() else 1     # Ctrl-C while starting: clean
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                return 0 if not node.context.ok() else 1     # on_activate logged why
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
