"""Stream localization: sequence evidence over the camera stream, with a calibrated confidence.

Single images are ambiguous; a camera stream is not.  :class:`StreamLocalizer` takes each
frame's retrieval result (the top candidates of the FAISS search, optionally re-ranked) and
keeps a belief over where along the map's route the camera is.  It is causal (only frames up
to now), online, and its cost per frame grows with the number of candidates and tracked
hypotheses, never with the size of the map.

Model (docs/evaluation.md gives the measured comparison that chose it):

* **State.**  A sparse set of hypotheses ``(place, direction)`` (direction along or against
  the map's build order when the map is a drive, see :mod:`vpr_ros.route`) plus one "rest"
  mass: the probability of being anywhere else, spread uniformly over the map.
* **Motion** (prediction).  Without odometry, the camera moves between ``-back_step`` and
  ``max_step`` place spacings along its direction per frame (a flat prior: stops, crawling
  and speed-ups cost nothing), reverses with ``reverse_prob`` and teleports (kidnap) with
  ``kidnap_prob``.  With odometry, the step is the distance the odometry travelled between
  the two frames' stamps, with a relative error of ``odometry_sigma``.
* **Observation.**  The frame's similarities are z-scored against a fixed random sample of
  map places (as SeqSLAM normalises each frame), and a place's likelihood is
  ``exp(beta * z)``.  Tracked places that are not candidates get their exact similarity
  from the map's descriptors; the rest mass gets the mean likelihood of the sampled places
  below the weakest candidate.  Re-ranking scores, when present, add their own z-score.
* **Does the prior fit?**  The stream model is compared online with the "independent
  frames" model (single-frame retrieval): a running, forgetting log Bayes factor of their
  one-step predictive likelihoods.  The answer is the place with the most mass within
  ``radius_m`` under the two models mixed by that factor, so unordered images or a kidnap
  fall back to single-frame answers instead of being dragged along a wrong route.
* **Confidence.**  The mixed mass near the answer, calibrated by logistic regression on
  data with ground truth (``vpr eval recall`` / ``vpr eval bag`` fit it and store it in the
  map manifest under ``stream_calibration``, with the threshold that reaches the target
  precision).  ``confident`` means "at or above that threshold"; ``localized`` is the
  same state, held while frames keep it.  Degenerate frames (see
  :mod:`vpr_ros.image_quality`) only predict: they are never evidence and never confident.

ROS-free; numpy + scipy.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Deque, Dict, Optional, Tuple

import numpy as np

from .errors import ConfigError
from .route import RouteGraph

log = logging.getLogger(__name__)

METHOD = "sparse-hmm"

DEFAULT_CALIBRATION = {"model": "logistic", "bias": -6.0, "w_mass": 1.0, "w_fit": 0.0,
                       "threshold": 0.5, "target_precision": 0.99, "fitted": False}


@dataclass(frozen=True)
class StreamConfig:
    """Settings of the stream localizer (node parameters ``stream_*``, CLI ``--stream-*``)."""

    candidates: int = 50              # retrieval candidates used as evidence per frame
    max_hypotheses: int = 500         # tracked (place, direction, speed) states kept per frame
    speeds: Tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0)  # place spacings per frame
    speed_change_prob: float = 0.1    # chance per frame of moving to a neighbouring speed class
    step_sigma: float = 0.3           # spread of one step in place spacings (+ 15 % of the step)
    max_speed_mps: float = 0.0        # > 0 with stamps: bound the step by speed * dt as well
    reverse_prob: float = 0.02        # chance per frame that the camera turns around
    kidnap_prob: float = 0.02         # chance per frame of a jump anywhere (robot carried away)
    beta: float = 1.0                 # observation sharpness on z-scored similarity
    rerank_weight: float = 1.0        # weight of the re-ranking z-score next to the global one
    fit_memory: float = 0.8           # forgetting factor of the prior-fit log Bayes factor
    fit_margin: float = 1.0           # log Bayes factor above which the stream answers
    normaliser_samples: int = 256     # map places sampled to z-score each frame
    radius_m: float = 25.0            # an answer is right within this distance (confidence mass)
    still_cosine: float = 0.995       # a frame this alike the last one is a stop, not evidence
    odometry_sigma: float = 0.25      # relative error of the odometry's travelled distance
    odometry_max_gap_s: float = 2.0   # odometry older than this around a frame is stale
    odometry_max_speed_mps: float = 100.0  # faster odometry jumps are rejected
    seed: int = 0

    def validate(self) -> "StreamConfig":
        def need(ok, what):
            if not ok:
                raise ConfigError(f"stream setting {what}")

        need(self.candidates >= 1, f"candidates must be >= 1, got {self.candidates}")
        need(self.max_hypotheses >= 1, f"max_hypotheses must be >= 1, got {self.max_hypotheses}")
        need(len(self.speeds) >= 1 and all(v >= 0 and math.isfinite(v) for v in self.speeds)
             and list(self.speeds) == sorted(set(self.speeds)),
             f"speeds must be distinct, increasing and >= 0, got {self.speeds}")
        need(0 <= self.speed_change_prob < 1,
             f"speed_change_prob must be in [0, 1), got {self.speed_change_prob}")
        need(self.step_sigma > 0, f"step_sigma must be > 0, got {self.step_sigma}")
        need(self.max_speed_mps >= 0, f"max_speed_mps must be >= 0, got {self.max_speed_mps}")
        need(0 <= self.reverse_prob < 1, f"reverse_prob must be in [0, 1), got {self.reverse_prob}")
        need(0 < self.kidnap_prob < 1, f"kidnap_prob must be in (0, 1), got {self.kidnap_prob}")
        need(self.beta > 0, f"beta must be > 0, got {self.beta}")
        need(self.rerank_weight >= 0, f"rerank_weight must be >= 0, got {self.rerank_weight}")
        need(0 <= self.fit_memory < 1, f"fit_memory must be in [0, 1), got {self.fit_memory}")
        need(self.normaliser_samples >= 8,
             f"normaliser_samples must be >= 8, got {self.normaliser_samples}")
        need(self.radius_m > 0, f"radius_m must be > 0, got {self.radius_m}")
        need(0 < self.still_cosine <= 1, f"still_cosine must be in (0, 1], got {self.still_cosine}")
        need(self.odometry_sigma > 0, f"odometry_sigma must be > 0, got {self.odometry_sigma}")
        need(self.odometry_max_gap_s > 0,
             f"odometry_max_gap_s must be > 0, got {self.odometry_max_gap_s}")
        return self


@dataclass
class StreamEstimate:
    """One frame's stream answer (also stored as ``LocalizationResult.stream``)."""

    place_index: int
    confidence: float                 # calibrated probability that place_index is right
    raw_confidence: float             # mixed belief mass within radius_m of the answer
    confident: bool                   # confidence >= calibrated threshold
    localized: bool                   # the localized / lost state after this frame
    prior_fit: float                  # log Bayes factor stream vs independent frames (> 0: fits)
    single_frame_index: int           # top-1 of this frame's retrieval
    used_odometry: bool
    degenerate: bool
    hypotheses: int
    method: str = METHOD
    timings_ms: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"place_index": int(self.place_index),
                "confidence": round(float(self.confidence), 6),
                "raw_confidence": round(float(self.raw_confidence), 6),
                "confident": bool(self.confident), "localized": bool(self.localized),
                "prior_fit": round(float(self.prior_fit), 4),
                "single_frame_index": int(self.single_frame_index),
                "used_odometry": bool(self.used_odometry), "degenerate": bool(self.degenerate),
                "hypotheses": int(self.hypotheses), "method": self.method}


