"""The first-stage model in re-ranker training (``mining.model``).

A re-ranker only ever sees the candidates the first stage (the global model the pipeline
retrieves with) puts in its top K.  SelaVPR mines its triplets with its own global
descriptor; at the demo's size that descriptor stays near chance, so the mined negatives
are easy and the local head learns little.  With ``mining.model`` set:

* every training image is described once, without augmentation, by the first-stage
  model; positives and hardest negatives of a batch are mined on those descriptors, so
  the local head learns to separate the places the first stage confuses;
* ``mining.neighbour_places: N`` builds the batches from such places: each seed place
  brings the N places the first stage ranks closest to it (far enough apart,
  ``data.avoid_near_places_m``), instead of a random draw of places;
* ``eval.rerank_k: K`` validates what the pipeline does: the first stage's top K of every
  validation query, re-ordered by the mutual-nearest-neighbour counts of the re-ranker's
  local features; the epoch is picked by that re-ranked R@1.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, VprError
from .data import PlaceBatchSampler, PlaceSet, ValidationSet

log = logging.getLogger(__name__)


def first_stage_describer(model: str, weights: Optional[str] = None, device: str = "cpu"):
    """A :class:`~vpr_ros.inference.GlobalDescriber` of the first-stage card on the
    training's device."""
    from ..inference import GlobalDescriber

    return GlobalDescriber(model, weights=weights, device=device, batch_size=32)


def place_descriptors(image_desc: np.ndarray, places: PlaceSet) -> np.ndarray:
    """Mean first-stage descriptor of each place (re-normalised), (P, D)."""
    out, row = [], 0
    for p in places.places:
        n = len(p.images)
        m = image_desc[row:row + n].mean(axis=0)
        out.append(m / max(float(np.linalg.norm(m)), 1e-12))
        row += n
    return np.asarray(out, dtype=np.float32)


class NeighbourBatchSampler(PlaceBatchSampler):
    """Batches of places the first stage confuses.

    Per batch: seed places in a random order; each brings its ``neighbours`` nearest
    places by first-stage descriptor (place means) that are not yet in the batch and at
    least ``avoid_near_m`` from every place in it, until the batch holds P places.  Every
    place is a seed once per epoch; deterministic in (seed, epoch) like the parent.
    """

    def __init__(self, place_desc: np.ndarray, neighbours: int, num_places: int,
                 places_per_batch: int, seed: int = 0,
                 batches_per_epoch: Optional[int] = None, *args, **kwargs):
        super().__init__(num_places, places_per_batch, seed, batches_per_epoch, *args, **kwargs)
        self.neighbours = int(neighbours)
        sims = place_desc @ place_desc.T
        np.fill_diagonal(sims, -np.inf)
        self.ranked = np.argsort(-sims, axis=1, kind="stable")[:, :max(64, 4 * neighbours)]
        seeds_per_batch = max(1, self.p // (self.neighbours + 1))
        full = self.num_places // seeds_per_batch
        if not batches_per_epoch:
            self.batches_per_epoch = max(1, full)

    def _far(self, batch: List[int], idx: int) -> bool:
        if self.avoid is None or not batch:
            return True
        return float(np.min(np.linalg.norm(self.positions[batch] - self.positions[idx],
                                           axis=1))) >= self.avoid

    def global_batches(self) -> List[List[Tuple[int, int]]]:
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        order = rng.permutation(self.num_places).tolist()
        out: List[List[Tuple[int, int]]] = []
        pos = 0
        while len(out) < self.batches_per_epoch:
            batch: List[int] = []
            tries = 0
            while len(batch) < self.p and tries < 4 * self.num_places:
                seed_place = order[pos % len(order)]
                pos += 1
                tries += 1
                if seed_place in batch or not self._far(batch, seed_place):
                    continue
                batch.append(seed_place)
                added = 0
                for nb in self.ranked[seed_place]:
                    if added >= self.neighbours or len(batch) >= self.p:
                        break
                    nb = int(nb)
                    if nb not in batch and self._far(batch, nb):
                        batch.append(nb)
                        added += 1
            if len(batch) < 2:
                from ..errors import DatasetError
                raise DatasetError("mining.neighbour_places: cannot form a batch of 2 "
                                   "far-apart places; lower data.avoid_near_places_m")
            seeds = rng.integers(0, 2**31 - 1, size=len(batch))
            out.append(list(zip(batch, seeds.tolist())))
        return out


def rerank_validate(stage, val: ValidationSet, first_db: np.ndarray, first_q: np.ndarray,
                    k: int, ns, batch_size: int, precision: torch.dtype = torch.float32,
                    progress: bool = False) -> Dict[str, float]:
    """R@N of the first stage's top ``k`` re-ordered by the model's local features.

    Also returns the first stage's own R@N (keys ``first_R@N``) for the log."""
    from ..evaluation.metrics import recall_at_n
    from ..models.rerank import rerank
    from .trainer import describe_paths

    def local(paths):              # the SelaVPR model's (global, local) -> local
        return describe_paths(stage, paths, batch_size, precision, progress,
                              fn=lambda x: stage.model(x)[1])

    db_loc, q_loc = local(val.database), local(val.queries)
    k = min(k, len(val.database))
    top = np.argsort(-(first_q @ first_db.T), axis=1, kind="stable")[:, :max(k, max(ns))]
    reranked = top.copy()
    for i in range(len(top)):
        cand = top[i, :k]
        reranked[i, :k] = cand[rerank(q_loc[i], db_loc[cand])[0]]
    out = {str(n): v for n, v in recall_at_n(reranked, val.positives, ns).items()}
    out.update({f"first_{n}": v for n, v in recall_at_n(top, val.positives, ns).items()})
    return out


class FirstStage:
    """First-stage descriptors of the training images and of the validation split."""

    def __init__(self, model: str, weights: Optional[str], places: PlaceSet,
                 val: Optional[ValidationSet], progress: bool = False, device: str = "cpu"):
        try:
            self.describer = first_stage_describer(model, weights, device)
        except VprError as exc:   # unknown card, missing or mismatched weights
            raise ConfigError(f"mining.model {model!r}: {exc}") from None
        if self.describer.card.architecture == "selavpr":
            raise ConfigError(f"mining.model {model!r} is a re-ranker; name the first-stage "
                              "global model (e.g. demo_tiny)")
        paths = [p for place in places.places for p in place.images]
        log.info("describing %d training images with the first stage %s", len(paths),
                 self.describer.card.name)
        self.images = torch.from_numpy(self.describer.describe_files(paths, progress))
        self.places = place_descriptors(self.images.numpy(), places)
        self.val_db = self.val_q = None
        if val is not None:
            self.val_db = self.describer.describe_files(val.database, progress)
            self.val_q = self.describer.describe_files(val.queries, progress)
