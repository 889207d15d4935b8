"""Localizer: one camera image -> the best matching map place, its pose and a confidence.

Stages (each timed in ``timings_ms``): ``preprocess`` (official eval pipeline),
``describe`` (global descriptor), ``search`` (FAISS top-k), ``rerank`` (optional
SelaVPR mutual-nearest-neighbour re-ranking of the first ``rerank_k`` candidates),
``stream`` (optional stream localizer, :mod:`vpr_ros.stream`) and ``total``.

Each frame is first checked for degeneracy (:mod:`vpr_ros.image_quality`: black, uniform,
tiny, lens cap, heavy blur); a degenerate frame is never confident and is no evidence for
the stream.

Confidence (0..1) is a logistic function of two numbers of the final candidate list::

    confidence = sigmoid(bias + w_similarity * s1 + w_margin * (s1 - s_far))

``s1`` is the global similarity of the chosen place and ``s_far`` the best similarity
among candidates farther than ``radius_m`` from it (the strongest rival place; when all
candidates are near the chosen place, the last candidate's similarity is used).  A
large margin means no look-alike place elsewhere.  ``vpr eval recall`` fits the three
weights by logistic regression on a dataset with ground truth and can store them in
the map manifest (``confidence``); without fitted values the defaults below are a
plain margin rule (confidence 0.5 at a margin of 0.05).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .constants import CONFIDENCE_THRESHOLD
from .errors import ConfigError, MapError
from .preprocess import preprocess, to_rgb_uint8

log = logging.getLogger(__name__)

DEFAULT_CONFIDENCE = {"model": "logistic", "bias": -2.0, "w_similarity": 0.0,
                      "w_margin": 40.0, "radius_m": 25.0, "fitted": False}
DEFAULT_THRESHOLD = CONFIDENCE_THRESHOLD


@dataclass
class Candidate:
    place_index: int
    place_id: int
    image_name: str
    position: np.ndarray
    similarity: float                       # global descriptor inner product
    rerank_score: Optional[float] = None    # SelaVPR MNN score when re-ranked

    def to_dict(self) -> dict:
        d = {"place_index": self.place_index, "place_id": self.place_id,
             "image_name": self.image_name, "position": [float(v) for v in self.position],
             "similarity": float(self.similarity)}
        if self.rerank_score is not None:
            d["rerank_score"] = float(self.rerank_score)
        return d


@dataclass
class LocalizationResult:
    place_index: int
    place_id: int
    image_name: str
    position: np.ndarray          # (3,)
    orientation: np.ndarray       # (4,) xyzw
    similarity: float
    confidence: float
    confident: bool
    candidates: List[Candidate]
    timings_ms: Dict[str, float]
    stamp_ns: Optional[int] = None
    frame_id: str = "map"
    reranked: bool = False
    temporal: bool = False
    raw_place_index: Optional[int] = None   # single-frame answer when the stream changed it
    confidence_threshold: float = DEFAULT_THRESHOLD
    stream: Optional[object] = None         # vpr_ros.stream.StreamEstimate when a stream ran
    single_frame: Optional[dict] = None     # the single-frame answer when a stream ran
    quality: Optional[object] = None        # vpr_ros.image_quality.FrameQuality of the frame
    # the query's global descriptor (for the stream localizer; not serialised)
    descriptor: Optional[np.ndarray] = field(default=None, repr=False, compare=False)
    # the query's SelaVPR local features when re-ranking ran (for debug views; not serialised)
    query_local: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {"place_index": self.place_index, "place_id": self.place_id,
                "image_name": self.image_name,
                "position": [float(v) for v in self.position],
                "orientation": [float(v) for v in self.orientation],
                "frame_id": self.frame_id, "similarity": _finite(self.similarity),
                "confidence": float(self.confidence), "confident": bool(self.confident),
                "reranked": self.reranked, "temporal": self.temporal,
                "raw_place_index": self.raw_place_index, "stamp_ns": self.stamp_ns,
                "candidates": [c.to_dict() for c in self.candidates],
                "timings_ms": {k: round(float(v), 3) for k, v in self.timings_ms.items()},
                "stream": self.stream.to_dict() if self.stream is not None else None,
                "single_frame": self.single_frame,
                "localized": bool(self.stream.localized) if self.stream is not None else None,
                "degenerate": bool(self.quality.degenerate) if self.quality is not None else False,
                "degenerate_reason": self.quality.reason if self.quality is not None else None}


def _finite(x: float):
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------- confidence

def confidence_features(similarities: np.ndarray, positions: np.ndarray,
                        radius_m: float) -> tuple:
    """(s1, margin) of a best-first candidate list (see module docstring)."""
    sims = np.asarray(similarities, dtype=np.float64)
    if len(sims) == 0:
        return 0.0, 0.0
    s1 = sims[0]
    if len(sims) == 1:
        return float(s1), float(s1)
    d = np.linalg.norm(np.asarray(positions)[1:, :2] - np.asarray(positions)[0, :2], axis=1)
    far = np.flatnonzero(d > radius_m)
    rival = sims[1:][far].max() if len(far) else sims[-1]
    return float(s1), float(s1 - rival)


def confidence_from_features(s1, margin, params: Optional[dict] = None):
    p = params or DEFAULT_CONFIDENCE
    z = p["bias"] + p["w_similarity"] * np.asarray(s1) + p["w_margin"] * np.asarray(margin)
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def fit_confidence(s1: np.ndarray, margin: np.ndarray, correct: np.ndarray,
                   radius_m: float = 25.0, l2: float = 1e-2, min_each: int = 10) -> dict:
    """Logistic regression of ``correct`` on (s1, margin); returns manifest parameters.

    Features are standardised for the fit (with a small L2 penalty so perfectly separable
    data still gives finite weights) and the weights converted back to raw units.  The
    weights are kept >= 0 (a higher similarity or margin never lowers the confidence).
    With fewer than ``min_each`` correct or wrong queries the defaults are returned.
    """
    from scipy.optimize import minimize

    x = np.stack([np.asarray(s1, float), np.asarray(margin, float)], axis=1)
    y = np.asarray(correct, dtype=float)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < min_each:
        log.warning("not fitting the confidence: %d correct and %d wrong queries (need %d of "
                    "each); keeping the default parameters", n_pos, n_neg, min_each)
        return dict(DEFAULT_CONFIDENCE, radius_m=radius_m)
    mu, sd = x.mean(0), x.std(0)
    sd[sd < 1e-9] = 1.0
    xs = (x - mu) / sd

    def loss(w):
        z = w[0] + xs @ w[1:]
        ll = np.logaddexp(0, z) - y * z
        return ll.mean() + l2 * np.sum(w[1:] ** 2)

    def grad(w):
        z = w[0] + xs @ w[1:]
        r = 1 / (1 + np.exp(-z)) - y
        g = np.r_[r.mean(), xs.T @ r / len(y)]
        g[1:] += 2 * l2 * w[1:]
        return g

    bounds = [(None, None), (0.0, None), (0.0, None)]
    w = minimize(loss, np.zeros(3), jac=grad, method="L-BFGS-B", bounds=bounds).x
    wr = w[1:] / sd
    bias = w[0] - np.sum(wr * mu)
    return {"model": "logistic", "bias": float(bias), "w_similarity": float(wr[0]),
            "w_margin": float(wr[1]), "radius_m": float(radius_m), "fitted": True,
            "fitted_on_queries": int(len(y))}


# --------------------------------------------------------------------------- localizer

class Localizer:
    """Image -> LocalizationResult against one PlaceMap (ROS-free)."""

    def __init__(self, place_map, describer, local_extractor=None, top_k: int = 10,
                 rerank_k: int = 0, confidence_threshold: float = DEFAULT_THRESHOLD,
                 temporal_filter=None, confidence_params: Optional[dict] = None,
                 check_map: bool = True, rerank_compute: str = "fp32", stream=None,
                 quality_limits=None):
        from .models.rerank import COMPUTES

        if str(rerank_compute).strip().lower() not in COMPUTES:
            raise ConfigError(f"rerank_compute must be one of {', '.join(COMPUTES)} (fp32 = exact "
                              f"official counts, bf16 = faster, approximate counts), got "
                              f"{rerank_compute!r}")
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        if rerank_k < 0:
            raise ConfigError(f"rerank_k must be >= 0, got {rerank_k}")
        if not 0.0 <= confidence_threshold <= 1.0:
            raise ConfigError(f"confidence threshold must be in 0..1, got {confidence_threshold}")
        if rerank_k > 0 and local_extractor is None:
            raise ConfigError("rerank_k > 0 needs a local feature extractor (SelaVPR model)")
        if check_map:
            from .errors import MapMismatchError

            model = place_map.manifest.get("model", {})
            if model.get("card") != describer.card.name:
                raise MapMismatchError(f"map card {model.get('card')!r} != model card "
                                       f"{describer.card.name!r}")
            if model.get("fingerprint") != describer.fingerprint:
                raise MapMismatchError(f"map weights {model.get('fingerprint')} != model "
                                       f"weights {describer.fingerprint}")
            if local_extractor is not None and rerank_k > 0:
                place_map.check_local_extractor(local_extractor)
        self.place_map = place_map
        self.describer = describer
        self.local_extractor = local_extractor
        self.top_k = int(top_k)
        self.rerank_k = int(rerank_k)
        self.rerank_compute = str(rerank_compute).strip().lower()
        self.confidence_threshold = float(confidence_threshold)
        self.temporal_filter = temporal_filter
        self.stream = stream                # vpr_ros.stream.StreamLocalizer or None
        from .image_quality import QualityLimits

        self.quality_limits = quality_limits or QualityLimits()
        self.confidence_params = (confidence_params or place_map.manifest.get("confidence")
                                  or dict(DEFAULT_CONFIDENCE))

    # ------------------------------------------------------------------ stages
    def localize(self, image: np.ndarray, stamp_ns: Optional[int] = None,
                 color_order: str = "rgb") -> LocalizationResult:
        from .image_quality import assess_frame

        t_start = time.perf_counter()
        timings: Dict[str, float] = {}
        rgb = to_rgb_uint8(image, color_order)
        quality = assess_frame(rgb, self.quality_limits)
        d = self.describer
        if hasattr(d, "describe_tensor"):
            import torch

            t = time.perf_counter()
            x = preprocess([rgb], tuple(d.input_size))
            timings["preprocess"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            with torch.inference_mode():
                desc = d.describe_tensor(x).detach().float().cpu().numpy().reshape(-1)
            timings["describe"] = (time.perf_counter() - t) * 1e3
        else:
            timings["preprocess"] = 0.0
            t = time.perf_counter()
            desc = np.asarray(d.describe([rgb]), dtype=np.float32).reshape(-1)
            timings["describe"] = (time.perf_counter() - t) * 1e3
        query_local = None
        if self.rerank_k > 0:
            t = time.perf_counter()
            _, local = self.local_extractor.extract([rgb])
            query_local = np.asarray(local[0])
            timings["rerank_extract"] = (time.perf_counter() - t) * 1e3
        result = self.localize_descriptor(desc, query_local=query_local, stamp_ns=stamp_ns,
                                          timings=timings, quality=quality)
        result.timings_ms["total"] = (time.perf_counter() - t_start) * 1e3
        result.query_local = query_local
        return result

    def warm_up(self) -> float:
        """One mid-grey frame through every stage this localizer runs (describe, local
        features, search, re-ranking) without touching any belief (stream, temporal
        filter) or publishing anything -> seconds taken.  The once-per-process costs -
        first-call allocations of the model, the native kernels' BLAS check for the map's
        local-feature shape - are then paid here (the node calls it at configure), not by
        the first camera frame."""
        t = time.perf_counter()
        size = tuple(getattr(self.describer, "input_size", (224, 224)))
        rgb = np.full((int(size[0]), int(size[1]), 3), 128, dtype=np.uint8)
        desc = np.asarray(self.describer.describe([rgb]), dtype=np.float32).reshape(1, -1)
        _, idx = self.place_map.search(desc, max(1, self.rerank_k))
        idx = idx[0][idx[0] >= 0]
        if self.rerank_k > 0 and len(idx) and self.place_map.local_features is not None:
            _, local = self.local_extractor.extract([rgb])
            self.rerank(np.asarray(local[0]), idx[:self.rerank_k])
        return time.perf_counter() - t

    def localize_descriptor(self, descriptor: np.ndarray, query_local: Optional[np.ndarray] = None,
                            stamp_ns: Optional[int] = None,
                            timings: Optional[Dict[str, float]] = None,
                            search_result=None, quality=None) -> LocalizationResult:
        """The search/re-rank/confidence/stream part for an already computed descriptor.

        ``search_result`` (similarities (k,), indices (k,)) skips the FAISS search (batch
        evaluation searches all queries at once).  ``quality`` (FrameQuality) marks a
        degenerate frame: never confident, no evidence for the stream.
        """
        timings = dict(timings or {})
        k = max(self.top_k, self.rerank_k)
        if self.stream is not None:
            k = max(k, self.stream.config.candidates)
        t = time.perf_counter()
        if search_result is None:
            sims, idx = self.place_map.search(np.asarray(descriptor, np.float32)[None], k)
            sims, idx = sims[0], idx[0]
        else:
            sims, idx = (np.asarray(a)[:k] for a in search_result)
        ok = idx >= 0
        sims, idx = sims[ok], idx[ok]
        timings["search"] = (time.perf_counter() - t) * 1e3
        if len(idx) == 0:
            raise MapError(f"map {self.place_map.path} returned no candidates (empty map?)")
        scores = None
        reranked = False
        if self.rerank_k > 0 and query_local is not None:
            t = time.perf_counter()
            order, scores = self.rerank(query_local, idx[:self.rerank_k])
            head = np.arange(min(self.rerank_k, len(idx)))[order]
            perm = np.r_[head, np.arange(len(head), len(idx))]
            sims, idx = sims[perm], idx[perm]
            scores = np.r_[scores[order], np.full(len(idx) - len(head), np.nan)]
            reranked = True
            timings["rerank"] = (time.perf_counter() - t) * 1e3
        result = self._result(sims, idx, scores, reranked, stamp_ns, timings)
        result.descriptor = np.asarray(descriptor, dtype=np.float32).reshape(-1)
        degenerate = quality is not None and quality.degenerate
        if quality is not None:
            result.quality = quality
            if degenerate:
                result.confident = False
                result.confidence = 0.0
        if self.stream is not None:
            est = self.stream.observe(idx, sims, descriptor=result.descriptor, stamp_ns=stamp_ns,
                                      rerank_scores=scores if reranked else None,
                                      degenerate=degenerate)
            result = self.stream.apply(result, est)
        elif self.temporal_filter is not None:
            t = time.perf_counter()
            result = self.temporal_filter.filter_result(result, self.place_map, descriptor)
            result.timings_ms["temporal"] = (time.perf_counter() - t) * 1e3
        return result

    def rerank(self, query_local: np.ndarray, indices: np.ndarray):
        """SelaVPR re-ranking of candidate places -> (order, scores) of ``indices``."""
        import torch

        from .maps.local_store import PlaceSubset
        from .models.rerank import mutual_nn_counts, official_scores, rerank_order

        feats = self.place_map.local_features
        if feats is None:
            raise MapError(f"map {self.place_map.path} has no local features for re-ranking")
        # one candidate map at a time from the memory-mapped store (dequantised if int8)
        accel = getattr(self.local_extractor, "accel", None)    # the extractor's switches
        counts = mutual_nn_counts(torch.from_numpy(np.asarray(query_local)),
                                  PlaceSubset(feats, indices), compute=self.rerank_compute,
                                  native=None if accel is None else accel.native_kernels,
                                  kernel_cache=None if accel is None else accel.kernel_cache)
        scores = official_scores(counts)
        order = np.asarray(rerank_order(scores))
        return order, scores.detach().cpu().numpy().astype(np.float64)

    def _result(self, sims, idx, scores, reranked, stamp_ns, timings) -> LocalizationResult:
        places = self.place_map.places
        # the single-frame candidates: the stream may have searched more (its evidence), but
        # the single-frame answer and its confidence use the first max(top_k, rerank_k)
        k = max(self.top_k, self.rerank_k)
        sims, idx = sims[:k], idx[:k]
        cands = [Candidate(int(i), int(places.ids[i]), places.names[i], places.positions[i],
                           float(s), None if scores is None or not np.isfinite(scores[j])
                           else float(scores[j]))
                 for j, (i, s) in enumerate(zip(idx, sims))]
        params = self.confidence_params
        s1, margin = confidence_features(sims, places.positions[idx], params.get("radius_m", 25.0))
        conf = float(confidence_from_features(s1, margin, params))
        best = int(idx[0])
        return LocalizationResult(
            place_index=best, place_id=int(places.ids[best]), image_name=places.names[best],
            position=places.positions[best].copy(), orientation=places.orientations[best].copy(),
            similarity=float(sims[0]), confidence=conf,
            confident=conf >= self.confidence_threshold, candidates=cands[:self.top_k],
            timings_ms=timings, stamp_ns=stamp_ns,
            frame_id=places.frame_id, reranked=reranked,
            confidence_threshold=self.confidence_threshold)
