"""rosbag2 reading and writing without ROS, with the ``rosbags`` library.

Read camera images (``sensor_msgs/Image`` or ``CompressedImage``) and ground-truth poses
(``nav_msgs/Odometry``, ``geometry_msgs/PoseStamped``, ``PoseWithCovarianceStamped``)
from sqlite3 or mcap bags, interpolate poses at image stamps, and write image bags (for
tests, the demo and `vpr bag from-images`).  Every user-caused failure raises BagError
(missing bag, unknown or empty topic, wrong message type, no poses) or ImageError (a frame
that cannot be decoded).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

from .atomic import atomic_directory
from .constants import MAX_POSE_GAP_S
from .errors import BagError, ImageError
from .image_encoding import (compressed_to_rgb, image_fields_to_rgb, rgb_to_compressed,
                             rgb_to_image_fields)

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
POSE_TYPES = ("nav_msgs/msg/Odometry", "geometry_msgs/msg/PoseStamped",
              "geometry_msgs/msg/PoseWithCovarianceStamped")
STORAGES = ("sqlite3", "mcap")


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    store = getattr(Stores, "ROS2_KILTED", None) or Stores.ROS2_HUMBLE
    return get_typestore(store)


def _check_bag_path(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise BagError(f"bag not found: {path}")
    if path.is_dir() and not (path / "metadata.yaml").is_file():
        raise BagError(f"{path} is not a rosbag2 folder (no metadata.yaml); pass the bag "
                       "folder that `ros2 bag record` wrote")
    return path


class _Bag:
    """An open bag (context manager) with clear errors."""

    def __init__(self, path: PathLike):
        from rosbags.highlevel import AnyReader

        self.path = _check_bag_path(path)
        try:
            self.reader = AnyReader([self.path], default_typestore=_typestore())
            self.reader.open()
        except Exception as exc:  # rosbags raises several unrelated types
            raise BagError(f"cannot open bag {self.path}: {exc}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.reader.close()

    def topics(self) -> Dict[str, Tuple[str, int]]:
        out: Dict[str, Tuple[str, int]] = {}
        for conn in self.reader.connections:
            msgtype, count = out.get(conn.topic, (conn.msgtype, 0))
            out[conn.topic] = (msgtype, count + int(conn.msgcount))
        return out

    def connections(self, topic: str, allowed: Sequence[str], what: str):
        topics = self.topics()
        if topic not in topics:
            listing = ", ".join(f"{t} ({m})" for t, (m, _) in sorted(topics.items())) or "none"
            raise BagError(f"topic {topic!r} is not in bag {self.path}; topics: {listing}")
        msgtype, count = topics[topic]
        if msgtype not in allowed:
            raise BagError(f"topic {topic!r} in {self.path} carries {msgtype}, not {what} "
                           f"({' or '.join(allowed)})")
        if count == 0:
            raise BagError(f"topic {topic!r} in bag {self.path} has no messages")
        return [c for c in self.reader.connections if c.topic == topic]

    def messages(self, connections, skip_bad: bool = False
                 ) -> Iterator[Tuple[object, int, object]]:
        """(connection, receive time, message); a message that cannot be deserialized
        raises BagError, or with ``skip_bad`` comes as ``(connection, time, BagError)``."""
        for conn, bag_ns, raw in self.reader.messages(connections=connections):
            try:
                msg = self.reader.deserialize(raw, conn.msgtype)
            except Exception as exc:  # rosbags raises several unrelated types
                err = BagError(f"cannot deserialize a {conn.msgtype} message on {conn.topic} "
                               f"in {self.path}: {' '.join(str(exc).split())}")
                if not skip_bad:
                    raise err from None
                msg = err
            yield conn, int(bag_ns), msg


def _stamp_ns(header, fallback_ns: int) -> int:
    ns = int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)
    return ns if ns > 0 else int(fallback_ns)


def bag_topics(path: PathLike) -> Dict[str, Tuple[str, int]]:
    """topic -> (message type, message count) of a bag."""
    with _Bag(path) as bag:
        return bag.topics()


def bag_summary(path: PathLike) -> dict:
    """Topics, duration and start/end times of a bag (for `vpr bag info`)."""
    with _Bag(path) as bag:
        r = bag.reader
        storage = "mcap" if any(p.suffix == ".mcap" for p in Path(bag.path).glob("*")) \
            else "sqlite3"
        return {
            "path": str(bag.path),
            "storage": storage,
            "duration_s": r.duration / 1e9 if r.message_count else 0.0,
            "start_ns": int(r.start_time) if r.message_count else None,
            "end_ns": int(r.end_time) if r.message_count else None,
            "message_count": int(r.message_count),
            "topics": {t: {"type": m, "count": c} for t, (m, c) in sorted(bag.topics().items())},
        }


@dataclass
class BagImage:
    """One camera frame from a bag."""

    stamp_ns: int            # header stamp (bag receive time when the header stamp is 0)
    image: np.ndarray        # RGB uint8 (H, W, 3)
    frame_id: str
    index: int               # position on the topic, from 0
    bag_time_ns: int = 0     # time the recorder received it


def message_to_rgb(msg, msgtype: str) -> np.ndarray:
    """Decode a deserialized (rosbags) Image or CompressedImage message to RGB uint8."""
    if msgtype.endswith("CompressedImage"):
        return compressed_to_rgb(msg.format, msg.data)
    return image_fields_to_rgb(msg.encoding, msg.height, msg.width, msg.step,
                               msg.is_bigendian, msg.data)


def read_images(path: PathLike, topic: str, skip_bad: bool = False) -> Iterator[BagImage]:
    """Yield the frames of an image topic in recording order.

    A frame that cannot be decoded (pixels, or the message itself) raises ImageError /
    BagError naming its index, or is skipped with a warning when ``skip_bad`` (as the live
    node does); skipped frames keep their index, so callers count them as the gaps.
    """
    with _Bag(path) as bag:
        conns = bag.connections(topic, IMAGE_TYPES, "an image topic")
        for index, (conn, bag_ns, msg) in enumerate(bag.messages(conns, skip_bad=skip_bad)):
            if isinstance(msg, BagError):
                log.warning("skipping bad frame %d on %s: %s", index, topic, msg)
                continue
            try:
                rgb = message_to_rgb(msg, conn.msgtype)
            except ImageError as exc:
                if not skip_bad:
                    raise type(exc)(f"{path} {topic} frame {index}: {exc}") from None
                log.warning("skipping bad frame %d on %s: %s", index, topic, exc)
                continue
            yield BagImage(stamp_ns=_stamp_ns(msg.header, bag_ns), image=rgb,
                           frame_id=str(msg.header.frame_id), index=index, bag_time_ns=bag_ns)


def read_image_stamps(path: PathLike, topic: str) -> np.ndarray:
    """Header stamps (ns) of an image topic without decoding the pixels."""
    with _Bag(path) as bag:
        conns = bag.connections(topic, IMAGE_TYPES, "an image topic")
        # An undecodable message keeps its place (receive time as its stamp), so the
        # stamps line up with read_images' frame indices.
        return np.array([t if isinstance(m, BagError) else _stamp_ns(m.header, t)
                         for _, t, m in bag.messages(conns, skip_bad=True)], dtype=np.int64)


def _quat_normalize(q: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    bad = n[..., 0] < 1e-12
    q = q / np.where(n < 1e-12, 1.0, n)
    q[bad] = (0.0, 0.0, 0.0, 1.0)
    return q


def slerp(q0: np.ndarray, q1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical linear interpolation of xyzw quaternions, row-wise, shortest path."""
    q0 = _quat_normalize(np.asarray(q0, dtype=np.float64))
    q1 = _quat_normalize(np.asarray(q1, dtype=np.float64))
    t = np.asarray(t, dtype=np.float64)[:, None]
    dot = np.sum(q0 * q1, axis=1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot).clip(max=1.0)
    theta = np.arccos(dot)
    sin = np.sin(theta)
    near = sin[:, 0] < 1e-6
    safe = np.where(sin < 1e-6, 1.0, sin)
    w0 = np.sin((1 - t) * theta) / safe
    w1 = np.sin(t * theta) / safe
    out = w0 * q0 + w1 * q1
    lin = (1 - t) * q0 + t * q1
    out[near] = lin[near]
    return _quat_normalize(out)


