"""Messages the localizer node publishes besides ~/matches: RViz markers, /initialpose, and
the numbers they are made of (covariance, place spacing, score colours).

The functions that build messages import message packages (this is the ROS layer); the
arithmetic ones (``covariance_from_confidence``, ``place_spacing``, ``score_colour``) are
plain numpy and tested without DDS.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, PoseWithCovarianceStamped
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from .conversions import pose_from_arrays

MIN_CONFIDENCE_FOR_COVARIANCE = 0.05
# Nav2/AMCL read x, y and yaw of the initial pose; the place spacing below this is noise
MIN_SPACING_M = 0.5
SPACING_SAMPLE = 5000

# marker namespaces on ~/markers and ~/map_markers
NS_PLACES = "places"
NS_CANDIDATES = "candidates"
NS_BEST = "best"
NS_LABEL = "label"
CONFIDENT_RGBA = (0.1, 0.85, 0.2, 1.0)       # green: confident best place (pose published)
UNSURE_RGBA = (1.0, 0.55, 0.0, 1.0)          # orange: best place, not confident
PLACES_RGBA = (0.6, 0.6, 0.6, 0.6)           # grey: the map's places


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


def place_spacing(positions: np.ndarray, seed: int = 0) -> float:
    """The map's place spacing (vpr_ros.route.place_spacing), at least MIN_SPACING_M: the
    scale of markers and of the /initialpose covariance."""
    from ..route import place_spacing as spacing

    return spacing(positions, minimum=MIN_SPACING_M, sample=SPACING_SAMPLE, seed=seed)


def score_colour(scores: Sequence[float]) -> np.ndarray:
    """(N, 4) RGBA: the best score of the list red-free green, the worst red, linear between
    (non-finite scores are the worst)."""
    s = np.asarray([float(v) if v is not None else np.nan for v in scores], dtype=np.float64)
    if not len(s):
        return np.zeros((0, 4))
    finite = np.isfinite(s)
    lo = s[finite].min() if finite.any() else 0.0
    hi = s[finite].max() if finite.any() else 1.0
    t = np.where(finite, (s - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
    return np.stack([1.0 - t, t, np.full_like(t, 0.15), np.full_like(t, 0.9)], axis=1)


def _rgba(c) -> ColorRGBA:
    return ColorRGBA(r=float(c[0]), g=float(c[1]), b=float(c[2]), a=float(c[3]))


def _point(p) -> Point:
    p = [float(v) if np.isfinite(v) else 0.0 for v in p]
    return Point(x=p[0], y=p[1], z=p[2])


def initialpose_msg(header: Header, position, orientation, confidence: float, spacing_m: float,
                    orientation_sigma_rad: float) -> PoseWithCovarianceStamped:
    """geometry_msgs/PoseWithCovarianceStamped for /initialpose (Nav2 AMCL): the position
    std-dev is the map's place spacing divided by the confidence."""
    msg = PoseWithCovarianceStamped(header=header)
    msg.pose.pose = pose_from_arrays(position, orientation)
    msg.pose.covariance = covariance_from_confidence(confidence, spacing_m, orientation_sigma_rad)
    return msg


def map_markers(header: Header, positions: np.ndarray, max_places: int,
                scale_m: float) -> MarkerArray:
    """The map's places as one POINTS marker (evenly subsampled to ``max_places``)."""
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(pos) > max_places:
        pos = pos[np.linspace(0, len(pos) - 1, max_places).round().astype(int)]
    clear = Marker(header=header, action=Marker.DELETEALL)
    m = Marker(header=header, ns=NS_PLACES, id=0, type=Marker.POINTS, action=Marker.ADD)
    m.pose.orientation.w = 1.0
    m.scale.x = m.scale.y = float(scale_m)
    m.color = _rgba(PLACES_RGBA)
    m.points = [_point(p) for p in pos]
    return MarkerArray(markers=[clear, m])


def match_markers(header: Header, camera_index: int, best_position, confident: bool,
                  label: str, candidate_positions: Sequence, candidate_scores: Sequence[float],
                  scale_m: float, lifetime_s: float = 0.0) -> MarkerArray:
    """Best place (sphere: green confident, orange not) with a text label, and the
    candidates (sphere list coloured by score). Marker ids are per camera, so several
    cameras do not overwrite each other."""
    life = Duration(sec=int(lifetime_s), nanosec=int((lifetime_s % 1.0) * 1e9))
    best = Marker(header=header, ns=NS_BEST, id=camera_index, type=Marker.SPHERE,
                  action=Marker.ADD, lifetime=life)
    best.pose = pose_from_arrays(best_position, (0.0, 0.0, 0.0, 1.0))
    best.scale.x = best.scale.y = best.scale.z = 2.0 * float(scale_m)
    best.color = _rgba(CONFIDENT_RGBA if confident else UNSURE_RGBA)
    text = Marker(header=header, ns=NS_LABEL, id=camera_index, type=Marker.TEXT_VIEW_FACING,
                  action=Marker.ADD, lifetime=life, text=label)
    text.pose = pose_from_arrays(np.asarray(best_position, dtype=np.float64)
                                 + np.array([0.0, 0.0, 3.0 * scale_m]), (0.0, 0.0, 0.0, 1.0))
    text.scale.z = 1.5 * float(scale_m)
    text.color = _rgba((1.0, 1.0, 1.0, 1.0))
    cands = Marker(header=header, ns=NS_CANDIDATES, id=camera_index, type=Marker.SPHERE_LIST,
                   action=Marker.ADD, lifetime=life)
    cands.pose.orientation.w = 1.0
    cands.scale.x = cands.scale.y = cands.scale.z = float(scale_m)
    cands.points = [_point(p) for p in candidate_positions]
    cands.colors = [_rgba(c) for c in score_colour(candidate_scores)]
    return MarkerArray(markers=[best, text, cands])


def marker_scale(spacing_m: Optional[float]) -> float:
    """Marker size: a third of the place spacing, at least 0.2 m."""
    return max(0.2, (spacing_m or 1.0) / 3.0)
