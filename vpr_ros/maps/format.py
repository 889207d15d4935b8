"""The map directory: manifest, places table, descriptor files, checksums.

A map is a folder (no pickle anywhere)::

    MAP/manifest.json        format version, model, index, counts, sha256 of every other file
    MAP/places.csv           one row per place, readable by people and spreadsheets
    MAP/poses.npy            (N, 7) float64 x, y, z, qx, qy, qz, qw (the compact copy used to load)
    MAP/stamps.npy           (N,) int64 nanoseconds, -1 when unknown
    MAP/descriptors.npy      (N, D) float32 or float16, unit L2, memory-mappable
    MAP/index.faiss          faiss.write_index of the search index
    MAP/local_features.npy   (N, H, W, C) float16 (or int8 codes), only with re-ranking
                             (the card's local_shape: 61 x 61 x 128 for SelaVPR ViT-L)
    MAP/local_scales.npy     (N, H, W) float16 per-point scales, only with int8 storage

See docs/maps.md for every manifest field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import MapError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PLACES_CSV = "places.csv"
POSES_NPY = "poses.npy"
STAMPS_NPY = "stamps.npy"
DESCRIPTORS_NPY = "descriptors.npy"
INDEX_FAISS = "index.faiss"
LOCAL_FEATURES_NPY = "local_features.npy"
LOCAL_SCALES_NPY = "local_scales.npy"

PLACE_COLUMNS = ("place_id", "image_name", "x", "y", "z", "qx", "qy", "qz", "qw",
                 "stamp_ns", "frame_id")

PathLike = Union[str, os.PathLike]


@dataclass
class PlaceTable:
    """The places of a map, in index order (row i = FAISS id i)."""

    ids: np.ndarray                    # (N,) int64, unique
    names: List[str]                   # (N,) image names (file name or bag topic#index)
    positions: np.ndarray              # (N, 3) float64 x, y, z in frame_id
    orientations: np.ndarray           # (N, 4) float64 qx, qy, qz, qw
    stamps: np.ndarray                 # (N,) int64 ns, -1 unknown
    frame_id: str = "map"

    def __post_init__(self):
        n = len(self.ids)
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(n)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(n, 3)
        self.orientations = np.asarray(self.orientations, dtype=np.float64).reshape(n, 4)
        self.stamps = np.asarray(self.stamps, dtype=np.int64).reshape(n)
        self.names = list(self.names)
        if len(self.names) != n:
            raise MapError(f"places table: {n} ids but {len(self.names)} names")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, frame_id: str = "map") -> "PlaceTable":
        return cls(np.zeros(0, np.int64), [], np.zeros((0, 3)), np.zeros((0, 4)),
                   np.zeros(0, np.int64), frame_id)

    def concat(self, other: "PlaceTable") -> "PlaceTable":
        if len(self) and len(other) and other.frame_id != self.frame_id:
            raise MapError(f"cannot join places in frame {other.frame_id!r} to a map in "
                           f"frame {self.frame_id!r}")
        return PlaceTable(np.r_[self.ids, other.ids], self.names + other.names,
                          np.vstack([self.positions, other.positions]),
                          np.vstack([self.orientations, other.orientations]),
                          np.r_[self.stamps, other.stamps], self.frame_id)

    def write(self, folder: Path) -> None:
        """Write places.csv, poses.npy and stamps.npy into ``folder`` (a fresh build folder)."""
        folder = Path(folder)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(PLACE_COLUMNS)
        for i in range(len(self)):
            p, q = self.positions[i], self.orientations[i]
            writer.writerow([int(self.ids[i]), self.names[i],
                             *(repr(float(v)) for v in p), *(repr(float(v)) for v in q),
                             int(self.stamps[i]), self.frame_id])
        (folder / PLACES_CSV).write_text(buf.getvalue(), encoding="utf-8")
        np.save(folder / POSES_NPY, np.hstack([self.positions, self.orientations]))
        np.save(folder / STAMPS_NPY, self.stamps)

    @classmethod
    def read(cls, folder: Path) -> "PlaceTable":
        folder = Path(folder)
        ids, names, frame_ids = [], [], set()
        csv_path = folder / PLACES_CSV
        try:
            with open(csv_path, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None or tuple(header) != PLACE_COLUMNS:
                    raise MapError(f"map {folder}: {PLACES_CSV} is corrupt (unexpected header "
                                   f"{header}); {REBUILD}")
                for row in reader:
                    ids.append(int(row[0]))
                    names.append(row[1])
                    frame_ids.add(row[10])
        except FileNotFoundError:
            raise MapError(f"map {folder} is incomplete: {PLACES_CSV} is missing; "
                           f"{REBUILD}") from None
        except (ValueError, IndexError, UnicodeDecodeError, csv.Error) as exc:
            raise MapError(f"map {folder}: {PLACES_CSV} is corrupt ({one_line(exc)}); "
                           f"{REBUILD}") from None
        poses = np.array(load_npy(folder, POSES_NPY))
        stamps = np.array(load_npy(folder, STAMPS_NPY))
        if poses.shape != (len(ids), 7) or stamps.shape != (len(ids),):
            raise MapError(f"map {folder}: places.csv has {len(ids)} rows but poses.npy "
                           f"{poses.shape} / stamps.npy {stamps.shape}; {REBUILD}")
        frame_id = frame_ids.pop() if len(frame_ids) == 1 else "map"
        return cls(np.array(ids, np.int64), names, poses[:, :3], poses[:, 3:], stamps, frame_id)


REBUILD = "rebuild the map with `vpr map build`"


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and its message with whitespace squeezed."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_npy(folder: PathLike, name: str, mmap_mode: Optional[str] = "r") -> np.ndarray:
    """Open a map's .npy file (memory-mapped by default), never pickles.

    Any failure, including a corrupt header (which numpy reports as SyntaxError,
    tokenize.TokenError, ValueError, ...), becomes one MapError naming the file.  A header
    claiming more data than the file holds is caught by the memory map before anything
    is allocated.
    """
    folder = Path(folder)
    try:
        return np.load(folder / name, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise MapError(f"map {folder} is incomplete: {name} is missing; {REBUILD}") from None
    except (IsADirectoryError, PermissionError) as exc:    # a folder; unreadable
        raise MapError(f"map {folder}: {name} {_unreadable(exc)}; {REBUILD}") from None
    except Exception as exc:      # numpy's header parser raises many unrelated types
        raise MapError(f"map {folder}: {name} is corrupt ({one_line(exc)}); {REBUILD}") from None


def _unreadable(exc: OSError) -> str:
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


def _sha256_of_map_file(folder: Path, name: str) -> str:
    try:
        return sha256_file(folder / name)
    except OSError as exc:
        raise MapError(f"map {folder}: {name} {_unreadable(exc)}; {REBUILD}") from None


# --------------------------------------------------------------------------- checksums

def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return "sha256:" + h.hexdigest()


def file_checksums(folder: Path) -> Dict[str, dict]:
    """sha256 and size of every file in ``folder`` except the manifest."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and p.name != MANIFEST:
            out[p.name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def verify_files(folder: Path, files: Dict[str, dict], mode: str = "full") -> None:
    """Check the map's files against the manifest; MapError naming the first bad file.

    ``mode``: "full" hashes every file (sha256), "size" only compares sizes (fast for
    huge maps, catches truncation but not bit flips), "none" skips the check.
    """
    if mode == "none":
        return
    if mode not in ("full", "size"):
        raise ValueError(f"verify mode must be full, size or none, got {mode!r}")
    folder = Path(folder)
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            if path.exists():
                what = "is a folder, not a file" if path.is_dir() else "is not a regular file"
                raise MapError(f"map {folder}: {name} {what}; {REBUILD}")
            raise MapError(f"map {folder} is incomplete: {name} is missing; {REBUILD}")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise MapError(f"map {folder}: {name} is corrupt (size {size} bytes, manifest says "
                           f"{info['bytes']}); rebuild the map with `vpr map build`")
        if mode == "full" and _sha256_of_map_file(folder, name) != info["sha256"]:
            raise MapError(f"map {folder}: {name} is corrupt (sha256 does not match the "
                           "manifest); rebuild the map with `vpr map build`")


def read_manifest(folder: PathLike) -> dict:
    from ..atomic import recover

    folder = Path(folder)
    if not folder.is_dir() and not recover(folder):      # a killed two-rename swap
        raise MapError(f"map folder not found: {folder} (build one with `vpr map build`)")
    if not folder.is_dir():
        raise MapError(f"map path {folder} is not a folder; pass the folder `vpr map build` wrote")
    path = folder / MANIFEST
    if not path.is_file():
        raise MapError(f"{folder} is not a vpr_ros map: {MANIFEST} is missing; {REBUILD}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:   # JSONDecodeError and UnicodeDecodeError included
        raise MapError(f"map {folder}: {MANIFEST} is corrupt ({one_line(exc)}); "
                       f"{REBUILD}") from None
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        raise MapError(f"map {folder}: {MANIFEST} is corrupt (no format_version); {REBUILD}")
    files = manifest.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int)
            and isinstance(v.get("sha256"), str) for v in files.values())):
        raise MapError(f"map {folder}: {MANIFEST} is corrupt (bad files section); {REBUILD}")
    return manifest


