"""The benchmark baselines and prototypes compute what they claim to compute.

Speed claims in benchmarks/ are only meaningful if the baselines are faithful and the
fast paths give the same answers; these tests check that on small real inputs (no
wall-clock assertions here: speed lives in benchmarks/).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import bench_rerank, synthetic_map
from vpr_ros.models.rerank import mutual_nn_counts


def test_official_style_counts_match_reference_and_package(reference):
    data = np.load(reference / "selavpr_outputs.npz")
    feats = torch.from_numpy(data["local_feats"]).float()          # (5, 61, 61, C)
    expected = data["mutual_nn_counts"]
    n, h, w, c = feats.shape
    flat = feats.reshape(n, h * w, c)
    for i in range(n):
        base = bench_rerank.official_style_counts(flat[i], flat)
        assert base.tolist() == expected[i].tolist()
        assert torch.equal(base, mutual_nn_counts(flat[i], flat))


def test_benchmark_int8_store_is_the_package_storage():
    """bench_rerank's int8 variant must measure the map storage the package writes."""
    x = torch.nn.functional.normalize(torch.randn(2, 50, 128), dim=-1).half()
    store = bench_rerank.int8_store(x)
    from vpr_ros.maps.local_store import Int8LocalFeatures, quantize_int8
    assert isinstance(store, Int8LocalFeatures) and store.unit_norm
    codes, scales = quantize_int8(x.float().numpy())
    np.testing.assert_array_equal(store.codes, codes)
    np.testing.assert_array_equal(store.scales, scales)
    back = store[1]
    assert back.shape == (50, 128)
    cos = (back * x[1].float().numpy()).sum(-1)
    assert cos.min() > 0.999


def test_synthetic_maps_have_spread_of_counts():
    q, c = bench_rerank.synthetic_maps(1, 6, seed=3)
    assert q.shape == (1, 61 * 61, 128) and c.shape == (1, 6, 61 * 61, 128)
    assert q.dtype == torch.float16
    counts = bench_rerank.official_style_counts(q[0].float(), c[0])
    assert counts.max() > 1.5 * counts.min()        # similar and dissimilar candidates


