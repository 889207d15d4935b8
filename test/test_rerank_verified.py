"""The verified exact re-ranking path: int16 code similarities with a fused top-2 in the
native kernels, exact float32 re-computation of the ambiguous rows and columns.

Its counts must be those of the plain float32 path (``native=False``) and of the official
algorithm, on every fixture set (``VPR_REFERENCE_DIR``), on maps full of exact ties, on
shapes that do not fill the kernel's tiles, and on features that are not unit vectors.
Where it cannot be trusted (non-finite values, magnitudes int16 codes cannot hold) the
plain path must run instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (RERANK_ODD_SHAPES, official_mnn_counts, rerank_extreme_maps,
                      rerank_odd_shape_maps, rerank_tie_maps, selavpr_reference_sets)
from vpr_ros.accel.int8_kernels import mnn_query_layout
from vpr_ros.models import rerank as R
from vpr_ros.models.rerank import mutual_nn_counts


def _both(query, cands):
    """(verified, plain) counts and the verified path's stats; the fused path and the
    automatic choice must give the plain counts too."""
    stats = {}
    fast = mutual_nn_counts(query, cands, stats=stats, path="verified")
    plain = mutual_nn_counts(query, cands, native=False)
    fused_stats = {}
    fused = mutual_nn_counts(query, cands, stats=fused_stats, path="fused")
    assert fused.tolist() == plain.tolist()
    assert mutual_nn_counts(query, cands).tolist() == plain.tolist()
    return fast, plain, stats


def test_reference_sets_exact_and_verified_path_ran(reference, kernels):
    for name, feats, expected in selavpr_reference_sets(reference):
        for i in range(feats.shape[0]):
            fast, plain, stats = _both(feats[i], feats)
            np.testing.assert_array_equal(fast.numpy(), expected[i], err_msg=name)
            np.testing.assert_array_equal(plain.numpy(), expected[i], err_msg=name)
            assert stats["rows"] == feats.shape[0] * feats[0].shape[0] * feats[0].shape[1]
            # the query itself is a candidate: its self-matches tie at the top of nothing,
            # but near-duplicate points make some rows ambiguous; most are decided in int16
            assert 0 < stats["rows_recomputed"] < 0.2 * stats["rows"]
            fused_stats = {}
            mutual_nn_counts(feats[i], feats, path="fused", stats=fused_stats)
            assert fused_stats.get("fused") == feats.shape[0]      # the fused path ran


@pytest.mark.parametrize("seed", range(4))
def test_exact_ties_follow_the_first_index(kernels, seed):
    """Repeated points (flat image regions) tie exactly in both directions."""
    q, cands = rerank_tie_maps(seed)
    fast, plain, stats = _both(q, cands)
    assert fast.tolist() == plain.tolist() == official_mnn_counts(q, cands)
    assert stats["rows_recomputed"] > 0 and stats["cols_recomputed"] > 0


@pytest.mark.parametrize("shape", RERANK_ODD_SHAPES)
def test_shapes_that_do_not_fill_the_tiles(kernels, shape):
    q, cands = rerank_odd_shape_maps(shape)
    fast, plain, _ = _both(q, cands)
    assert fast.tolist() == plain.tolist() == official_mnn_counts(q, cands)


def test_not_unit_vectors_and_extreme_values(kernels):
    q, cands = rerank_extreme_maps()
    fast, plain, stats = _both(q, cands)
    assert fast.tolist() == plain.tolist() == official_mnn_counts(q, cands)
    assert stats["rows"] == 4 * 400                  # the 1e-36 map went the plain way
    nan = cands[3].copy()
    nan[0, 0, 0] = np.nan
    fast, plain, _ = _both(q, [nan, cands[0]])
    assert fast.tolist() == plain.tolist()


def test_kernel_generic_and_vector_code_agree(kernels):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((150, 24)).astype(np.float32)
    x = rng.standard_normal((93, 24)).astype(np.float32)
    x[10:20] = x[10]
    qc, xc = R._Codes(kernels, q, 1), R._Codes(kernels, x, 4)
    layout = mnn_query_layout(qc.codes)
    vec = kernels.mnn_top2(xc.codes, 93, layout, 150)
    gen = kernels.mnn_top2(xc.codes, 93, layout, 150, generic=True)
    for a, b in zip(vec, gen):
        np.testing.assert_array_equal(a, b)
    codes = xc.codes[:93].astype(np.int64) @ qc.codes.astype(np.int64).T    # the exact integers
    np.testing.assert_array_equal(vec[0], codes.max(1))
    np.testing.assert_array_equal(vec[1], codes.argmax(1))
    np.testing.assert_array_equal(vec[3], codes.max(0))
    np.testing.assert_array_equal(vec[4], codes.argmax(0))
    top2 = -np.sort(-codes, axis=1)[:, 1]
    np.testing.assert_array_equal(vec[2], top2)
    np.testing.assert_array_equal(vec[5], -np.sort(-codes, axis=0)[1])


def test_codes_never_overflow_int32(kernels):
    """Largest norms and components: the code products stay exact (no wrap-around)."""
    c = 128
    q = np.zeros((64, c), np.float32)
    q[0] = 1.0 / np.sqrt(c)                                 # largest norm spread evenly
    q[1, 0] = 1.0                                           # largest single component
    q[2] = -q[0]
    x = q[:4].copy()
    qc, xc = R._Codes(kernels, q, 1), R._Codes(kernels, x, 4)
    norms = np.sqrt((qc.codes.astype(np.float64) ** 2).sum(1)).max() * \
        np.sqrt((xc.codes.astype(np.float64) ** 2).sum(1)).max()
    assert norms < 2 ** 31
    out = kernels.mnn_top2(xc.codes, 4, mnn_query_layout(qc.codes), 64)
    exact = xc.codes[:4].astype(np.int64) @ qc.codes.astype(np.int64).T
    np.testing.assert_array_equal(out[0], exact.max(1))


def test_exact_recomputation_equals_blas_bit_for_bit(kernels):
    """The assumption of the recomputation, on map-sized operands: numpy's (and torch's)
    float32 matmul computes each dot product as one in-order FMA chain."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((400, 128)).astype(np.float32)
    b = rng.standard_normal((3721, 128)).astype(np.float32)
    full = a @ b.T
    assert np.array_equal(full, (torch.from_numpy(a) @ torch.from_numpy(b).T).numpy())
    idx, val = kernels.exact_argmax(a, kernels.pack_panels(b), np.arange(400), values=True)
    np.testing.assert_array_equal(idx, full.argmax(1))
    np.testing.assert_array_equal(val, full.max(1))
    gen = kernels.exact_argmax(a, kernels.pack_panels(b), np.arange(0, 400, 9), generic=True,
                               values=True)
    np.testing.assert_array_equal(gen[1], full.max(1)[::9])
    assert R._blas_is_fma_chain(kernels)
    m = kernels.fma_matrix(a[:50], b[:300])
    np.testing.assert_array_equal(m, full[:50, :300])


def test_native_false_and_disabled_kernels_use_the_plain_path(monkeypatch):
    q = F.normalize(torch.randn(8, 8, 8), dim=-1)
    cands = F.normalize(torch.randn(3, 8, 8, 8), dim=-1)
    stats = {}
    mutual_nn_counts(q, cands, native=False, stats=stats)
    assert stats == {}
    monkeypatch.setenv("VPR_ROS_NATIVE_KERNELS", "0")       # the documented override
    mutual_nn_counts(q, cands, stats=stats)
    assert stats == {}
