"""rclpy messages <-> numpy arrays.

Images: the robot's ``cv_bridge`` is used when it imports AND converts a probe image
correctly (a cv_bridge built against another numpy or OpenCV often imports but crashes or
returns garbage); otherwise, and for anything cv_bridge refuses, the ROS-free
:mod:`vpr_ros.image_encoding` does the work.  Both paths raise ImageError /
UnsupportedEncodingError for bad frames.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Time
from geometry_msgs.msg import Point, Pose, Quaternion
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from ..errors import ImageError
from ..image_encoding import (compressed_to_rgb, image_fields_to_rgb, rgb_to_compressed,
                              rgb_to_image_fields)

log = logging.getLogger(__name__)

_BRIDGE = None
_BRIDGE_CHECKED = False
# encodings cv_bridge may handle differently from this package (its bayer/yuv paths
# depend on the OpenCV build); those always go through vpr_ros.image_encoding
_BRIDGE_ENCODINGS = {"rgb8", "bgr8", "rgba8", "bgra8", "mono8"}


def _working_bridge():
    """A cv_bridge.CvBridge that passed a probe conversion, or None."""
    global _BRIDGE, _BRIDGE_CHECKED
    if _BRIDGE_CHECKED:
        return _BRIDGE
    _BRIDGE_CHECKED = True
    try:
        from cv_bridge import CvBridge

        bridge = CvBridge()
        probe = Image(height=1, width=2, encoding="bgr8", step=6, is_bigendian=0,
                      data=bytes([1, 2, 3, 4, 5, 6]))
        out = np.asarray(bridge.imgmsg_to_cv2(probe, desired_encoding="rgb8"))
        if out.shape != (1, 2, 3) or out[0, 0].tolist() != [3, 2, 1]:
            raise RuntimeError(f"probe conversion returned {out.tolist()}")
        _BRIDGE = bridge
        log.debug("using cv_bridge for image conversion")
    except Exception as exc:  # ImportError, ABI mismatch, ...
        log.debug("cv_bridge not usable (%s); using vpr_ros.image_encoding", exc)
        _BRIDGE = None
    return _BRIDGE


def using_cv_bridge() -> bool:
    return _working_bridge() is not None


def image_msg_to_rgb(msg: Image) -> np.ndarray:
    """sensor_msgs/Image -> RGB uint8 (H, W, 3)."""
    bridge = _working_bridge()
    if bridge is not None and msg.encoding.lower() in _BRIDGE_ENCODINGS:
        try:
            expected = msg.step * msg.height
            if msg.height and msg.width and len(msg.data) == expected \
                    and msg.step >= msg.width * (3 if msg.encoding in ("rgb8", "bgr8") else 1):
                out = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding="rgb8"))
                if out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8:
                    return np.ascontiguousarray(out)
        except Exception:  # fall through to the checked conversion with its clear errors
            pass
    return image_fields_to_rgb(msg.encoding, msg.height, msg.width, msg.step,
                               msg.is_bigendian, msg.data)


def compressed_msg_to_rgb(msg: CompressedImage, max_pixels=None) -> np.ndarray:
    """sensor_msgs/CompressedImage -> RGB uint8 (H, W, 3); ImageError above max_pixels."""
    return compressed_to_rgb(msg.format, msg.data, max_pixels=max_pixels)


def msg_to_rgb(msg, max_pixels=None) -> np.ndarray:
    if isinstance(msg, CompressedImage):
        return compressed_msg_to_rgb(msg, max_pixels)
    if isinstance(msg, Image):
        return image_msg_to_rgb(msg)
    raise ImageError(f"not an image message: {type(msg).__name__}")


def ns_to_stamp(stamp_ns: int) -> Time:
    sec, nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return Time(sec=sec, nanosec=nanosec)


def stamp_to_ns(stamp: Time) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def rgb_to_image_msg(rgb: np.ndarray, stamp: Optional[Time] = None, frame_id: str = "",
                     encoding: str = "rgb8") -> Image:
    f = rgb_to_image_fields(rgb, encoding)
    return Image(header=Header(stamp=stamp or Time(), frame_id=frame_id), height=f["height"],
                 width=f["width"], encoding=f["encoding"], is_bigendian=f["is_bigendian"],
                 step=f["step"], data=f["data"])


def rgb_to_compressed_msg(rgb: np.ndarray, stamp: Optional[Time] = None, frame_id: str = "",
                          fmt: str = "jpeg") -> CompressedImage:
    fmt, data = rgb_to_compressed(rgb, fmt)
    return CompressedImage(header=Header(stamp=stamp or Time(), frame_id=frame_id), format=fmt,
                           data=data)


def pose_from_arrays(position: Sequence[float], orientation: Sequence[float]) -> Pose:
    """(x, y, z) and (x, y, z, w) -> geometry_msgs/Pose
    (NaN position -> 0, bad quat -> identity)."""
    p = [0.0 if not np.isfinite(v) else float(v) for v in position]
    q = np.asarray(orientation, dtype=np.float64)
    n = np.linalg.norm(q) if np.all(np.isfinite(q)) else 0.0
    q = q / n if n > 1e-9 else np.array([0.0, 0.0, 0.0, 1.0])
    return Pose(position=Point(x=p[0], y=p[1], z=p[2]),
                orientation=Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]),
                                       w=float(q[3])))
