"""Mutual-nearest-neighbour re-ranking on small synthetic maps (fast; reference parity lives
in test_parity_selavpr.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_ros.models.rerank import (argmax_over_rows, mutual_nn_counts, official_scores, rerank,
                                   rerank_order, train_similarity)


def _maps(k, h=9, w=9, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(h, w, c, generator=g), dim=-1)
    cands = F.normalize(torch.randn(k, h, w, c, generator=g), dim=-1)
    return q, cands


def _reference_counts(q, cands):
    """Plain loop over candidates, straight from the definition."""
    qp = q.reshape(-1, q.shape[-1])
    out = []
    for cand in cands.reshape(cands.shape[0], -1, q.shape[-1]):
        s = cand @ qp.T
        best_c = s.argmax(0)
        best_q = s.argmax(1)
        out.append(int(sum(int(best_q[best_c[i]]) == i for i in range(qp.shape[0]))))
    return out


def test_counts_match_definition_and_identity():
    q, cands = _maps(6)
    cands[2] = q  # identical map: every point matches itself
    counts = mutual_nn_counts(q, cands)
    assert counts.dtype == torch.long and counts.shape == (6,)
    assert counts.tolist() == _reference_counts(q, cands)
    assert counts[2] == 81


def test_chunking_shapes_dtypes_and_numpy_agree():
    q, cands = _maps(7)
    base = mutual_nn_counts(q, cands)
    # one candidate per chunk
    assert torch.equal(mutual_nn_counts(q, cands, max_chunk_bytes=1), base)
    assert torch.equal(mutual_nn_counts(q.reshape(81, 8), cands.reshape(7, 81, 8)), base)
    assert torch.equal(mutual_nn_counts(q.numpy(), cands.numpy()), base)
    half = mutual_nn_counts(q.half(), cands.half().numpy())
    assert (half - base).abs().max() <= 2
    assert mutual_nn_counts(q, cands[:0]).shape == (0,)
    with pytest.raises(ValueError):
        mutual_nn_counts(q, torch.zeros(2, 81, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_equals_cpu():
    q, cands = _maps(5)
    assert torch.equal(mutual_nn_counts(q, cands, device="cuda").cpu(), mutual_nn_counts(q, cands))


def test_official_scores_quirk():
    scores = official_scores(torch.tensor([0, 1, 2, 3721]))
    assert scores.dtype == torch.float32
    assert scores.tolist() == [0.0, 0.0, 2.0, 3721.0]
    assert official_scores(np.array([1, 5])).tolist() == [0.0, 5.0]


def test_rerank_order_descending_ties_keep_first_stage_order():
    assert rerank_order(np.array([3.0, 9.0, 3.0, 7.0, 9.0])).tolist() == [1, 4, 3, 0, 2]
    assert rerank_order(torch.tensor([0.0, 0.0, 0.0])).tolist() == [0, 1, 2]


def test_rerank_convenience():
    q, cands = _maps(4, seed=3)
    cands[1] = q
    order, scores = rerank(q, cands)
    assert order[0] == 1 and scores[1] == 81.0


def test_train_similarity_properties_and_gradients():
    q, cands = _maps(3, seed=1)
    queries = q.unsqueeze(0).expand(3, -1, -1, -1).clone().requires_grad_(True)
    sims = train_similarity(queries, cands)
    assert sims.shape == (3,)
    sims.sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    # Identical maps: every point is its own match, similarity = 1.
    same = train_similarity(q.unsqueeze(0), q.unsqueeze(0))
    assert abs(float(same[0]) - 1.0) < 1e-5


def test_blocked_argmax_equals_torch_argmax_with_ties():
    g = torch.Generator().manual_seed(0)
    sim = torch.randint(0, 4, (3, 1300, 50), generator=g).float()  # many exact ties
    assert torch.equal(argmax_over_rows(sim, block=128), sim.argmax(dim=1))
    sim = torch.randn(2, 777, 40, generator=g)
    assert torch.equal(argmax_over_rows(sim, block=100), sim.argmax(dim=1))


@pytest.mark.parametrize("shape", [(3721, 300), (100, 37), (61, 61), (5, 3), (1, 4), (130, 7)])
@pytest.mark.parametrize("block", [None, 1, 7, 61, 64])
def test_first_argmax_over_rows_is_argmax_with_first_index_ties(shape, block):
    from vpr_ros.models.rerank import first_argmax_over_rows
    rng = np.random.default_rng(shape[0] * 7 + shape[1])
    smooth = rng.standard_normal(shape).astype(np.float32)
    ties = np.round(smooth * 2).astype(np.float32)          # many exact ties at the maximum
    for a in (smooth, ties):
        np.testing.assert_array_equal(first_argmax_over_rows(a, block),
                                      torch.from_numpy(a).argmax(0).numpy())
    nan = smooth.copy()
    nan[0, 0] = np.nan
    np.testing.assert_array_equal(first_argmax_over_rows(nan, block), np.argmax(nan, axis=0))


def test_cpu_counts_with_duplicate_points_follow_first_index_ties():
    """Maps whose points repeat exactly (flat image regions) tie exactly; the counts must
    still be those of the official argmax (first index), i.e. of the plain definition."""
    q, cands = _maps(5, h=12, w=12, c=4, seed=3)
    q[:6] = q[0]                                   # whole rows of identical points
    cands[:, 3:9] = cands[:, 3:4]
    cands[1] = q
    assert mutual_nn_counts(q, cands).tolist() == _reference_counts(q, cands)
    seq = [cands[i].numpy().astype(np.float16) for i in range(5)]   # any sequence of maps
    assert torch.equal(mutual_nn_counts(q, seq), mutual_nn_counts(q, cands.half()))
