"""The fused exact re-ranking path: every float32 similarity one in-order FMA chain (the
BLAS value), both argmaxes (first index on ties) in one pass, the matrix never stored.

Its counts must be those of the plain float32 path and of the official algorithm: on every
fixture set (``VPR_REFERENCE_DIR``; in test_rerank_verified.py, which runs every path
there), on the shipped demo re-ranker's map shape (29x29x32)
and smaller ones (15x15, 8x8), with exact ties in both directions, for shapes that do not
fill its tiles, one or many candidates (work split inside a candidate), and it must step
aside where numpy's BLAS does not sum as it does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import official_mnn_counts
from vpr_ros.models import rerank as R
from vpr_ros.models.rerank import mutual_nn_counts


def _fused(query, cands):
    stats = {}
    counts = mutual_nn_counts(query, cands, path="fused", stats=stats)
    return counts.tolist(), stats


def _collapsed(seed: int, side: int, channels: int, k: int, spread: float = 0.02):
    """Near-collapsed unit features, as the trained demo re-ranker's: near ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(channels, generator=g)
    q = F.normalize(common + spread * torch.randn(side, side, channels, generator=g), dim=-1)
    cands = F.normalize(common + spread * torch.randn(k, side, side, channels, generator=g),
                        dim=-1)
    cands[0] = q
    return q, cands


@pytest.mark.parametrize("side", [29, 15, 8])
def test_demo_shapes_near_ties_exact(kernels, side):
    """The demo re-ranker's 29x29x32 maps (and smaller ones a retrained model may have):
    near-collapsed features; every path, the automatic choice and the official counts agree."""
    q, cands = _collapsed(side, side, 32, 12)
    want = official_mnn_counts(q, cands)
    counts, stats = _fused(q, cands)
    assert counts == want
    assert stats["fused"] == 12
    auto = {}
    assert mutual_nn_counts(q, cands, stats=auto).tolist() == want
    assert auto.get("fused") == 12                       # small maps: the fused path
    assert mutual_nn_counts(q, cands, native=False).tolist() == want
    assert mutual_nn_counts(q, cands, path="verified").tolist() == want


