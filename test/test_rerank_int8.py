"""The int8 verified exact re-ranking path (issue 15): int8 code similarities for every
pair, candidate sets per row and column within the proven int8 bound, then exact int16
code similarities, then float32 values only where those cannot decide.

Its counts must be those of the plain float32 path (``native=False``) and of the official
algorithm: on every fixture set (``VPR_REFERENCE_DIR``), on the smooth 61x61x128 benchmark
maps (where most rows and columns have several int8 candidates), on exact ties in both
directions, on shapes that do not fill the kernel's tiles, and on extreme magnitudes.
Near-duplicate maps (candidate pairs beyond the limit) are handed back to the fused path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (RERANK_ODD_SHAPES, official_mnn_counts, rerank_extreme_maps,
                      rerank_odd_shape_maps, rerank_tie_maps, selavpr_reference_sets)
from vpr_ros.models import rerank as R
from vpr_ros.models.rerank import mutual_nn_counts


def _int8(query, cands, threads: int = 1):
    """(int8 counts, plain counts, the int8 path's stats) with ``threads`` torch threads
    (2: the candidates run one per thread)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        stats = {}
        fast = mutual_nn_counts(query, cands, stats=stats, path="int8")
    finally:
        torch.set_num_threads(before)
    plain = mutual_nn_counts(query, cands, native=False)
    return fast.tolist(), plain.tolist(), stats


def test_reference_sets_exact_and_int8_path_ran(reference, kernels):
    for name, feats, expected in selavpr_reference_sets(reference):
        for i in range(feats.shape[0]):
            for threads in (1, 2):
                fast, plain, stats = _int8(feats[i], feats, threads)
                assert fast == plain == expected[i].tolist(), name
                assert stats["int8"] == feats.shape[0], stats         # every candidate
                assert stats["int8_rows"] == feats.shape[0] * feats[0].shape[0] * feats[0].shape[1]


def test_smooth_benchmark_maps_use_every_level(kernels):
    """The 61x61x128 benchmark maps: most rows and columns have several int8 candidates,
    the int16 level decides most of them, float32 the rest; one candidate per thread."""
    from benchmarks.bench_rerank import synthetic_maps

    queries, cands = synthetic_maps(1, 5, seed=3)
    q, c = queries[0].float().numpy(), cands[0].float().numpy()
    fast, plain, stats = _int8(q, c, threads=2)
    assert fast == plain == official_mnn_counts(q, c)
    assert stats["int8"] == 5 and stats["int8_rows"] == 5 * 3721
    assert stats["int8_ambiguous_rows"] > 0 and stats["int8_ambiguous_cols"] > 0
    assert stats["int16_products"] > stats["fp32_products"] > 0
    # the automatic choice on this CPU
    auto = {}
    assert mutual_nn_counts(q, c, stats=auto).tolist() == plain
    assert auto.get("int8") == (5 if kernels.has_vnni else None)


def test_float16_candidates_widened_natively(kernels):
    """float16 candidate maps (the default local storage), as tensors or arrays, (P, C) or
    (H, W, C), give the counts of the same values in float32; the native widening is
    IEEE's for every one of the 65536 half values."""
    halves = np.arange(65536, dtype=np.uint16).view(np.float16)
    wide = kernels.half_to_float(halves)
    ref = halves.astype(np.float32)
    assert np.array_equal(np.isnan(wide), np.isnan(ref))
    assert np.array_equal(wide[~np.isnan(ref)], ref[~np.isnan(ref)])
    assert np.array_equal(np.signbit(wide), np.signbit(ref))
    from benchmarks.bench_rerank import synthetic_maps

    queries, cands = synthetic_maps(1, 4, seed=5)
    q, c16 = queries[0].float(), cands[0]                   # (4, 3721, 128) float16
    assert c16.dtype == torch.float16
    expected = mutual_nn_counts(q, c16.float().numpy(), path="int8").tolist()
    assert expected == official_mnn_counts(q.numpy(), c16.float().numpy())
    for as_given in (c16, c16.numpy(), c16.numpy().reshape(4, 61, 61, 128),
                     [m.reshape(61, 61, 128) for m in c16]):
        for threads in (1, 2):
            fast, _, stats = _int8(q, as_given, threads)
            assert fast == expected and stats["int8"] == 4
    # a float16 query (what the extractor gives the node) is widened the same way
    q16 = q.half()
    fast, _, _ = _int8(q16, c16, 2)
    assert fast == mutual_nn_counts(q16.float().numpy(), c16.float().numpy(),
                                    path="int8").tolist()
    # other dtypes keep the generic conversion (bfloat16 tensors have no numpy type)
    bf = c16.to(torch.bfloat16)
    fast, _, _ = _int8(q, bf, 2)
    assert fast == mutual_nn_counts(q, bf.float().numpy(), path="int8").tolist()


@pytest.mark.parametrize("seed", range(4))
def test_exact_ties_follow_the_first_index(kernels, seed):
    """Repeated points (flat image regions), a place seen again and coarsely rounded values
    tie exactly in both directions: the first index wins, as torch.argmax."""
    q, cands = rerank_tie_maps(seed)
    for threads in (1, 2):
        fast, plain, stats = _int8(q, cands, threads)
        assert fast == plain == official_mnn_counts(q, cands)
        assert stats["fp32_products"] > 0                     # ties reach the last level


def test_near_ties_below_the_int16_bound(kernels):
    """Points perturbed by ~1e-6: their int16 codes tie, only float32 tells them apart."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((150, 32)).astype(np.float32)   # large enough for BLAS's
    q = np.repeat(base, 3, axis=0) + rng.standard_normal((450, 32)).astype(np.float32) * 1e-6
    cands = [np.repeat(base[::-1], 3, axis=0)                   # in-order FMA kernels
             + rng.standard_normal((450, 32)).astype(np.float32) * 1e-6 for _ in range(3)]
    fast, plain, stats = _int8(q, cands)
    assert fast == plain == official_mnn_counts(q, cands)
    assert stats["int8"] == 3 and stats["fp32_products"] > 0


@pytest.mark.parametrize("shape", RERANK_ODD_SHAPES)
def test_shapes_that_do_not_fill_the_tiles(kernels, shape):
    q, cands = rerank_odd_shape_maps(shape)
    fast, plain, _ = _int8(q, cands, threads=2)
    assert fast == plain == official_mnn_counts(q, cands)


def test_not_unit_vectors_and_extreme_values(kernels):
    q, cands = rerank_extreme_maps()
    fast, plain, stats = _int8(q, cands)
    assert fast == plain == official_mnn_counts(q, cands)
    assert stats["int8"] + stats.get("int8_handed_back", 0) == 4     # the 1e-36 map: fused
    assert stats["fused"] >= 1
    nan = cands[3].copy()
    nan[0, 0, 0] = np.nan
    fast, plain, _ = _int8(q, [nan, cands[0]])
    assert fast == plain


def test_near_duplicate_maps_are_handed_back(kernels):
    """A constant map ties everywhere: the candidate pairs exceed the limit, the kernel
    stops early and the fused float32 path counts it."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((40, 40, 8)).astype(np.float32)
    flat = np.full((40, 40, 8), 0.25, np.float32)
    cands = [flat, rng.standard_normal((40, 40, 8)).astype(np.float32), flat * 0.5]
    for threads in (1, 2):
        fast, plain, stats = _int8(q, cands, threads)
        assert fast == plain == official_mnn_counts(q, cands)
        assert stats["int8_handed_back"] == 2 and stats["fused"] == 2 and stats["int8"] == 1
    # "auto" on maps large enough for the int8 path: the handed-back maps go to the
    # fused path (in one batch) after the pool, with the same counts
    from benchmarks.bench_rerank import synthetic_maps

    queries, real = synthetic_maps(1, 2, seed=7)
    q61, flat61 = queries[0].float().numpy(), np.full((61, 61, 128), 0.05, np.float32)
    cands = [flat61, real[0][0].float().numpy(), flat61 * 0.5, real[0][1].float().numpy()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        stats = {}
        auto = mutual_nn_counts(q61, cands, stats=stats).tolist()
    finally:
        torch.set_num_threads(before)
    assert auto == official_mnn_counts(q61, cands)
    if kernels.has_vnni:
        assert stats["int8_handed_back"] == 2 and stats["fused"] == 2 and stats["int8"] == 2


def test_kernel_generic_and_vector_code_agree(kernels):
    """The plain C fallback (no AVX-512 VNNI) and the vector code give the same counts
    and the same statistics on maps with ties and near ties."""
    from vpr_ros.accel.int8_kernels import MNN_ROWS, mnn_query_layout8

    rng = np.random.default_rng(3)
    q = rng.standard_normal((150, 24)).astype(np.float32)
    x = rng.standard_normal((93, 24)).astype(np.float32)
    x[10:20] = x[10]
    q[40:44] = x[11]
    verifier = R._Int8Verifier(kernels, q)
    xc = R._Codes8(kernels, x, 128, MNN_ROWS)
    row8, col8 = R._slacks(xc, verifier.qc, verifier.gamma, 8, np.int32)
    row16, col16 = R._slacks(xc, verifier.qc, verifier.gamma, 16, np.int64)
    layout, zero = mnn_query_layout8(verifier.qc.c8.view(np.int8))
    outs = [kernels.mnn_int8_count(xc.c8, xc.c16, x, layout, zero, verifier.qc.c16, q, row8,
                                   col8, row16, col16, 10 ** 6, generic=g)
            for g in (False, True)]
    assert outs[0][:5].tolist() == outs[1][:5].tolist()
    assert outs[0][0] == official_mnn_counts(q, [x])[0]
    # the code sets themselves: plain C and vector code agree bit for bit
    for offset in (0, 128):
        a = kernels.codes_8_16(x, 0.01, 0.0001, 96, offset)
        b = kernels.codes_8_16(x, 0.01, 0.0001, 96, offset, generic=True)
        assert all(np.array_equal(u, v) for u, v in zip(a[:2], b[:2]))
        np.testing.assert_allclose(a[2], b[2], rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1e-6, 3e4])
def test_native_bounds_are_the_python_bounds(kernels, scale):
    """vpr_int8_slacks (what the int8 path runs) gives exactly rerank._slacks's values."""
    from vpr_ros.accel.int8_kernels import MNN_ROWS

    rng = np.random.default_rng(int(scale * 7) % 1000)
    q = (rng.standard_normal((130, 40)) * scale).astype(np.float32)
    x = (rng.standard_normal((77, 40)) * scale).astype(np.float32)
    x[3] = 0.0
    verifier = R._Int8Verifier(kernels, q)
    xc, qc = R._Codes8(kernels, x, 128, MNN_ROWS), verifier.qc
    native = kernels.int8_slacks(xc.terms, qc.terms, (xc.s8, xc.s16), (qc.s8, qc.s16),
                                 verifier.gamma, R._MARGIN)
    python = (*R._slacks(xc, qc, verifier.gamma, 8, np.int32),
              *R._slacks(xc, qc, verifier.gamma, 16, np.int64))
    for a, b in zip(native, python):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_codes_and_bounds_hold(kernels):
    """The per-point error terms bound the real rounding errors of the codes, and every
    code similarity lies within the stated slack of the float32 value."""
    rng = np.random.default_rng(11)
    q = F.normalize(torch.randn(300, 64), dim=-1).numpy()
    x = F.normalize(torch.randn(200, 64), dim=-1).numpy()
    qc, xc = R._Codes8(kernels, q, 0, 1), R._Codes8(kernels, x, 128, 4)
    codes8 = xc.c8[:200].astype(np.int64) - 128
    assert np.abs(codes8).max() <= 127
    real = x.astype(np.float64) - xc.s8 * codes8
    assert (np.linalg.norm(real, axis=1) <= xc.err8).all()
    norms16 = np.linalg.norm(xc.c16[:200].astype(np.float64), axis=1)
    assert norms16.max() < 46340
    gamma = R._gamma(64)
    row8, col8 = R._slacks(xc, qc, gamma, 8, np.int32)
    sim32 = x @ q.T
    code_sim = codes8 @ (qc.c8.view(np.int8).astype(np.int64)).T
    distance = np.abs(code_sim * (xc.s8 * qc.s8) - sim32.astype(np.float64))
    # the slack is twice the largest distance of a row (or column), in code units
    assert (2 * distance.max(axis=1) / (xc.s8 * qc.s8) <= row8).all()
    assert (2 * distance.max(axis=0) / (xc.s8 * qc.s8) <= col8).all()
    del rng