def calibrated_confidence(raw, prior_fit, params: Optional[dict] = None,
                          fit_margin: float = StreamConfig.fit_margin):
    """Calibrated probability from the raw mixed mass and the prior-fit factor.

    Zero while the stream prior does not fit (prior fit <= ``fit_margin``): the answer is
    then the frame's own, and a single frame is never what the robot should trust.
    """
    p = params or DEFAULT_CALIBRATION
    raw = np.clip(np.asarray(raw, dtype=np.float64), 1e-12, 1 - 1e-12)
    fit = np.asarray(prior_fit, dtype=np.float64)
    z = (p["bias"] + p["w_mass"] * np.log(raw / (1 - raw))
         + p.get("w_fit", 0.0) * np.clip(fit, -20, 20))
    return np.where(fit > fit_margin, 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60))), 0.0)


def fit_calibration(raw: np.ndarray, prior_fit: np.ndarray, correct: np.ndarray,
                    target_precision: float = 0.99, l2: float = 1e-2,
                    min_each: int = 5, quiet: bool = False,
                    fit_margin: float = StreamConfig.fit_margin) -> dict:
    """Logistic regression of ``correct`` on (logit raw mass, prior fit) plus the threshold.

    The regression uses the frames where the stream prior fits (the others have confidence
    0, see calibrated_confidence).  The threshold is the lowest calibrated confidence whose
    accepted set reaches ``target_precision`` on these data (above every confidence when
    none does, so nothing is published); it is always above 0.  With fewer than
    ``min_each`` right or wrong frames the defaults are kept (and said in the log).
    """
    from scipy.optimize import minimize

    raw = np.clip(np.asarray(raw, np.float64), 1e-12, 1 - 1e-12)
    x_all = np.stack([np.log(raw / (1 - raw)),
                      np.clip(np.asarray(prior_fit, np.float64), -20, 20)], 1)
    y_all = np.asarray(correct, dtype=np.float64)
    use = np.asarray(prior_fit, np.float64) > fit_margin
    x, y = x_all[use], y_all[use]
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < min_each:
        (log.debug if quiet else log.warning)(
            "stream calibration not fitted: %d right and %d wrong frames (need %d of each); "
            "default parameters, threshold set on these frames", n_pos, n_neg, min_each)
        params = dict(DEFAULT_CALIBRATION, target_precision=float(target_precision))
    else:
        mu, sd = x.mean(0), x.std(0)
        sd[sd < 1e-9] = 1.0
        xs = (x - mu) / sd

        def loss(w):
            z = w[0] + xs @ w[1:]
            return (np.logaddexp(0, z) - y * z).mean() + l2 * np.sum(w[1:] ** 2)

        w = minimize(loss, np.zeros(3), method="L-BFGS-B",
                     bounds=[(None, None), (0.0, None), (0.0, None)]).x
        wr = w[1:] / sd
        params = {"model": "logistic", "bias": float(w[0] - np.sum(wr * mu)),
                  "w_mass": float(wr[0]), "w_fit": float(wr[1]), "fitted": True,
                  "fitted_on_frames": int(len(y)), "target_precision": float(target_precision)}
    conf = calibrated_confidence(raw, x_all[:, 1], params, fit_margin)
    threshold = threshold_for_precision(conf, y_all.astype(bool), target_precision)
    params["threshold"] = max(threshold, 1e-9)
    return params