@pytest.mark.parametrize("seed", range(3))
def test_exact_ties_follow_the_first_index(kernels, seed):
    """Repeated points and exactly equal values tie in both directions: first index wins,
    also across the ranges a candidate is split into (one candidate: several work items)."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(29, 29, 32, generator=g), dim=-1)
    cands = F.normalize(torch.randn(5, 29, 29, 32, generator=g), dim=-1)
    q[:4] = q[0]                                   # repeated query rows
    q[10, 3:20] = q[10, 3]
    cands[:, 7:15] = cands[:, 7:8]                 # repeated candidate rows
    cands[1] = q
    cands[2, :, :9] = q[:, :9]
    cands[3] = torch.round(cands[3] * 2) / 2       # many exactly equal values
    cands[4] = torch.round(q * 2) / 2
    want = official_mnn_counts(q, cands)
    assert _fused(q, cands)[0] == want
    for i in range(len(cands)):                    # one candidate at a time: split work
        assert _fused(q, cands[i:i + 1])[0] == want[i:i + 1]


@pytest.mark.parametrize("shape", [(1, 1, 5), (1, 3, 2), (2, 17, 7), (3, 11, 33), (5, 7, 64),
                                   (16, 16, 128)])
def test_shapes_that_do_not_fill_the_tiles(kernels, shape):
    g = torch.Generator().manual_seed(sum(shape))
    h, w, c = shape
    q = torch.randn(h, w, c, generator=g)
    cands = torch.randn(3, h, w, c, generator=g)
    cands[1] = q
    assert _fused(q, cands)[0] == official_mnn_counts(q, cands)


@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_kernel_generic_vector_and_splits_agree(kernels, splits):
    """The AVX-512 loops and the plain C loops, with the work of a candidate split any way."""
    q, cands = _collapsed(splits, 13, 32, 4)
    qn = q.reshape(-1, 32).numpy()
    cs = [np.ascontiguousarray(c.reshape(-1, 32).numpy()) for c in cands]
    panels = kernels.pack_panels(qn)
    want = official_mnn_counts(q, cands)
    assert kernels.mnn_exact_counts(cs, panels, splits).tolist() == want
    assert kernels.mnn_exact_counts(cs, panels, splits, generic=True).tolist() == want


def test_mixed_candidate_sizes_and_storage(kernels):
    """Candidates of other sizes than the query, float16 (as maps store them), a sequence."""
    q, cands = _collapsed(7, 29, 32, 3)
    small = F.normalize(torch.randn(17, 23, 32, generator=torch.Generator().manual_seed(3)),
                        dim=-1)
    seq = [cands[0].numpy().astype(np.float16), small.numpy(), cands[2].numpy()]
    want = official_mnn_counts(q, [np.asarray(s, dtype=np.float32) for s in seq])
    assert mutual_nn_counts(q, seq, path="fused").tolist() == want
    assert mutual_nn_counts(q, seq).tolist() == want


def test_overflowing_and_non_finite_features_take_the_plain_path(kernels):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(9, 9, 16, generator=g)
    cands = torch.randn(3, 9, 9, 16, generator=g)
    cands[1] *= 1e37                                 # products overflow: never fused
    cands[2, 0, 0, 0] = float("nan")
    stats = {}
    got = mutual_nn_counts(q, cands, path="fused", stats=stats)
    assert stats["fused"] == 1
    assert got.tolist() == mutual_nn_counts(q, cands, native=False).tolist()


def test_blas_check_is_per_shape(kernels):
    """OpenBLAS sums some small shapes in another order (85x85x32 on Zen 4): the check runs
    on the maps' own shape there, and the fused path steps aside where it fails."""
    for shape in [(841, 841, 32), (225, 225, 32), (64, 64, 32), (85, 85, 32)]:
        n_x, n_q, c = shape
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n_x, c)).astype(np.float32)
        b = rng.standard_normal((n_q, c)).astype(np.float32)
        same = R._blas_is_fma_chain(kernels, c, n_x, n_q)
        if same:          # (a failed check may come from the check's own random data)
            np.testing.assert_array_equal(a @ b.T, kernels.fma_matrix(a, b))
        q = torch.from_numpy(b)
        cands = torch.from_numpy(np.stack([a, a[::-1].copy()]))
        stats = {}
        got = mutual_nn_counts(q, cands, path="fused", stats=stats).tolist()
        assert got == official_mnn_counts(q, cands)
        assert (stats.get("fused", 0) == 2) == same
    assert R._check_shape(3721, 3721, 128) == (256 + 3721 % 64, 256 + 3721 % 64)


def test_invalid_path_errors():
    with pytest.raises(ValueError, match="unknown exact re-ranking path"):
        mutual_nn_counts(torch.zeros(2, 3), torch.zeros(1, 2, 3), path="fast")


