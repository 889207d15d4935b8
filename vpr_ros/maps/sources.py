"""Where map places come from: an image folder + poses CSV, a benchmark dataset, a rosbag.

Every source yields :class:`MapEntry` objects (name, pose, stamp, and a way to get the
RGB image) in driving order; :func:`select_keyframes` thins them out by distance and
time.  Sources read images lazily, so a map of many thousand images never holds them
all in memory.

Poses CSV for ``--images DIR --poses CSV`` (one row per image; header names are
case-insensitive; see docs/maps.md):

==================  =====================================================
image name          ``filename`` | ``image`` | ``image_name`` | ``name`` (path relative to DIR)
position            ``x`` | ``east_m`` | ``east``;  ``y`` | ``north_m`` | ``north``;
                    optional ``z`` | ``up_m`` (default 0)
orientation         optional ``qx, qy, qz, qw``, or ``yaw_deg`` (about +z); default identity
time stamp          optional ``stamp_ns`` (integer ns) or ``stamp`` | ``t_s`` | ``time`` (seconds)
==================  =====================================================

Every image in DIR must have a row and every row an image; otherwise DatasetError
lists a few of each.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

import numpy as np

from ..constants import MAX_POSE_GAP_S
from ..errors import BagError, DatasetError
from ..preprocess import load_image
from .format import yaw_to_quaternion

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

NAME_COLUMNS = ("filename", "image", "image_name", "name")
X_COLUMNS = ("x", "east_m", "east")
Y_COLUMNS = ("y", "north_m", "north")
Z_COLUMNS = ("z", "up_m")
STAMP_NS_COLUMNS = ("stamp_ns",)
STAMP_S_COLUMNS = ("stamp", "t_s", "time")


@dataclass
class MapEntry:
    """One place to add to a map: a name, a pose, a stamp and the image (or how to load it)."""

    name: str
    position: np.ndarray                      # (3,) x, y, z
    orientation: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0, 1.0]))
    stamp_ns: int = -1
    path: Optional[Path] = None               # image file, loaded on demand
    image: Optional[np.ndarray] = None        # or the decoded RGB image itself
    max_pixels: Optional[int] = None          # pixel limit of the file (None: the default)

    def load(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        if self.path is None:
            raise DatasetError(f"place {self.name!r} has neither an image nor an image path")
        return load_image(self.path, max_pixels=self.max_pixels)


# --------------------------------------------------------------------------- CSV helpers

def _pick(header_map: dict, names, required: bool, what: str, csv_path: Path):
    for n in names:
        if n in header_map:
            return header_map[n]
    if required:
        raise DatasetError(f"{csv_path}: no {what} column (accepted: {', '.join(names)}; "
                           f"found: {', '.join(header_map.values())})")
    return None


def _float(row: dict, col: str, csv_path: Path, line: int) -> float:
    try:
        v = float(row[col])
    except (TypeError, ValueError):
        raise DatasetError(f"{csv_path} line {line}: column {col!r} is not a number: "
                           f"{row.get(col)!r}") from None
    if not math.isfinite(v):
        raise DatasetError(f"{csv_path} line {line}: column {col!r} is not finite")
    return v


@dataclass
class PoseRows:
    names: List[str]
    positions: np.ndarray
    orientations: np.ndarray
    stamps_ns: np.ndarray


def read_poses_csv(csv_path: PathLike, need_names: bool = True) -> PoseRows:
    """Read a poses CSV with the columns documented in this module."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DatasetError(f"poses CSV not found: {csv_path}")
    from ..datasets import read_csv_dicts

    fieldnames, rows = read_csv_dicts(csv_path, "poses CSV")
    if not fieldnames:
        raise DatasetError(f"{csv_path} is empty (expected a header row)")
    hm = {h.strip().lower(): h for h in fieldnames}
    if not rows:
        raise DatasetError(f"{csv_path} has a header but no rows")
    c_name = _pick(hm, NAME_COLUMNS, need_names, "image name", csv_path)
    c_x = _pick(hm, X_COLUMNS, True, "x / east_m", csv_path)
    c_y = _pick(hm, Y_COLUMNS, True, "y / north_m", csv_path)
    c_z = _pick(hm, Z_COLUMNS, False, "z", csv_path)
    quat = [hm.get(c) for c in ("qx", "qy", "qz", "qw")]
    has_quat = all(quat)
    c_yaw = hm.get("yaw_deg")
    c_stamp_ns = _pick(hm, STAMP_NS_COLUMNS, False, "stamp", csv_path)
    c_stamp_s = _pick(hm, STAMP_S_COLUMNS, False, "stamp", csv_path)
    n = len(rows)
    names: List[str] = []
    pos = np.zeros((n, 3))
    ori = np.tile([0.0, 0.0, 0.0, 1.0], (n, 1))
    stamps = np.full(n, -1, dtype=np.int64)
    for i, row in enumerate(rows):
        line = i + 2
        if c_name:
            name = (row.get(c_name) or "").strip()
            if not name:
                raise DatasetError(f"{csv_path} line {line}: empty image name")
            names.append(name)
        pos[i, 0] = _float(row, c_x, csv_path, line)
        pos[i, 1] = _float(row, c_y, csv_path, line)
        if c_z and row.get(c_z) not in (None, ""):
            pos[i, 2] = _float(row, c_z, csv_path, line)
        if has_quat:
            q = np.array([_float(row, c, csv_path, line) for c in quat])
            norm = np.linalg.norm(q)
            if norm < 1e-9:
                raise DatasetError(f"{csv_path} line {line}: zero quaternion")
            ori[i] = q / norm
        elif c_yaw and row.get(c_yaw) not in (None, ""):
            ori[i] = yaw_to_quaternion(_float(row, c_yaw, csv_path, line))
        if c_stamp_ns and row.get(c_stamp_ns) not in (None, ""):
            try:
                stamps[i] = int(row[c_stamp_ns])
            except ValueError:
                raise DatasetError(f"{csv_path} line {line}: stamp_ns must be an integer") from None
        elif c_stamp_s and row.get(c_stamp_s) not in (None, ""):
            stamps[i] = int(round(_float(row, c_stamp_s, csv_path, line) * 1e9))
    if c_name and len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})[:3]
        raise DatasetError(f"{csv_path}: image names appear twice, e.g. {dup}")
    return PoseRows(names, pos, ori, stamps)