def test_eager_baseline_equals_package_fp32():
    from benchmarks import bench_descriptors
    from vpr_ros.inference import GlobalDescriber
    d = GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="fp32")
    base = bench_descriptors.eager_baseline(d.model).eval()
    fused = [m for m in base.modules() if hasattr(m, "fused_attn")]
    assert fused and not any(m.fused_attn for m in fused)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = d.describe_tensor(x)
        out = base(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_closed_form_reduced_places_match_the_full_dimensional_path():
    import faiss
    spec = synthetic_map.SyntheticSpec(dim=1536, latent=16, route_len=200, seed=1)
    gen = synthetic_map.SyntheticPlaces(spec)
    full = gen.places(0, 1000)
    pca = faiss.PCAMatrix(spec.dim, 64)
    pca.train(gen.places(1000, 4000))            # learnt on other places, as build_cache does
    red = synthetic_map.ReducedGenerator(gen, pca)
    targets = np.arange(0, 1000, 7)
    long_way = synthetic_map._neighbour_stats(pca.apply_py(full),
                                              pca.apply_py(gen.queries(targets, 1)), targets)
    closed = synthetic_map._neighbour_stats(red.places(0, 1000), red.queries(targets, 2), targets)
    for key in ("cos_query_truth_mean", "cos_next_place_mean", "cos_random_pair_mean"):
        assert abs(long_way[key] - closed[key]) < 0.03, (key, long_way, closed)


def test_generator_is_deterministic_and_chunk_independent():
    spec = synthetic_map.SyntheticSpec(dim=256, latent=8, route_len=50, seed=2)
    gen = synthetic_map.SyntheticPlaces(spec)
    z_all = gen.latents(0, 120)
    z_parts = np.concatenate([gen.latents(0, 70), gen.latents(70, 120)])
    assert np.array_equal(z_all, z_parts)
    assert np.array_equal(gen.latents_of(np.array([5, 60, 119])), z_all[[5, 60, 119]])
    x = gen.places(0, 10)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_recall_helpers_on_hand_cases():
    pred = np.array([[5, 1, 2], [9, 8, 7]])
    exact = np.array([[5, 2, 1], [8, 9, 7]])
    r = synthetic_map.agreement_recall(pred, exact, ns=(1, 3))
    assert r["recall@1"] == 0.5 and r["recall@3"] == 1.0
    p = synthetic_map.place_recall(pred, np.array([3, 20]), tolerance=2, ns=(1, 3))
    assert p["R@1"] == 0.5 and p["R@3"] == 0.5


@pytest.mark.parametrize("n", [1000])
def test_reduced_map_views_are_normalised(tmp_path, n):
    spec = synthetic_map.SyntheticSpec(dim=768, latent=16, route_len=250, seed=4)
    folder = synthetic_map.build_cache(n, [n], n_queries=20, d_out=64, n_train=256, chunk=500,
                                       fidelity_places=500, n_fidelity_queries=10, spec=spec,
                                       cache_dir=tmp_path, progress=False)
    m = synthetic_map.ReducedMap(folder)
    db = m.database(n, 32)
    q, t = m.queries(n, 32)
    assert db.shape == (n, 32) and q.shape == (20, 32) and t.max() < n
    assert np.allclose(np.linalg.norm(db, axis=1), 1, atol=1e-5)
    fdb, fq, ft, gt = m.fidelity_set(32)
    assert fdb.shape == (500, 32) and gt.shape == (10, 10)
    # cache is reused, not regenerated
    again = synthetic_map.build_cache(n, [n], n_queries=20, d_out=64, spec=spec, cache_dir=tmp_path)
    assert again == folder


def test_benchmark_baselines_agree_with_each_other_and_the_package(reference):
    """The official batched transcription (the benchmark's baseline), the per-candidate
    loop and the package give the same counts, also with exact ties."""
    data = np.load(reference / "selavpr_outputs.npz")
    feats = torch.from_numpy(data["local_feats"]).float()
    n, h, w, c = feats.shape
    flat = feats.reshape(n, h * w, c)
    for i in range(n):
        batched = bench_rerank.official_batched_counts(flat[i], flat)
        assert torch.equal(batched, bench_rerank.official_style_counts(flat[i], flat))
        assert torch.equal(batched, mutual_nn_counts(flat[i], flat))
    q = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    cand = q[torch.tensor([3, 3, 7, 7] + list(range(36)))].unsqueeze(0)
    assert torch.equal(bench_rerank.official_batched_counts(q, cand),
                       bench_rerank.official_style_counts(q, cand))
    assert torch.equal(mutual_nn_counts(q, cand), bench_rerank.official_style_counts(q, cand))


def test_interleaved_timing_runs_every_variant_in_turn():
    """The shared timing loop (benchmarks/common.py, used by bench_int8_forward for its
    A/B runs): warm-ups first, then rounds in order, every other round reversed when asked;
    one wall and one CPU time per call."""
    from benchmarks.common import interleaved_times, interleaved_wall_cpu

    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    wall, cpu = interleaved_wall_cpu(fns, 3, warmup=1, alternate=True)
    assert calls == list("ab" "ab" "ba" "ab")
    assert all(len(wall[k]) == len(cpu[k]) == 3 for k in "ab")
    assert min(min(v) for v in cpu.values()) >= 0.0
    calls.clear()
    assert sorted(interleaved_times(fns, 2, warmup=0)) == ["a", "b"]
    assert calls == list("abab")


def test_vnni_peak_benchmark_measures_and_refuses_bad_input(tmp_path):
    """The peak program of ``bench_vnni_peak.py`` compiles and runs where the CPU has
    AVX-512 VNNI, its table renders, and bad input is one line with exit status 2."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks import bench_vnni_peak

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "benchmarks" / "bench_vnni_peak.py"),
                           "--threads", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    try:
        exe = bench_vnni_peak.build_peak(tmp_path)
    except bench_vnni_peak.PeakUnavailable as exc:
        pytest.skip(str(exc))
    assert bench_vnni_peak.peak_rate(exe, 2, 3_200_000, 1) > 0
    shape = {"k": 768, "n": 768, "hot_s": 1e-3, "cold_s": 2e-3, "hot_gmacs": 400.0,
             "cold_gmacs": 300.0}
    res = {"date_utc": "2026-12-07 22:00", "machine": {}, "threads": 2, "repeats": 1,
           "rows": 257, "omp_wait_policy": "PASSIVE", "peak_gmacs_1_thread": 234.0,
           "peak_gmacs": 468.0, "shapes": {"768x768": shape},
           "models": {"SciceVPR-B": {"gmacs": 21.8, "floor_s": 0.047, "cold_s": 0.053}}}
    text = bench_vnni_peak.markdown(res)
    assert "| 768x768 | 400 | 85% | 300 | 64% |" in text and "47 ms" in text
    # the floors: ViT-B's 4 layer shapes x 12 blocks at 257 rows = 21.8 G multiply-adds
    shapes = {f"{k}x{n}": {"cold_s": 1e-3} for model in bench_vnni_peak.SHAPES.values()
              for k, n in model}
    floors = bench_vnni_peak.model_floors(400.0, shapes)
    vit_b = floors["SciceVPR-B"]
    assert vit_b["gmacs"] == pytest.approx(257 * 12 * (768 * 2304 + 768 * 768 + 2 * 768 * 3072)
                                           / 1e9)
    assert vit_b["floor_s"] == pytest.approx(vit_b["gmacs"] / 400.0)
    assert vit_b["cold_s"] == pytest.approx(48 * 1e-3)
    assert floors["SelaVPR ViT-L"]["gmacs"] == pytest.approx(90.5, abs=0.05)
