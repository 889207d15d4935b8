"""Temporal filter: a discrete Bayes filter over map places for a stream of frames.

Single-image place recognition sometimes jumps to a look-alike place far away for one
frame.  A robot cannot jump, so the filter keeps a belief (a probability per map place)
and, for every frame:

1. **predict**: spread the belief to places within a few ``sigma_m`` of where it was
   (Gaussian kernel on the map positions, truncated at 3 sigma and to the 64 nearest
   places), and mix in ``kidnap_prob`` of uniform belief so a truly lost robot recovers;
2. **update**: multiply by the likelihood of the frame's retrieval result: a retrieved
   candidate j gets ``exp((s_j - s_1) / T)``, every place that was not retrieved gets the
   value of the weakest retrieved candidate (its similarity is at most that); the
   temperature T defaults to a sixth of the similarity spread (s_1 - s_K) of the
   candidates, so the filter works whatever the similarity scale of the model;
3. report the place with the highest belief; its confidence is the belief mass within
   ``radius_m`` of it.

The filter is ROS-free and map-agnostic: it needs only the (N, 3) place positions.
docs/evaluation.md reports its effect on Nordland.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import numpy as np

log = logging.getLogger(__name__)


class PlaceBeliefFilter:
    """Discrete Bayes filter over map places (see module docstring)."""

    def __init__(self, positions: np.ndarray, sigma_m: float = 30.0, kidnap_prob: float = 0.05,
                 temperature: Optional[float] = None, radius_m: float = 25.0,
                 max_neighbours: int = 64, spread_fraction: float = 1.0 / 6.0):
        from scipy import sparse
        from scipy.spatial import cKDTree

        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        if len(positions) == 0:
            raise ValueError("the temporal filter needs a map with at least one place")
        if sigma_m <= 0:
            raise ValueError(f"sigma_m must be > 0, got {sigma_m}")
        if not 0.0 <= kidnap_prob < 1.0:
            raise ValueError(f"kidnap_prob must be in [0, 1), got {kidnap_prob}")
        self.positions = positions
        self.sigma_m = float(sigma_m)
        self.kidnap_prob = float(kidnap_prob)
        self.temperature = temperature
        self.spread_fraction = float(spread_fraction)
        self.radius_m = float(radius_m)
        n = len(positions)
        tree = cKDTree(positions)
        k = min(max_neighbours, n)
        dist, idx = tree.query(positions, k=k, distance_upper_bound=3.0 * self.sigma_m)
        dist = dist.reshape(n, k)
        idx = idx.reshape(n, k)
        ok = np.isfinite(dist)
        rows = np.repeat(np.arange(n), k)[ok.ravel()]
        cols = idx.ravel()[ok.ravel()]
        w = np.exp(-0.5 * (dist.ravel()[ok.ravel()] / self.sigma_m) ** 2)
        kernel = sparse.csr_matrix((w, (rows, cols)), shape=(n, n))
        # Row i spreads the belief of place i over its neighbours: normalise rows, then
        # the prediction is kernel^T @ belief.
        row_sum = np.asarray(kernel.sum(axis=1)).ravel()
        kernel = sparse.diags(1.0 / row_sum) @ kernel
        self._spread = kernel.T.tocsr()
        self._tree = tree
        self.belief: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.positions)

    def reset(self) -> None:
        self.belief = None

    def _likelihood(self, indices: np.ndarray, similarities: np.ndarray) -> np.ndarray:
        ok = indices >= 0
        indices, sims = indices[ok], similarities[ok].astype(np.float64)
        if len(indices) == 0:
            return np.ones(len(self))
        s1, s_min = sims.max(), sims.min()
        t = self.temperature
        if t is None:
            t = max((s1 - s_min) * self.spread_fraction, 1e-4)
        lik = np.full(len(self), np.exp((s_min - s1) / t))
        lik[indices] = np.exp((sims - s1) / t)
        return lik

    def update(self, indices: np.ndarray, similarities: np.ndarray):
        """Feed one frame's retrieval (place indices and similarities, any order).

        Returns (best place index, belief mass within radius_m of it).
        """
        lik = self._likelihood(np.asarray(indices).ravel(), np.asarray(similarities).ravel())
        n = len(self)
        if self.belief is None:
            prior = np.full(n, 1.0 / n)
        else:
            prior = (1.0 - self.kidnap_prob) * (self._spread @ self.belief) + self.kidnap_prob / n
        post = prior * lik
        total = post.sum()
        if not np.isfinite(total) or total <= 0:
            post = lik / lik.sum()
        else:
            post = post / total
        self.belief = post
        best = int(np.argmax(post))
        near = self._tree.query_ball_point(self.positions[best], r=self.radius_m + 1e-6)
        mass = float(post[near].sum())
        return best, min(max(mass, 0.0), 1.0)

    def filter_result(self, result, place_map, descriptor=None):
        """Filter a LocalizationResult: same candidates, place from the belief.

        When the believed place is not among the candidates, its similarity is computed
        from ``descriptor`` (the query's global descriptor) when given, else NaN.
        """
        idx = np.array([c.place_index for c in result.candidates], dtype=np.int64)
        sims = np.array([c.similarity for c in result.candidates], dtype=np.float64)
        best, mass = self.update(idx, sims)
        places = place_map.places
        if (idx == best).any():
            sim = float(sims[idx == best][0])
        elif descriptor is not None:
            sim = float(np.dot(np.asarray(place_map.descriptors[best], dtype=np.float32),
                               np.asarray(descriptor, dtype=np.float32).ravel()))
        else:
            sim = float("nan")
        return dataclasses.replace(
            result, place_index=best, place_id=int(places.ids[best]),
            image_name=places.names[best], position=places.positions[best].copy(),
            orientation=places.orientations[best].copy(), similarity=sim,
            confidence=mass, confident=mass >= result.confidence_threshold,
            raw_place_index=result.place_index, temporal=True)