# --------------------------------------------------------------------------- sources

def folder_source(images_dir: PathLike, poses_csv: PathLike,
                  max_pixels: Optional[int] = None) -> List[MapEntry]:
    """Images in a folder with their poses in a CSV (rows keep the CSV's order);
    ``max_pixels`` is the pixel limit of each image file (preprocess.load_image)."""
    from ..datasets import IMAGE_EXTENSIONS

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise DatasetError(f"image folder not found: {images_dir}")
    rows = read_poses_csv(poses_csv)
    files = {str(p.relative_to(images_dir)): p for p in images_dir.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = [n for n in rows.names if n not in files]
    extra = sorted(set(files) - set(rows.names))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} CSV rows have no image in {images_dir} "
                         f"(e.g. {', '.join(missing[:3])})")
        if extra:
            parts.append(f"{len(extra)} images have no row in {poses_csv} "
                         f"(e.g. {', '.join(extra[:3])})")
        raise DatasetError("; ".join(parts) + ". Every image needs exactly one pose row.")
    return [MapEntry(name=n, position=rows.positions[i], orientation=rows.orientations[i],
                     stamp_ns=int(rows.stamps_ns[i]), path=files[n], max_pixels=max_pixels)
            for i, n in enumerate(rows.names)]


def benchmark_source(dataset_dir: PathLike, split: str = "database",
                     max_pixels: Optional[int] = None) -> List[MapEntry]:
    """A split of a benchmark-layout dataset (positions from names or poses_<split>.csv)."""
    from ..datasets import read_split

    data = read_split(dataset_dir, split)
    out = []
    for i, p in enumerate(data.paths):
        q = yaw_to_quaternion(data.yaw_deg[i]) if data.yaw_known[i] else (0.0, 0.0, 0.0, 1.0)
        out.append(MapEntry(name=p.name, position=data.positions[i], orientation=np.array(q),
                            stamp_ns=int(data.stamps_ns[i]), path=p, max_pixels=max_pixels))
    return out