@dataclass
class PoseTrack:
    """Poses in time order: stamps (N,) ns, positions (N, 3), orientations (N, 4) xyzw."""

    stamps_ns: np.ndarray
    positions: np.ndarray
    orientations: np.ndarray
    frame_id: str = ""
    msgtype: str = ""

    def __post_init__(self):
        order = np.argsort(self.stamps_ns, kind="stable")
        self.stamps_ns = np.asarray(self.stamps_ns, dtype=np.int64)[order]
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)[order]
        self.orientations = _quat_normalize(
            np.asarray(self.orientations, dtype=np.float64).reshape(-1, 4)[order])

    def __len__(self) -> int:
        return int(self.stamps_ns.size)

    def interpolate(self, stamps_ns, max_gap_s: float = MAX_POSE_GAP_S
                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Poses at ``stamps_ns``: linear position, slerp orientation.

        A stamp is valid when it lies between two poses at most ``max_gap_s`` apart (or
        exactly on one pose); stamps before the first / after the last pose or inside a
        larger gap are invalid (position NaN, orientation identity).
        """
        q = np.asarray(stamps_ns, dtype=np.int64).reshape(-1)
        n = q.size
        pos = np.full((n, 3), np.nan)
        ori = np.tile(np.array([0.0, 0.0, 0.0, 1.0]), (n, 1))
        valid = np.zeros(n, dtype=bool)
        if len(self) == 0 or n == 0:
            return pos, ori, valid
        s = self.stamps_ns
        hi = np.searchsorted(s, q, side="left")
        exact = (hi < len(s)) & (s[np.minimum(hi, len(s) - 1)] == q)
        idx = np.minimum(hi, len(s) - 1)
        pos[exact] = self.positions[idx[exact]]
        ori[exact] = self.orientations[idx[exact]]
        valid[exact] = True
        inner = (~exact) & (hi > 0) & (hi < len(s))
        if inner.any():
            i1 = hi[inner]
            i0 = i1 - 1
            gap = (s[i1] - s[i0]).astype(np.float64)
            ok = gap <= max_gap_s * 1e9
            t = (q[inner] - s[i0]).astype(np.float64) / np.where(gap > 0, gap, 1.0)
            p = self.positions[i0] + t[:, None] * (self.positions[i1] - self.positions[i0])
            o = slerp(self.orientations[i0], self.orientations[i1], t)
            where = np.flatnonzero(inner)[ok]
            pos[where] = p[ok]
            ori[where] = o[ok]
            valid[where] = True
        return pos, ori, valid


def _pose_of(msg, msgtype: str):
    if msgtype.endswith("Odometry") or msgtype.endswith("PoseWithCovarianceStamped"):
        pose = msg.pose.pose
    else:
        pose = msg.pose
    p, o = pose.position, pose.orientation
    return (p.x, p.y, p.z), (o.x, o.y, o.z, o.w)


def read_poses(path: PathLike, topic: str) -> PoseTrack:
    """All poses of an Odometry / PoseStamped / PoseWithCovarianceStamped topic."""
    with _Bag(path) as bag:
        topics = bag.topics()
        if topic not in topics:
            candidates = [t for t, (m, _) in topics.items() if m in POSE_TYPES]
            hint = (f"; pose topics in this bag: {', '.join(sorted(candidates))}" if candidates
                    else "; this bag has no pose topics: pass ground truth with --poses CSV")
            raise BagError(f"pose topic {topic!r} is not in bag {bag.path}{hint}")
        conns = bag.connections(topic, POSE_TYPES, "a pose topic")
        stamps, positions, orientations, frame = [], [], [], ""
        for conn, bag_ns, msg in bag.messages(conns):
            p, o = _pose_of(msg, conn.msgtype)
            stamps.append(_stamp_ns(msg.header, bag_ns))
            positions.append(p)
            orientations.append(o)
            frame = frame or str(msg.header.frame_id)
        if not stamps:
            raise BagError(f"pose topic {topic!r} in bag {bag.path} has no poses")
        return PoseTrack(np.array(stamps), np.array(positions), np.array(orientations),
                         frame_id=frame, msgtype=conns[0].msgtype)


@dataclass
class BagFrame:
    """One frame to write: stamp, RGB image and optional ground-truth pose."""

    stamp_ns: int
    image: np.ndarray
    position: Optional[Sequence[float]] = None          # (x, y, z)
    orientation: Optional[Sequence[float]] = None       # (x, y, z, w)
    extra: dict = field(default_factory=dict)


def _as_frame(item) -> BagFrame:
    if isinstance(item, BagFrame):
        return item
    if isinstance(item, BagImage):
        return BagFrame(item.stamp_ns, item.image)
    if isinstance(item, dict):
        return BagFrame(**item)
    return BagFrame(*item)


def write_image_bag(path: PathLike, frames: Iterable, image_topic: str = "/camera/image_raw",
                    pose_topic: Optional[str] = "/ground_truth/pose", storage: str = "sqlite3",
                    compressed: bool = False, frame_id: str = "camera",
                    encoding: str = "rgb8", pose_frame_id: str = "map",
                    compressed_format: str = "jpeg", overwrite: bool = True,
                    progress: bool = False, total: Optional[int] = None) -> int:
    """Write frames as a rosbag2 folder (atomically); returns the number of images.

    ``frames``: BagFrame objects, dicts with its fields, or (stamp_ns, image[, position,
    orientation]) tuples.  Images are written as sensor_msgs/Image in ``encoding`` or, with
    ``compressed``, as CompressedImage (``compressed_format`` jpeg|png).  Frames with a
    position also get a geometry_msgs/PoseStamped on ``pose_topic`` with the same stamp
    (orientation identity when not given).  The bag time of each message is its stamp.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer

    if storage not in STORAGES:
        raise BagError(f"unknown bag storage {storage!r}; use one of {STORAGES}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise BagError(f"{path} exists; remove it or choose another --out")
    ts = _typestore()
    Image = ts.types["sensor_msgs/msg/Image"]
    CompressedImage = ts.types["sensor_msgs/msg/CompressedImage"]
    PoseStamped = ts.types["geometry_msgs/msg/PoseStamped"]
    Header = ts.types["std_msgs/msg/Header"]
    Time = ts.types["builtin_interfaces/msg/Time"]
    Pose = ts.types["geometry_msgs/msg/Pose"]
    Point = ts.types["geometry_msgs/msg/Point"]
    Quaternion = ts.types["geometry_msgs/msg/Quaternion"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3

    def header(stamp_ns: int, frame: str):
        sec, nsec = divmod(int(stamp_ns), 1_000_000_000)
        return Header(stamp=Time(sec=sec, nanosec=nsec), frame_id=frame)

    count = 0
    iterator = frames
    if progress:
        from tqdm import tqdm
        if total is None and hasattr(frames, "__len__"):
            total = len(frames)
        iterator = tqdm(frames, desc=f"writing {path.name}", unit="frame", total=total)
    with atomic_directory(path) as tmp:
        inner = tmp / path.name
        writer = Writer(inner, version=9, storage_plugin=plugin)
        writer.open()
        try:
            msgtype = IMAGE_TYPES[1] if compressed else IMAGE_TYPES[0]
            img_conn = writer.add_connection(image_topic, msgtype, typestore=ts)
            pose_conn = None
            last = None
            for item in iterator:
                fr = _as_frame(item)
                stamp = int(fr.stamp_ns)
                if last is not None and stamp < last:
                    raise BagError(f"frame {count}: stamps must not go backwards "
                                   f"({stamp} < {last})")
                last = stamp
                if compressed:
                    fmt, data = rgb_to_compressed(fr.image, compressed_format)
                    msg = CompressedImage(header=header(stamp, frame_id), format=fmt,
                                          data=np.frombuffer(data, dtype=np.uint8))
                else:
                    f = rgb_to_image_fields(fr.image, encoding)
                    msg = Image(header=header(stamp, frame_id), height=f["height"],
                                width=f["width"], encoding=f["encoding"],
                                is_bigendian=f["is_bigendian"], step=f["step"],
                                data=np.frombuffer(f["data"], dtype=np.uint8))
                writer.write(img_conn, stamp, ts.serialize_cdr(msg, msgtype))
                if pose_topic and fr.position is not None:
                    if pose_conn is None:
                        pose_conn = writer.add_connection(pose_topic, POSE_TYPES[1], typestore=ts)
                    x, y, z = (float(v) for v in fr.position)
                    q = (0, 0, 0, 1) if fr.orientation is None else fr.orientation  # arrays too
                    qx, qy, qz, qw = (float(v) for v in q)
                    pmsg = PoseStamped(header=header(stamp, pose_frame_id),
                                       pose=Pose(position=Point(x=x, y=y, z=z),
                                                 orientation=Quaternion(x=qx, y=qy, z=qz, w=qw)))
                    writer.write(pose_conn, stamp, ts.serialize_cdr(pmsg, POSE_TYPES[1]))
                count += 1
            if count == 0:
                raise BagError("no frames to write: the image list is empty")
        except BaseException:
            writer.abort() if hasattr(writer, "abort") else None
            raise
        writer.close()
        for item in inner.iterdir():
            shutil.move(str(item), str(tmp / item.name))
        inner.rmdir()
    return count