def threshold_for_precision(conf: np.ndarray, correct: np.ndarray, target: float) -> float:
    """Lowest threshold whose accepted frames (conf >= t) reach ``target`` precision."""
    conf = np.asarray(conf, np.float64)
    if len(conf) == 0:
        return 1.0
    order = np.argsort(-conf, kind="stable")
    c, ok = conf[order], np.asarray(correct, bool)[order]
    tp = np.cumsum(ok)
    n = np.arange(1, len(c) + 1)
    # only cut between distinct confidences: equal values are accepted together
    last_of_value = np.r_[c[1:] != c[:-1], True]
    good = (tp / n >= target) & last_of_value
    if not good.any():
        return float(min(1.0, np.nextafter(c[0], np.inf)))
    return float(c[np.flatnonzero(good).max()])


class _OdometryTrack:
    """Recent odometry positions; travelled distance between two stamps."""

    def __init__(self, max_len: int = 4096):
        self.stamps: Deque[int] = collections.deque(maxlen=max_len)
        self.positions: Deque[np.ndarray] = collections.deque(maxlen=max_len)

    def add(self, stamp_ns: int, xyz: np.ndarray) -> None:
        self.stamps.append(int(stamp_ns))
        self.positions.append(xyz)

    def clear(self) -> None:
        self.stamps.clear()
        self.positions.clear()

    def displacement(self, t0: int, t1: int, max_gap_ns: int):
        """(path length, displacement vector) from t0 to t1, or None when not covered."""
        if len(self.stamps) < 1 or t1 < t0:
            return None
        st = np.fromiter(self.stamps, dtype=np.int64, count=len(self.stamps))
        if st[0] - max_gap_ns > t0 or st[-1] + max_gap_ns < t1:
            return None
        pos = np.stack(list(self.positions))
        p0, p1 = self._at(st, pos, t0), self._at(st, pos, t1)
        inner = (st > t0) & (st < t1)
        pts = np.vstack([p0[None], pos[inner], p1[None]])
        if inner.any():
            gaps = np.diff(np.r_[t0, st[inner], t1])
            if gaps.max() > max_gap_ns:
                return None
        elif t1 - t0 > max_gap_ns and not ((st <= t0).any() and (st >= t1).any()):
            return None
        return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum()), p1 - p0

    @staticmethod
    def _at(st, pos, t) -> np.ndarray:
        j = int(np.searchsorted(st, t))
        if j <= 0:
            return pos[0]
        if j >= len(st):
            return pos[-1]
        a = (t - st[j - 1]) / max(st[j] - st[j - 1], 1)
        return pos[j - 1] + a * (pos[j] - pos[j - 1])


