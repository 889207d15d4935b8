"""Benchmark dataset layout reader (the layout of gmberton's VPR datasets).

::

    DATASET/images/test/database/@east@north@...@.jpg
    DATASET/images/test/queries/@east@north@...@.jpg
    DATASET/poses_database.csv   (optional)
    DATASET/poses_queries.csv    (optional)

Positions come from the file names: fields 1 and 2 of the ``@``-separated name are UTM
east and north in metres.  When ``poses_<split>.csv`` exists (columns ``filename,
east_m, north_m`` and optionally ``yaw_deg``, ``t_s``, ``seq``), it gives the image
order (driving order, by ``seq`` or row order), heading and time stamps; its positions
must agree with the names.  Without the CSV, images are in name order and have no stamps.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from .errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLITS = ("database", "queries")


def utm_from_name(name: str) -> tuple:
    """``@east@north@...`` file name -> (east, north) in metres; DatasetError if malformed."""
    parts = Path(name).name.split("@")
    if len(parts) < 3:
        raise DatasetError(
            f"image name {name!r} does not follow the benchmark pattern '@east@north@...'; "
            "use --images DIR --poses CSV for folders without positions in their names")
    try:
        east, north = float(parts[1]), float(parts[2])
    except ValueError:
        raise DatasetError(
            f"image name {name!r}: fields 1 and 2 ({parts[1]!r}, {parts[2]!r}) must be UTM "
            "east and north in metres") from None
    if not (math.isfinite(east) and math.isfinite(north)):
        raise DatasetError(f"image name {name!r}: non-finite position")
    return east, north


def list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


@dataclass
class BenchmarkSplit:
    """One split of a benchmark dataset: image paths in order with positions."""

    root: Path
    split: str
    paths: List[Path]
    positions: np.ndarray            # (N, 3) east, north, 0
    yaw_deg: np.ndarray              # (N,) 0 when unknown
    yaw_known: np.ndarray            # (N,) bool
    stamps_ns: np.ndarray            # (N,) int64, -1 when unknown
    from_csv: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def names(self) -> List[str]:
        return [p.name for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)


def split_folder(root: Union[str, Path], split: str) -> Path:
    root = Path(root)
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    folder = root / "images" / "test" / split
    if not folder.is_dir():
        raise DatasetError(
            f"{root} is not in the benchmark layout: missing folder images/test/{split} "
            "(expected DATASET/images/test/{database,queries}/@east@north@...jpg)")
    return folder


def read_split(root: Union[str, Path], split: str = "database",
               use_poses_csv: bool = True) -> BenchmarkSplit:
    """Read one split; DatasetError when the folder, names or poses CSV are malformed."""
    root = Path(root)
    folder = split_folder(root, split)
    files = list_images(folder)
    if not files:
        raise DatasetError(f"no images in {folder}")
    csv_path = root / f"poses_{split}.csv"
    if use_poses_csv and csv_path.is_file():
        return _read_with_csv(root, split, folder, files, csv_path)
    pos = np.zeros((len(files), 3), dtype=np.float64)
    for i, p in enumerate(files):
        pos[i, :2] = utm_from_name(p.name)
    n = len(files)
    return BenchmarkSplit(root, split, files, pos, np.zeros(n), np.zeros(n, dtype=bool),
                          np.full(n, -1, dtype=np.int64))


def read_csv_dicts(csv_path: Path, what: str = "CSV") -> Tuple[List[str], List[dict]]:
    """(header, rows) of a CSV file; DatasetError (one line naming the file) when it is
    missing, not UTF-8 text (a binary file), or not parseable as CSV (NUL bytes, ...)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h for h in (reader.fieldnames or []) if h is not None]
            return header, list(reader)
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {csv_path}") from None
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{csv_path} is not UTF-8 text (byte {exc.start} cannot be "
                           f"decoded); save the {what} as a UTF-8 CSV file") from None
    except csv.Error as exc:
        raise DatasetError(f"{csv_path} is not a valid CSV file ({exc}); save the {what} as "
                           "a plain-text CSV file") from None


def _read_with_csv(root: Path, split: str, folder: Path, files: List[Path],
                   csv_path: Path) -> BenchmarkSplit:
    _, rows = read_csv_dicts(csv_path, "poses CSV")
    if not rows:
        raise DatasetError(f"{csv_path} has no rows")
    required = {"filename", "east_m", "north_m"}
    missing = required - set(rows[0].keys())
    if missing:
        raise DatasetError(f"{csv_path}: missing columns {sorted(missing)} "
                           f"(has {sorted(rows[0].keys())})")
    if "seq" in rows[0]:
        try:
            rows.sort(key=lambda r: int(r["seq"]))
        except ValueError:
            raise DatasetError(f"{csv_path}: column 'seq' must hold integers") from None
    by_name = {p.name: p for p in files}
    listed = [r["filename"] for r in rows]
    not_found = [n for n in listed if n not in by_name]
    unlisted = sorted(set(by_name) - set(listed))
    if not_found or unlisted:
        raise DatasetError(
            f"{csv_path} and {folder} disagree: {len(not_found)} rows without an image "
            f"(e.g. {not_found[:3]}), {len(unlisted)} images without a row (e.g. {unlisted[:3]})")
    n = len(rows)
    pos = np.zeros((n, 3), dtype=np.float64)
    yaw = np.zeros(n)
    yaw_known = np.zeros(n, dtype=bool)
    stamps = np.full(n, -1, dtype=np.int64)
    for i, r in enumerate(rows):
        try:
            pos[i, 0] = float(r["east_m"])
            pos[i, 1] = float(r["north_m"])
            if r.get("yaw_deg") not in (None, ""):
                yaw[i] = float(r["yaw_deg"])
                yaw_known[i] = str(r.get("yaw_known", "1")).strip() not in ("0", "false", "False")
            if r.get("t_s") not in (None, ""):
                stamps[i] = int(round(float(r["t_s"]) * 1e9))
        except ValueError as exc:
            raise DatasetError(f"{csv_path} row {i + 2}: bad number ({exc})") from None
        east, north = utm_from_name(r["filename"])
        if abs(east - pos[i, 0]) > 0.01 or abs(north - pos[i, 1]) > 0.01:
            raise DatasetError(
                f"{csv_path} row {i + 2}: position ({pos[i, 0]}, {pos[i, 1]}) disagrees with the "
                f"file name {r['filename']!r} ({east}, {north})")
    return BenchmarkSplit(root, split, [by_name[name] for name in listed], pos, yaw, yaw_known,
                          stamps, from_csv=True)


def read_ground_truth(root: Union[str, Path]) -> Optional[dict]:
    """``ground_truth.csv`` (query -> positives by name), or None when absent."""
    path = Path(root) / "ground_truth.csv"
    if not path.is_file():
        return None
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            positives = row.get("positives_within_25m", "")
            out[row["query"]] = [p for p in positives.split(";") if p]
    return out
