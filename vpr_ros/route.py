"""The route structure of a map: which places follow which, taken from positions and build order.

A stream localizer needs to know, for a place, which places the camera can reach next and how
far *along the route* each of them lies.  :class:`RouteGraph` answers that from the map's place
positions (REP-105 ``map``-frame metres) and, when the map was built from a drive, from its
build order (place index order, the order ``vpr map build`` wrote them in).  It never looks at
file names.

* **Spacing** ``spacing_m``: the typical distance between neighbouring places
  (:func:`place_spacing`: median distance to the nearest other place).
* **Drive order.**  When consecutive places in build order are close (their median distance is
  at most ``drive_factor`` times the spacing), the map is a drive: each place gets a unit
  tangent ``(p[i+1] - p[i-1])`` and motion gets a direction (with or against the build order).
  Otherwise (a map of separate images, or shuffled) motion is undirected.
* **Route coordinate** (drives only): the distance along the build order, with gaps where the
  map skipped places (a tunnel or a stop dropped from both map and query stream) counted as one
  spacing and jumps of more than ``break_factor`` spacings cut (two drives in one map).  Motion
  along the route is measured in it, so a gap in the map never strands a hypothesis.
* **Neighbours** come from the sorted route coordinate (drives) or a KD-tree (other maps), so
  memory per place is a few dozen bytes and a query costs in proportion to the places returned.

ROS-free, numpy + scipy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


def place_spacing(positions, minimum: float = 1e-3, sample: int = 5000, seed: int = 0,
                  tree=None) -> float:
    """Median distance (m) from a place to its nearest other place, at least ``minimum``
    (also for maps of fewer than two distinct places).  At most ``sample`` places are
    queried (against all of them), so a 1M-place map costs as little as a 5000-place one."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    pos = pos[np.all(np.isfinite(pos), axis=1)]
    if len(pos) < 2:
        return float(minimum)
    tree = cKDTree(pos) if tree is None else tree
    if len(pos) > sample:
        pos = pos[np.random.default_rng(seed).choice(len(pos), sample, replace=False)]
    nearest = tree.query(pos, k=2)[0][:, 1]
    nearest = nearest[nearest > 1e-9]
    return max(float(np.median(nearest)), float(minimum)) if len(nearest) else float(minimum)


@dataclass
class RouteGraph:
    positions: np.ndarray         # (N, 3) float64
    spacing_m: float              # typical distance between neighbouring places
    directed: bool                # True when build order follows a drive
    tangents: np.ndarray          # (N, 3) unit along-route directions (zeros when undirected)
    coordinate: np.ndarray = None  # (N,) distance along the build order (drives), else None

    @classmethod
    def from_positions(cls, positions, drive_factor: float = 3.0, gap_factor: float = 1.5,
                       break_factor: float = 10.0) -> "RouteGraph":
        from scipy.spatial import cKDTree

        p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if len(p) == 0:
            raise ValueError("a route needs at least one place")
        if not np.isfinite(p).all():
            raise ValueError("place positions must be finite")
        n = len(p)
        tree = cKDTree(p)
        spacing = place_spacing(p, tree=tree)
        tangents = np.zeros_like(p)
        directed = False
        if n >= 3:
            steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
            if float(np.median(steps)) <= drive_factor * spacing:
                directed = True
                fwd = np.empty_like(p)
                fwd[1:-1] = p[2:] - p[:-2]
                fwd[0] = p[1] - p[0]
                fwd[-1] = p[-1] - p[-2]
                norm = np.linalg.norm(fwd, axis=1, keepdims=True)
                ok = norm[:, 0] > 1e-9
                tangents[ok] = fwd[ok] / norm[ok]
        coordinate = None
        if directed:
            steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
            du = np.where(steps <= gap_factor * spacing, steps,
                          np.where(steps <= break_factor * spacing, spacing, 1e9))
            coordinate = np.r_[0.0, np.cumsum(du)]
        graph = cls(p, spacing, directed, tangents, coordinate)
        graph._tree = tree
        return graph

    def __len__(self) -> int:
        return len(self.positions)

    def within(self, centres: np.ndarray, radius_m: float) -> Tuple[np.ndarray, np.ndarray]:
        """Pairs (k, j): place j lies within ``radius_m`` of centres[k]; arrays of equal length."""
        centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
        if len(centres) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lists = self._tree.query_ball_point(centres, r=float(radius_m))
        counts = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        src = np.repeat(np.arange(len(centres)), counts)
        dst = (np.concatenate([np.asarray(x, dtype=np.int64) for x in lists])
               if counts.sum() else np.zeros(0, np.int64))
        return src, dst

    def along_route(self, places: np.ndarray, directions: np.ndarray, low: np.ndarray,
                    high: np.ndarray):
        """Pairs (k, j, offset) for drives: place j lies between ``low[k]`` and ``high[k]`` metres
        along the route from places[k] in directions[k] (+1 with the build order, -1 against);
        ``offset`` is that signed distance (positive = in the direction of travel)."""
        u = self.coordinate
        u0 = u[places]
        d = directions.astype(np.float64)
        a = np.where(d >= 0, u0 + low, u0 - high)
        b = np.where(d >= 0, u0 + high, u0 - low)
        lo = np.searchsorted(u, a, side="left")
        hi = np.searchsorted(u, b, side="right")
        counts = np.maximum(hi - lo, 0)
        src = np.repeat(np.arange(len(places)), counts)
        if len(src) == 0:
            return src, np.zeros(0, np.int64), np.zeros(0)
        starts = np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts)
        dst = np.arange(len(src)) + starts
        offset = (u[dst] - u0[src]) * d[src]
        return src, dst.astype(np.int64), offset

    def offsets(self, src_places: np.ndarray, dst_places: np.ndarray):
        """(along, across) metres from each src place to its dst place.

        ``along`` is the signed offset along the src place's tangent (0 when undirected);
        ``across`` the distance off that line (the full distance when undirected).
        """
        d = self.positions[dst_places] - self.positions[src_places]
        if not self.directed:
            return np.zeros(len(d)), np.linalg.norm(d, axis=1)
        along = np.einsum("ij,ij->i", d, self.tangents[src_places])
        across = np.sqrt(np.maximum(np.einsum("ij,ij->i", d, d) - along ** 2, 0.0))
        return along, across

    def nearby(self, place: int, radius_m: float) -> np.ndarray:
        return np.asarray(self._tree.query_ball_point(self.positions[place], r=radius_m),
                          dtype=np.int64)