class StreamLocalizer:
    """Sequence localization over a stream of retrieval results (see module docstring)."""

    def __init__(self, positions: np.ndarray, descriptors: Optional[np.ndarray] = None,
                 config: Optional[StreamConfig] = None, calibration: Optional[dict] = None):
        self.config = (config or StreamConfig()).validate()
        self.route = RouteGraph.from_positions(positions)
        self.descriptors = descriptors
        self.calibration = dict(calibration) if calibration else dict(DEFAULT_CALIBRATION)
        n = len(self.route)
        self._n = n
        self._ndir = 2 if self.route.directed else 1
        self._nsp = len(self.config.speeds)
        rng = np.random.default_rng(self.config.seed)
        self._sample = None
        if descriptors is not None and len(descriptors) == n:
            k = min(n, self.config.normaliser_samples)
            pick = np.sort(rng.choice(n, size=k, replace=False))
            self._sample = np.ascontiguousarray(np.asarray(descriptors[pick], dtype=np.float32))

        self._places_table = None          # PlaceTable when made with for_map (poses of answers)
        self._odometry = _OdometryTrack()
        self.odometry_rejected = 0
        self.last_odometry_rejection: Optional[str] = None
        self.reset()

    @classmethod
    def for_map(cls, place_map, config: Optional[StreamConfig] = None) -> "StreamLocalizer":
        """A stream localizer over a PlaceMap: route from its places, calibration from the
        manifest's ``stream_calibration``."""
        stream = cls(place_map.places.positions, descriptors=place_map.descriptors, config=config,
                     calibration=place_map.manifest.get("stream_calibration"))
        stream._places_table = place_map.places
        return stream

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the belief: the next frame localizes globally (relocalization)."""
        self._places = np.zeros(0, np.int64)
        self._dirs = np.zeros(0, np.int8)
        self._speeds = np.zeros(0, np.int8)
        self._dt: Optional[float] = None
        self._heading: Optional[np.ndarray] = None
        self._last_descriptor: Optional[np.ndarray] = None
        self._last_iid: Optional[dict] = None
        self._mass = np.zeros(0, np.float64)
        self._rest = 1.0
        self._fit = 0.0
        self._last_stamp: Optional[int] = None
        self._frames = 0
        self.localized = False

    @property
    def threshold(self) -> float:
        return float(self.calibration.get("threshold", DEFAULT_CALIBRATION["threshold"]))

    def add_odometry(self, stamp_ns: int, position) -> bool:
        """Record one odometry position (any fixed odometry frame; only distances are used).

        Returns False and sets ``last_odometry_rejection`` for non-finite values, stamps that
        go backwards, and jumps faster than ``odometry_max_speed_mps`` (the track restarts).
        """
        xyz = np.asarray(position, dtype=np.float64).reshape(-1)[:3]
        reason = None
        if len(xyz) < 2 or not np.isfinite(xyz).all() or stamp_ns is None or stamp_ns < 0:
            reason = "non-finite odometry position or missing stamp"
        elif len(xyz) == 2:
            xyz = np.r_[xyz, 0.0]
        if reason is None and self._odometry.stamps:
            t_last = self._odometry.stamps[-1]
            if stamp_ns <= t_last:
                reason = f"odometry stamp {stamp_ns} not after the previous one {t_last}"
            else:
                dt = (stamp_ns - t_last) * 1e-9
                step = float(np.linalg.norm(xyz - self._odometry.positions[-1]))
                if step > self.config.odometry_max_speed_mps * max(dt, 1e-3):
                    reason = (f"odometry jumped {step:.1f} m in {dt:.3f} s "
                              f"(> {self.config.odometry_max_speed_mps} m/s); track restarted")
                    self._odometry.clear()
                    self._odometry.add(stamp_ns, xyz)
        if reason is not None:
            self.odometry_rejected += 1
            self.last_odometry_rejection = reason
            return False
        self._odometry.add(int(stamp_ns), xyz)
        return True

    # ------------------------------------------------------------------ one frame
    def apply(self, result, est: StreamEstimate):
        """A copy of ``result`` (a LocalizationResult) answering with the stream estimate
        ``est``: the stream's place, pose, similarity and confidence; ``confident`` at the
        calibrated threshold; ``result.stream`` = ``est``; ``single_frame`` and
        ``raw_place_index`` = the frame's own answer.  (``Localizer`` calls observe() with
        all the searched candidates, then this.)"""
        b = est.place_index
        places = self._places_table
        cand = {c.place_index: c for c in result.candidates}
        sim = cand[b].similarity if b in cand else float("nan")
        query = getattr(result, "descriptor", None)
        if b not in cand and self.descriptors is not None and query is not None:
            sim = float(np.dot(np.asarray(self.descriptors[b], np.float32),
                               np.asarray(query, np.float32).ravel()))
        changes = dict(place_index=b, similarity=sim, confidence=est.confidence,
                       confident=est.confident, raw_place_index=result.place_index,
                       temporal=True, stream=est,
                       single_frame={"place_index": int(result.place_index),
                                     "place_id": int(result.place_id),
                                     "confidence": float(result.confidence),
                                     "confident": bool(result.confident)})
        if places is not None:
            changes.update(place_id=int(places.ids[b]), image_name=places.names[b],
                           position=places.positions[b].copy(),
                           orientation=places.orientations[b].copy())
        else:
            changes.update(position=self.route.positions[b].copy())
        out = dataclasses.replace(result, **changes)
        out.timings_ms = dict(result.timings_ms, stream=est.timings_ms.get("stream", 0.0))
        return out

    def observe(self, cand_idx: np.ndarray, cand_sims: np.ndarray,
                descriptor: Optional[np.ndarray] = None, stamp_ns: Optional[int] = None,
                rerank_scores: Optional[np.ndarray] = None,
                degenerate: bool = False) -> StreamEstimate:
        """Core update from raw arrays: candidate place indices and similarities (best first)."""
        t0 = time.perf_counter()
        cfg = self.config
        cand_idx = np.asarray(cand_idx, dtype=np.int64).ravel()
        cand_sims = np.asarray(cand_sims, dtype=np.float64).ravel()
        ok = (cand_idx >= 0) & (cand_idx < self._n) & np.isfinite(cand_sims)
        cand_idx, cand_sims = cand_idx[ok][:cfg.candidates], cand_sims[ok][:cfg.candidates]
        if rerank_scores is not None:
            rerank_scores = np.asarray(rerank_scores, dtype=np.float64).ravel()[ok][:cfg.candidates]
        if len(cand_idx) == 0:
            degenerate = True
        if len(cand_idx):
            top1 = int(cand_idx[0])
        else:
            top1 = int(self._best_place()) if len(self._places) else 0
        if (stamp_ns is not None and stamp_ns >= 0 and self._last_stamp is not None
                and stamp_ns > self._last_stamp):
            self._dt = (stamp_ns - self._last_stamp) * 1e-9
        step, used_odom = self._step_bounds(stamp_ns)
        still = False
        if descriptor is not None and not degenerate and cfg.still_cosine < 1.0:
            q = np.asarray(descriptor, dtype=np.float32).ravel()
            q = q / max(float(np.linalg.norm(q)), 1e-12)
            if (self._last_descriptor is not None and len(q) == len(self._last_descriptor)
                    and float(q @ self._last_descriptor) >= cfg.still_cosine
                    and (step is None or abs(step) < 0.25 * self.route.spacing_m)):
                # the camera sees what it saw: standing still, and no new evidence (counting
                # the same view again would make a stop look like proof)
                still = True
            else:
                self._last_descriptor = q
        if still and self._frames > 0:
            # the stamp stays the last used frame's: odometry then covers the whole pause
            est = self._estimate(top1, self._last_iid, used_odom, False)
            est.timings_ms["stream"] = (time.perf_counter() - t0) * 1e3
            return est
        if self._frames > 0:
            self._predict(step)
        if stamp_ns is not None and stamp_ns >= 0:
            self._last_stamp = int(stamp_ns)
        if degenerate:
            iid_mass = None
        else:
            iid_mass = self._correct(cand_idx, cand_sims, descriptor, rerank_scores)
            self._last_iid = iid_mass
        self._frames += 1
        est = self._estimate(top1, iid_mass, used_odom, degenerate)
        est.timings_ms["stream"] = (time.perf_counter() - t0) * 1e3
        return est

    # ------------------------------------------------------------------ internals
    def _step_bounds(self, stamp_ns) -> Tuple[Optional[float], bool]:
        """Signed distance travelled since the last frame from odometry (metres), or None.

        Odometry gives positions in its own frame, so the sign comes from comparing this
        displacement with the last clear one: moving back along it means reversing.
        """
        cfg = self.config
        if (self._last_stamp is None or stamp_ns is None or stamp_ns < 0
                or not self._odometry.stamps):
            return None, False
        if stamp_ns < self._last_stamp:
            return None, False
        moved = self._odometry.displacement(self._last_stamp, int(stamp_ns),
                                            int(cfg.odometry_max_gap_s * 1e9))
        if moved is None:
            self.last_odometry_rejection = "odometry does not cover the frame interval (stale)"
            return None, False
        length, vector = moved
        norm = float(np.linalg.norm(vector))
        sign = 1.0
        if self._heading is not None and norm > 1e-9:
            sign = -1.0 if float(np.dot(vector, self._heading)) < 0 else 1.0
        if norm > 0.25 * self.route.spacing_m:
            # the direction of travel, in the sense the stream's direction states follow
            self._heading = sign * vector / norm
        return sign * length, True

    def _predict(self, travelled: Optional[float]) -> None:
        cfg, route = self.config, self.route
        s = route.spacing_m
        kappa = cfg.kidnap_prob
        rest_extra = 0.0
        if len(self._places):
            places, dirs, speeds, mass = self._places, self._dirs, self._speeds, self._mass
            nsp = len(cfg.speeds)
            if travelled is None and nsp > 1 and cfg.speed_change_prob > 0:
                # a speed class changes with speed_change_prob per frame, to any class (a
                # stop or a speed-up is as sudden as the robot makes it)
                pc = cfg.speed_change_prob
                nh = len(places)
                all_sp = np.tile(np.arange(nsp, dtype=np.int8), nh)
                places = np.r_[places, np.repeat(places, nsp)]
                dirs = np.r_[dirs, np.repeat(dirs, nsp)]
                mass = np.r_[mass * (1 - pc), np.repeat(mass * pc / nsp, nsp)]
                speeds = np.r_[speeds, all_sp].astype(np.int8)
                places, dirs, speeds, mass = self._merge(places, dirs, speeds, mass)
            if travelled is None:
                step = np.asarray(cfg.speeds, np.float64)[speeds] * s
                if cfg.max_speed_mps > 0 and self._dt:
                    step = np.minimum(step, max(cfg.max_speed_mps * self._dt, s))
                sigma = cfg.step_sigma * s + 0.15 * step
            else:
                step = np.full(len(places), travelled)
                sigma = np.full(len(places), max(cfg.odometry_sigma * abs(travelled),
                                                 cfg.step_sigma * s))
            if route.directed:
                # signed: with odometry a negative step is the robot backing up
                src, dst, a = route.along_route(places, dirs, step - 3 * sigma, step + 3 * sigma)
                w = np.exp(-0.5 * ((a - step[src]) / sigma[src]) ** 2)
            else:
                radius = float((np.abs(step) + 3 * sigma).max()) + 1e-6
                src, dst = route.within(route.positions[places], radius)
                _, dist = route.offsets(places[src], dst)
                w = np.exp(-0.5 * ((dist - step[src]) / sigma[src]) ** 2)
            w_sum = np.bincount(src, weights=w, minlength=len(places))
            lost = w_sum <= 1e-300
            w = w / np.where(lost, 1.0, w_sum)[src]
            m = (1.0 - kappa) * mass
            if route.directed and cfg.reverse_prob > 0:
                keep = m[src] * w * (1.0 - cfg.reverse_prob)
                flip = m[src] * w * cfg.reverse_prob
                new_places = np.r_[dst, dst]
                new_dirs = np.r_[dirs[src], -dirs[src]]
                new_speeds = np.r_[speeds[src], speeds[src]]
                new_mass = np.r_[keep, flip]
            else:
                new_places, new_dirs, new_speeds = dst, dirs[src], speeds[src]
                new_mass = m[src] * w
            rest_extra = float(m[lost].sum())
            (self._places, self._dirs, self._speeds,
             self._mass) = self._merge(new_places, new_dirs, new_speeds, new_mass)
        self._rest = (1.0 - kappa) * self._rest + kappa + rest_extra

    def _merge(self, places, dirs, speeds, mass):
        nsp = len(self.config.speeds)
        key = (places.astype(np.int64) * 3 + (dirs.astype(np.int64) + 1)) * nsp + speeds
        uniq, inv = np.unique(key, return_inverse=True)
        total = np.bincount(inv, weights=mass)
        pd, sp = np.divmod(uniq, nsp)
        return (pd // 3).astype(np.int64), (pd % 3 - 1).astype(np.int8), sp.astype(np.int8), total

    def _zscore(self, sims, descriptor):
        """Per-frame normalisation (mean, spread) of similarities, and the sampled z-scores."""
        if self._sample is not None and descriptor is not None:
            q = np.asarray(descriptor, dtype=np.float32).ravel()
            if len(q) == self._sample.shape[1]:
                ss = self._sample @ q
                mu, sd = float(ss.mean()), float(ss.std())
                sd = max(sd, 1e-6)
                return mu, sd, (ss.astype(np.float64) - mu) / sd
        # without descriptors: the candidates' own spread (weaker, still scale-free)
        mu = float(np.median(sims)) if len(sims) else 0.0
        sd = max(float(np.std(sims)), 1e-6) if len(sims) > 1 else 1.0
        return mu - 2 * sd, sd, None

    def _correct(self, cand_idx, cand_sims, descriptor, rerank_scores) -> dict:
        cfg = self.config
        beta = cfg.beta
        mu, sd, zs = self._zscore(cand_sims, descriptor)
        zc = (cand_sims - mu) / sd
        z_floor = float(zc.min())
        # log-likelihood of the rest: mean likelihood of sampled places below the weakest candidate
        if zs is not None and (zs <= z_floor).any():
            below = zs[zs <= z_floor]
            log_rest = float(np.log(np.mean(np.exp(beta * (below - z_floor)))) + beta * z_floor)
        else:
            log_rest = beta * z_floor
        ll_cand = beta * zc
        rr_rest = 0.0
        if (rerank_scores is not None and np.isfinite(rerank_scores).sum() >= 2
                and cfg.rerank_weight):
            r = rerank_scores
            fin = np.isfinite(r)
            rz = (r - r[fin].mean()) / max(r[fin].std(), 1e-6)
            rz_top = rz[fin].max()
            rr_rest = cfg.rerank_weight * beta * (float(rz[fin].min()) - rz_top)
            ll_cand = ll_cand + np.where(fin, cfg.rerank_weight * beta * (rz - rz_top), rr_rest)
            log_rest += rr_rest
        # log-likelihood per place: candidates, then tracked places that were not retrieved
        ll_places = [cand_idx]
        ll_values = [ll_cand]
        need = np.setdiff1d(self._places, cand_idx)
        if len(need):
            if self.descriptors is not None and descriptor is not None:
                q = np.asarray(descriptor, dtype=np.float32).ravel()
                d = np.asarray(self.descriptors[need], dtype=np.float32)
                z = (d @ q - mu) / sd
                # a tracked place scores at most like the weakest candidate (it was not retrieved)
                ll_t = beta * np.minimum(z, z_floor) + rr_rest
            else:
                ll_t = np.full(len(need), beta * z_floor + rr_rest)
            ll_places.append(need)
            ll_values.append(ll_t)
        ll_places = np.concatenate(ll_places)
        ll_values = np.concatenate(ll_values)
        order = np.argsort(ll_places, kind="stable")
        ll_places, ll_values = ll_places[order], ll_values[order]

        # Independent-frames model: uniform prior over the map.
        n = self._n
        lmax = max(float(ll_cand.max()), log_rest)
        iid_terms = np.exp(ll_cand - lmax)
        iid_rest = max(n - len(cand_idx), 0) * math.exp(log_rest - lmax)
        iid_norm = iid_terms.sum() + iid_rest
        log_e_iid = lmax + math.log(iid_norm / n)
        post_iid = iid_terms / iid_norm

        # Stream model: tracked states + candidates seeded from the uniform rest mass.
        ndir = self._ndir
        # new states for candidates not tracked in some direction
        dirs_new = np.array([1, -1], np.int8) if ndir == 2 else np.array([0], np.int8)
        nsp = self._nsp
        cp = np.repeat(cand_idx, len(dirs_new) * nsp)
        cd = np.tile(np.repeat(dirs_new, nsp), len(cand_idx))
        cs = np.tile(np.arange(nsp, dtype=np.int8), len(cand_idx) * len(dirs_new))
        places = np.r_[self._places, cp]
        dirs = np.r_[self._dirs, cd]
        speeds = np.r_[self._speeds, cs]
        mass = np.r_[self._mass, np.zeros(len(cp))]
        places, dirs, speeds, mass = self._merge(places, dirs, speeds, mass)
        per_state_rest = self._rest / (n * ndir * nsp)
        prior = mass + per_state_rest
        rest_left = max(self._rest - per_state_rest * len(places), 0.0)
        ll = ll_values[np.searchsorted(ll_places, places)]
        lmax2 = max(float(ll.max()) if len(ll) else log_rest, log_rest)
        post = prior * np.exp(ll - lmax2)
        post_rest = rest_left * math.exp(log_rest - lmax2)
        evidence = post.sum() + post_rest
        log_e_stream = lmax2 + math.log(max(evidence, 1e-300))
        post /= evidence
        post_rest /= evidence
        if self._frames > 0:
            self._fit = cfg.fit_memory * self._fit + (log_e_stream - log_e_iid)
            self._fit = float(np.clip(self._fit, -50.0, 50.0))
        # prune
        keep = post >= post.max() * 1e-6 if len(post) else np.zeros(0, bool)
        if keep.sum() > cfg.max_hypotheses:
            top = np.argpartition(-post, cfg.max_hypotheses - 1)[:cfg.max_hypotheses]
            keep = np.zeros(len(post), bool)
            keep[top] = True
        post_rest += float(post[~keep].sum())
        self._places, self._dirs, self._speeds = places[keep], dirs[keep], speeds[keep]
        self._mass = post[keep]
        self._rest = post_rest
        return {"places": cand_idx, "mass": post_iid}

    def _best_place(self) -> int:
        # summed over directions and speeds; over the tracked places only (a bincount over
        # place indices would allocate an array as long as the map every frame)
        uniq, inv = np.unique(self._places, return_inverse=True)
        return int(uniq[np.argmax(np.bincount(inv, weights=self._mass))])

    def _mass_near(self, place: int, places: np.ndarray, mass: np.ndarray) -> float:
        if len(places) == 0:
            return 0.0
        d = np.linalg.norm(self.route.positions[places] - self.route.positions[place], axis=1)
        return float(mass[d <= self.config.radius_m + 1e-6].sum())

    def _estimate(self, top1: int, iid: Optional[dict], used_odom: bool,
                  degenerate: bool) -> StreamEstimate:
        # the stream model is used once it predicts the frames better than independent frames
        w = 0.0
        if self._frames > 1:
            w = 1.0 / (1.0 + math.exp(-4.0 * (self._fit - self.config.fit_margin)))
        options = []
        if len(self._places):
            options.append(self._best_place())
        if iid is not None and len(iid["places"]):
            options.append(int(iid["places"][0]))
        if not options:
            options = [top1]
        best, best_mass = options[0], -1.0
        for p in dict.fromkeys(options):
            m_stream = self._mass_near(p, self._places, self._mass)
            m_iid = self._mass_near(p, iid["places"], iid["mass"]) if iid is not None else 0.0
            m = w * m_stream + (1 - w) * m_iid if iid is not None else m_stream
            if m > best_mass:
                best, best_mass = p, m
        raw = float(np.clip(best_mass, 0.0, 1.0))
        conf = float(calibrated_confidence(raw, self._fit, self.calibration,
                                           self.config.fit_margin))
        confident = (not degenerate) and conf >= self.threshold
        if not degenerate:
            self.localized = confident
        return StreamEstimate(place_index=int(best), confidence=0.0 if degenerate else conf,
                              raw_confidence=raw, confident=confident, localized=self.localized,
                              prior_fit=self._fit, single_frame_index=int(top1),
                              used_odometry=used_odom, degenerate=degenerate,
                              hypotheses=int(len(self._places)))
