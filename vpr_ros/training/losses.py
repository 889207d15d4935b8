"""Training losses, written from the papers' definitions.

* Multi-similarity miner + loss (Wang et al., CVPR 2019) as SciceVPR / Super-CricaVPR
  train with it: miner on cosine similarity with margin ``epsilon`` = 0.1, loss on the
  dot product with alpha = 1, beta = 50, base (lambda) = 0, averaged over all anchors of
  the batch (anchors without mined pairs contribute 0).
* Distillation loss of SciceVPR: squared L2 distance between the student's and the
  frozen teacher's descriptors of the same image, averaged over the batch.
* SelaVPR: global triplet margin loss (L2 distance, margin 0.1) and the local loss on
  dense features, max(0, sim(anchor, negative) - sim(anchor, positive)), where sim is
  the mean dot product over mutual-nearest-neighbour point matches.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- multi-similarity

def pair_masks(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, B) boolean masks of positive pairs (same label, i != j) and negative pairs."""
    same = labels.view(-1, 1) == labels.view(1, -1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


@torch.no_grad()
def multi_similarity_mine(descriptors: torch.Tensor, labels: torch.Tensor,
                          epsilon: float = 0.1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Informative pairs of a batch, as boolean masks (pos_mask, neg_mask).

    With S the cosine similarity matrix, for every anchor a:
    a negative pair (a, n) is kept when S[a, n] + epsilon > the smallest positive
    similarity of a; a positive pair (a, p) is kept when S[a, p] - epsilon < the largest
    negative similarity of a.  Anchors lacking positives or negatives keep nothing.
    """
    x = F.normalize(descriptors.detach().float(), dim=1)
    sim = x @ x.T
    pos, neg = pair_masks(labels)
    inf = torch.tensor(float("inf"), device=sim.device)
    hardest_pos = torch.where(pos, sim, inf).min(dim=1, keepdim=True).values    # +inf if none
    hardest_neg = torch.where(neg, sim, -inf).max(dim=1, keepdim=True).values   # -inf if none
    neg_keep = neg & (sim + epsilon > hardest_pos)
    pos_keep = pos & (sim - epsilon < hardest_neg)
    return pos_keep, neg_keep


def _log1p_sum_exp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise log(1 + sum_{mask} exp(values)); 0 for rows with an empty mask."""
    masked = values.masked_fill(~mask, float("-inf"))
    zeros = torch.zeros(values.shape[0], 1, dtype=values.dtype, device=values.device)
    out = torch.logsumexp(torch.cat([zeros, masked], dim=1), dim=1)
    return out * mask.any(dim=1).to(values.dtype)


def multi_similarity_loss(descriptors: torch.Tensor, labels: torch.Tensor,
                          pos_mask: torch.Tensor = None, neg_mask: torch.Tensor = None,
                          alpha: float = 1.0, beta: float = 50.0,
                          base: float = 0.0) -> torch.Tensor:
    """Multi-similarity loss over the given pairs (all pairs when no masks are given)."""
    d = descriptors.float()
    sim = d @ d.T
    if pos_mask is None or neg_mask is None:
        pos_mask, neg_mask = pair_masks(labels)
    pos_term = _log1p_sum_exp(-alpha * (sim - base), pos_mask) / alpha
    neg_term = _log1p_sum_exp(beta * (sim - base), neg_mask) / beta
    return (pos_term + neg_term).mean()


class MultiSimilarity(torch.nn.Module):
    """Miner + loss as one callable; ``last_mined_fraction`` is logged by the trainer."""

    def __init__(self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0,
                 epsilon: float = 0.1):
        super().__init__()
        self.alpha, self.beta, self.base, self.epsilon = alpha, beta, base, epsilon
        self.last_mined_fraction = 0.0

    def forward(self, descriptors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pos, neg = multi_similarity_mine(descriptors, labels, self.epsilon)
        self.last_mined_fraction = float((pos.any(1) | neg.any(1)).float().mean())
        return multi_similarity_loss(descriptors, labels, pos, neg,
                                     self.alpha, self.beta, self.base)


# --------------------------------------------------------------------------- distillation

def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||student - teacher||^2 (the teacher side gets no gradient)."""
    diff = student.float() - teacher.detach().float()
    return diff.pow(2).sum(dim=1).mean()


# --------------------------------------------------------------------------- SelaVPR

def mutual_nn_similarity(anchor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean dot product over the mutual-nearest-neighbour matches of two dense maps.

    anchor, other: (H, W, C) or (P, C), L2-normalised per point; the model package's
    training similarity (:func:`vpr_ros.models.rerank.train_similarity`, checked against
    the official ``local_sim(trainflag=True)`` there).  Differentiable in the matched
    features (the matching itself is a hard selection).
    """
    from ..models.rerank import train_similarity

    return train_similarity(anchor.unsqueeze(0), other.unsqueeze(0))[0]


def triplet_indices(descriptors: torch.Tensor, labels: torch.Tensor, negatives: int = 2,
                    anchors_per_place: int = 1) -> torch.Tensor:
    """(T, 3) anchor/positive/negative indices mined inside a P x K batch.

    For the first ``anchors_per_place`` images of every place: the positive is the
    closest other image of the place (global descriptor), the negatives are the
    ``negatives`` closest images of other places (hardest negatives), as SelaVPR's
    partial mining picks them from its cache.
    """
    with torch.no_grad():
        d = descriptors.detach().float()
        dist = torch.cdist(d, d)
        pos, neg = pair_masks(labels)
        out = []
        seen = {}
        for i in range(len(labels)):
            lab = int(labels[i])
            seen[lab] = seen.get(lab, 0) + 1
            if seen[lab] > anchors_per_place or not pos[i].any() or not neg[i].any():
                continue
            p = int(torch.where(pos[i], dist[i], torch.inf).argmin())
            k = min(negatives, int(neg[i].sum()))
            ns = torch.where(neg[i], dist[i], torch.inf).topk(k, largest=False).indices
            out.extend((i, p, int(n)) for n in ns)
    return torch.tensor(out, dtype=torch.long, device=labels.device).view(-1, 3)


def soft_mutual_nn_count(anchor: torch.Tensor, other: torch.Tensor,
                         temperature: float = 0.05) -> torch.Tensor:
    """Pairwise soft mutual-nearest-neighbour count of local maps, / points -> (B,).

    anchor, other: (B, H, W, C) or (B, P, C), unit points.  With S the (P, P) dot
    products, sum over (i, j) of softmax_j(S / t)[i, j] * softmax_i(S / t)[i, j] (the
    "dual softmax"): as t -> 0 it is the number of mutual nearest neighbours, the count
    re-ranking sorts by; divided by the anchor's number of points, in [0, 1].
    """
    a = anchor.float().flatten(1, -2)
    o = other.float().flatten(1, -2)
    sim = torch.bmm(a, o.transpose(1, 2)) / temperature
    soft = torch.softmax(sim, dim=2) * torch.softmax(sim, dim=1)
    return soft.sum(dim=(1, 2)) / a.shape[1]


def selavpr_losses(global_desc: torch.Tensor, local_feats: torch.Tensor,
                   triplets: torch.Tensor, margin: float = 0.1, local: str = "mutual_nn",
                   local_margin: float = 0.0,
                   temperature: float = 0.05) -> Tuple[torch.Tensor, torch.Tensor]:
    """(global triplet loss, local loss), each averaged over the triplets.

    ``local``: ``mutual_nn`` (official, ``local_margin`` 0): max(0, m + sim_n - sim_p)
    on the mean dot product of mutual-NN matches; ``dual_softmax``: the same hinge on
    :func:`soft_mutual_nn_count`.
    """
    if len(triplets) == 0:
        zero = global_desc.sum() * 0.0
        return zero, zero
    a, p, n = triplets.T
    g = global_desc.float()
    global_loss = F.triplet_margin_loss(g[a], g[p], g[n], margin=margin, p=2, reduction="sum")
    from ..models.rerank import train_similarity

    feats = local_feats.float()
    if local == "dual_softmax":
        sim_p = soft_mutual_nn_count(feats[a], feats[p], temperature)
        sim_n = soft_mutual_nn_count(feats[a], feats[n], temperature)
    elif local == "mutual_nn":
        sim_p = train_similarity(feats[a], feats[p])
        sim_n = train_similarity(feats[a], feats[n])
    else:
        raise ValueError(f"unknown local loss {local!r}")
    local_loss = torch.clamp(local_margin + sim_n - sim_p, min=0.0).sum()
    t = float(len(triplets))
    return global_loss / t, local_loss / t
