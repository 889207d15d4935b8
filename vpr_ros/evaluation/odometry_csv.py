"""Odometry given as a file, for evaluating the stream localizer with odometry.

A CSV with a header and one row per odometry sample::

    filename,x,y[,z]        # the odometry position when that query image was taken
    t_s,x,y[,z]             # or: a time stamp (seconds, the queries' poses CSV clock)

``x, y, z`` are metres in any fixed odometry frame (only travelled distances are used, so
the frame need not be aligned with the map).  This is the robot's own odometry, never
ground truth: the evaluator scores with the dataset's query positions and keeps the two
apart.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import List, Sequence

import numpy as np

from ..errors import DatasetError


def read_odometry_csv(path) -> dict:
    """{"key": "filename"|"t_s", "keys": [...], "positions": (M, 3)}; DatasetError if malformed."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"odometry file not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise DatasetError(f"odometry file {path} is not UTF-8 text (expected a CSV with columns "
                           "filename|t_s, x, y[, z])") from None
    except csv.Error as exc:
        raise DatasetError(f"odometry file {path}: {exc}") from None
    if not rows:
        raise DatasetError(f"odometry file {path} has no rows")
    cols = set(rows[0].keys())
    if not {"x", "y"} <= cols or not ({"filename", "t_s"} & cols):
        raise DatasetError(f"odometry file {path}: needs columns x, y and filename or t_s "
                           f"(has {sorted(c for c in cols if c)})")
    key = "filename" if "filename" in cols else "t_s"
    keys: List = []
    pos = np.zeros((len(rows), 3))
    for i, r in enumerate(rows):
        try:
            pos[i] = [float(r["x"]), float(r["y"]), float(r.get("z") or 0.0)]
            keys.append(r["filename"] if key == "filename" else float(r["t_s"]))
        except (TypeError, ValueError):
            raise DatasetError(f"odometry file {path} row {i + 2}: bad number") from None
        if key == "t_s" and not math.isfinite(keys[-1]):
            raise DatasetError(f"odometry file {path} row {i + 2}: non-finite t_s")
    return {"key": key, "keys": keys, "positions": pos, "path": str(path)}


def align_odometry(table: dict, names: Sequence[str], stamps_ns: np.ndarray) -> np.ndarray:
    """(Q, 3) odometry positions at the queries; NaN rows where the file has none."""
    q = len(names)
    out = np.full((q, 3), np.nan)
    if table["key"] == "filename":
        by_name = {n: i for i, n in enumerate(table["keys"])}
        for j, n in enumerate(names):
            i = by_name.get(Path(n).name)
            if i is not None:
                out[j] = table["positions"][i]
    else:
        t = np.asarray(table["keys"], dtype=np.float64)
        order = np.argsort(t)
        t, p = t[order], table["positions"][order]
        st = np.asarray(stamps_ns, dtype=np.float64) * 1e-9
        if (np.asarray(stamps_ns) < 0).any():
            raise DatasetError(f"odometry file {table['path']} is keyed by t_s, but the queries "
                               "have no time stamps (give a poses CSV with t_s, or key the "
                               "odometry by filename)")
        inside = (st >= t[0]) & (st <= t[-1])
        for axis in range(3):
            out[inside, axis] = np.interp(st[inside], t, p[:, axis])
    if np.isnan(out).all():
        raise DatasetError(f"odometry file {table['path']} matches none of the {q} queries")
    return out