# --------------------------------------------------------------------------- streaming .npy

_HEADER_BYTES = 256   # fixed header size so the shape can be rewritten in place


def _npy_header(dtype: np.dtype, shape: Tuple[int, ...]) -> bytes:
    body = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(np.dtype(dtype)), tuple(int(s) for s in shape))
    prefix = b"\x93NUMPY\x01\x00"
    room = _HEADER_BYTES - len(prefix) - 2
    text = body.ljust(room - 1) + "\n"
    if len(text) != room:
        raise ValueError(f"npy header too long for shape {shape}")
    return prefix + room.to_bytes(2, "little") + text.encode("latin1")


class NpyAppender:
    """Write an .npy file row block by row block, not knowing the row count up front.

    The file gets a fixed-size header, rows are appended, and ``close`` rewrites the
    header with the final count; np.load / mmap_mode="r" read the result as usual.
    """

    def __init__(self, path: PathLike, dtype, row_shape: Sequence[int]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.rows = 0
        self._fh: Optional[BinaryIO] = open(self.path, "wb")
        self._fh.write(_npy_header(self.dtype, (0,) + self.row_shape))

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise MapError(f"{self.path.name}: row shape {block.shape[1:]} differs from "
                           f"{self.row_shape}")
        self._fh.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, (self.rows,) + self.row_shape))
        self._fh.close()
        self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def yaw_to_quaternion(yaw_deg: float) -> Tuple[float, float, float, float]:
    """Heading about +z (degrees) -> quaternion (qx, qy, qz, qw)."""
    half = math.radians(yaw_deg) / 2.0
    return 0.0, 0.0, math.sin(half), math.cos(half)


def usual_permissions(folder: Path) -> None:
    """Temporary files/folders are created private (0600/0700); give the finished map the
    permissions of a normal file under the user's umask, so other users (a ROS node
    running as another user) can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)