def test_auto_switches_near_tie_large_maps_to_fused(kernels, monkeypatch):
    """Maps above the fused size start on a verified path; near-collapsed features make
    the int16 path recompute most rows, so the remaining candidates go to the fused path,
    and make the int8 path's candidate pairs exceed its limit, so it hands them back to
    the fused path: same counts either way."""
    g = torch.Generator().manual_seed(11)
    n, c = 2100, 32                                  # n * n * c > FUSED_MAX_MACS
    assert not R._fused_first(n, n, c)
    common = torch.randn(c, generator=g)
    q = F.normalize(common + 0.002 * torch.randn(n, c, generator=g), dim=-1)
    cands = F.normalize(common + 0.002 * torch.randn(3, n, c, generator=g), dim=-1)
    want = mutual_nn_counts(q, cands, native=False).tolist()
    stats = {}
    assert mutual_nn_counts(q, cands, stats=stats, path="int8").tolist() == want
    assert stats["fused"] == 3 and stats["int8_handed_back"] >= 1 and "int8" not in stats
    stats = {}
    assert mutual_nn_counts(q, cands, stats=stats, path="verified").tolist() == want
    assert stats["rows"] == 3 * n and "fused" not in stats     # forced: no switch
    for vnni in (True, False):          # what "auto" takes with and without AVX-512 VNNI
        monkeypatch.setattr(kernels, "has_vnni", vnni)
        stats = {}
        assert mutual_nn_counts(q, cands, stats=stats).tolist() == want
        if vnni:
            assert stats["fused"] == 3 and stats["int8_handed_back"] >= 1
        else:
            assert stats["rows"] == n and stats["fused"] == 2


def test_verified_candidates_one_per_thread(kernels):
    """With several threads the verified path runs the candidates one per thread; the ones
    it cannot take (another shape, NaN, overflowing values) go the other ways; same counts."""
    g = torch.Generator().manual_seed(12)
    q = F.normalize(torch.randn(21, 19, 16, generator=g), dim=-1)
    cands = [F.normalize(torch.randn(21, 19, 16, generator=g), dim=-1).numpy()
             for _ in range(6)]
    cands[2] = cands[2].copy()
    cands[2][0, 0, 0] = float("nan")
    cands[3] = F.normalize(torch.randn(11, 7, 16, generator=g), dim=-1).numpy()
    cands[4] = q.numpy().copy()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        stats = {}
        got = mutual_nn_counts(q, cands, path="verified", stats=stats)
    finally:
        torch.set_num_threads(before)
    want = mutual_nn_counts(q, cands, native=False).tolist()
    assert got.tolist() == want
    finite = [i for i in range(6) if i != 2]
    assert [want[i] for i in finite] == official_mnn_counts(q, [cands[i] for i in finite])
    assert stats["rows"] == 21 * 19 * 4 + 11 * 7        # all but the NaN map verified


def test_shipped_demo_reranker_features_exact(kernels, sample_dir):
    """Real features of the shipped (trained) demo re-ranker on sample images, whatever its
    map size: every path (the int8 verified one included) and the automatic choice give
    the official counts, and the automatic choice is the fused path (its maps are small)."""
    from vpr_ros.inference import LocalFeatureExtractor
    from vpr_ros.preprocess import load_image

    paths = sorted((sample_dir / "images").rglob("*.jpg"))[::37][:8]
    _, local = LocalFeatureExtractor("demo_tiny_selavpr", device="cpu").extract(
        [load_image(p) for p in paths])
    local = np.asarray(local)
    for qi in (0, 3):
        want = official_mnn_counts(local[qi], local)
        stats = {}
        assert mutual_nn_counts(local[qi], local, stats=stats).tolist() == want
        assert stats.get("fused") == len(local)
        for path in ("fused", "int8", "verified", "plain"):
            assert mutual_nn_counts(local[qi], local, path=path).tolist() == want, path


def test_kernel_cache_option_reaches_the_reranking(tmp_path):
    """``kernel_cache`` (AccelOptions, node parameter, --kernel-cache) is where the re-ranking
    builds its kernels too, not only the int8 models."""
    from vpr_ros.accel.int8_kernels import native_kernels

    if native_kernels() is None:
        pytest.skip("no C compiler: the native kernels do not build here")
    rng = np.random.default_rng(3)
    q = rng.standard_normal((64, 16)).astype(np.float32)
    cands = rng.standard_normal((3, 64, 16)).astype(np.float32)
    cache = tmp_path / "kernels"
    got = mutual_nn_counts(q, cands, kernel_cache=str(cache))
    assert any(cache.rglob("*.so"))
    assert got.tolist() == mutual_nn_counts(q, cands, native=False).tolist()