@dataclass
class BagSource:
    """Frames of a bag's image topic with poses interpolated at their stamps.

    Poses come from a pose topic in the same bag or from a CSV with time stamps
    (``stamp_ns`` or ``t_s`` seconds, same clock as the image header stamps).  Frames
    without a pose within ``max_gap_s`` are dropped and counted in ``dropped``.
    Iterating raises BagError when the topic has no frames or no frame got a pose.
    """

    bag: Path
    image_topic: str
    pose_topic: Optional[str] = None
    poses_csv: Optional[Path] = None
    max_gap_s: float = MAX_POSE_GAP_S
    frames: int = 0
    dropped: int = 0
    kept: int = 0

    def __post_init__(self):
        self.bag = Path(self.bag)
        if (self.pose_topic is None) == (self.poses_csv is None):
            raise BagError("a bag map needs exactly one pose source: --pose-topic TOPIC or "
                           "--poses CSV (with stamp_ns or t_s)")

    def stats(self) -> dict:
        """What was read (valid after iterating): for the map manifest."""
        return {"type": "rosbag", "bag": str(self.bag), "image_topic": self.image_topic,
                "pose_source": self.pose_topic or str(self.poses_csv),
                "max_pose_gap_s": self.max_gap_s, "frames": self.frames,
                "frames_with_pose": self.kept, "dropped_without_pose": self.dropped}

    def _track(self):
        from ..bags import PoseTrack, read_poses

        if self.pose_topic is not None:
            return read_poses(self.bag, self.pose_topic)
        rows = read_poses_csv(self.poses_csv, need_names=False)
        if (rows.stamps_ns < 0).any():
            raise BagError(f"{self.poses_csv}: every row needs a time stamp (stamp_ns or t_s) "
                           "to be matched to the bag's images")
        return PoseTrack(rows.stamps_ns, rows.positions, rows.orientations)

    def __iter__(self) -> Iterator[MapEntry]:
        from ..bags import read_images

        track = self._track()
        self.frames = self.dropped = self.kept = 0
        for frame in read_images(self.bag, self.image_topic):
            self.frames += 1
            pos, ori, valid = track.interpolate([frame.stamp_ns], self.max_gap_s)
            if not valid[0]:
                self.dropped += 1
                continue
            self.kept += 1
            yield MapEntry(name=f"{self.image_topic}#{frame.index}", position=pos[0],
                           orientation=ori[0], stamp_ns=int(frame.stamp_ns), image=frame.image)
        if self.frames == 0:
            raise BagError(f"image topic {self.image_topic!r} in {self.bag} has no messages")
        if self.kept == 0:
            raise BagError(
                f"none of the {self.frames} frames on {self.image_topic!r} has a pose within "
                f"{self.max_gap_s} s (pose source: {self.pose_topic or self.poses_csv}); check "
                "that image and pose stamps use the same clock, or raise --max-pose-gap")
        if self.dropped:
            log.warning("%d of %d frames had no pose within %.3f s and were dropped",
                        self.dropped, self.frames, self.max_gap_s)


def select_keyframes(entries: Iterable[MapEntry], min_distance: float = 0.0,
                     min_interval: float = 0.0) -> Iterator[MapEntry]:
    """Keep an entry when it is at least ``min_distance`` m and ``min_interval`` s after
    the last kept one (the first is always kept; unknown stamps never block)."""
    last: Optional[MapEntry] = None
    for e in entries:
        if last is not None:
            if min_distance > 0 and np.linalg.norm(
                    np.asarray(e.position) - np.asarray(last.position)) < min_distance:
                continue
            if (min_interval > 0 and e.stamp_ns >= 0 and last.stamp_ns >= 0
                    and (e.stamp_ns - last.stamp_ns) < min_interval * 1e9):
                continue
        last = e
        yield e
