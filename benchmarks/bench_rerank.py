"""Re-ranking: the official algorithm vs the package's exact, int8-storage and bf16 paths, \
and storage.

Local features are SelaVPR-shaped maps (61 x 61 x 128, unit vectors per point, stored
as float16 as a map stores them).  They are synthetic but have the spatial structure of
the real ones: SelaVPR upsamples a 16x16 token map with transposed convolutions, so
neighbouring points are strongly correlated and argmax decisions have near-ties.  Each
map is a smooth random field (16x16 latent map upsampled to 61x61) plus point noise;
a candidate shares a shifted, noisier copy of the query's latent field with a weight
that varies from candidate to candidate, so counts span a realistic range and the
re-ranked order is not trivial.

* ``official_batched``: the official algorithm as the official code runs it
  (``match_batch_tensor``): all K candidates in one batched matmul (K full 3721 x 3721
  similarity matrices at once), argmax over both axes, then a Python loop that counts
  the mutual pairs of each candidate with ``nonzero``.  This is the baseline of issue 6
  (written here, see ``official_batched_counts``).
* ``per_candidate_loop``: the same algorithm one candidate at a time (a leaner
  straightforward version: one 55 MB matrix alive at a time).  The package's speed-up is
  reported against both.
* ``package``: ``vpr_ros.models.rerank.mutual_nn_counts`` as shipped (exact; on CPUs
  with AVX-512 VNNI the int8 verified path: int8 code similarities, candidates within the
  proven bound per row and column resolved by exact int16 codes and float32 only where
  needed; the matrix is never stored).
* ``package_int16_verified``: the same with ``path="verified"`` (the int16 path: int16
  code similarities with a fused top-2, ambiguous rows and columns recomputed in float32;
  what "auto" takes without VNNI).
* ``package_plain``: the same with ``native=False`` (the path without a C compiler:
  numpy BLAS matmul into one reused buffer and tiled argmaxes, one candidate at a time).
* ``package_int8_storage``: the same, reading the candidates from int8 storage
  (``vpr_ros.maps.local_store``: codes + per-point float16 scale, 0.48 MB/place),
  dequantised one by one.
* ``bf16_compute``: ``mutual_nn_counts(..., compute="bf16")``.
* storage variants: effect on the counts and on the re-ranked order of int8 storage
  (the package's), PCA-64 float16 storage and bf16 compute, against float16 storage with
  exact float32 compute.

The benchmark *asserts* that the package's counts are identical to both baselines'.

Small maps (``small_maps`` in the output, issue 17): the shipped demo re-ranker
(``demo_tiny_selavpr``, trained; 29x29x32 maps when this was written, whatever its card
says now) extracts the local features of sample images; one query against K = 10 and
20 candidates through each exact CPU path (``mutual_nn_counts(path=...)``: ``auto`` as
shipped, ``fused``, ``int8``, ``verified``, ``plain``) and the official per-candidate loop, timed
interleaved with the shipped demo descriptor (``demo_tiny``, one image) in the same run,
so the re-ranking/descriptor ratio is of one machine state.  Counts asserted identical.

Run: ``python benchmarks/bench_rerank.py [--quick]``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (fmt, interleaved_times, md_table, median, peak_rss_mb,
                               reset_peak_rss, rss_mb, set_threads, topic_main)

H = W = 61
C = 128


def official_batched_counts(query, candidates):
    """The official algorithm in the official code's shape, on the CPU.

    query (P, C) float32 tensor, candidates (K, P, C) -> LongTensor (K,).  One batched
    similarity tensor (K, P, P) for all candidates, the best query point of every
    candidate point and the best candidate point of every query point (``torch.argmax``,
    first index on ties), then per candidate the query points whose best candidate
    point points back at them, counted through ``nonzero`` in a Python loop.
    """
    import torch
    with torch.no_grad():
        sims = torch.matmul(candidates.float(), query.T)          # (K, P_cand, P_query)
        best_cand = torch.argmax(sims, dim=1)                     # (K, P_query)
        best_query = torch.argmax(sims, dim=2)                    # (K, P_cand)
        back = best_query[torch.arange(sims.shape[0]).reshape(-1, 1), best_cand]
        mutual = torch.arange(sims.shape[-1]).repeat(sims.shape[0], 1) == back
        counts = torch.zeros(sims.shape[0], dtype=torch.long)
        for k in range(sims.shape[0]):
            counts[k] = torch.nonzero(mutual[k]).squeeze().numel()
    return counts


def official_style_counts(query, candidates):
    """Official algorithm, one candidate at a time: full matrix, argmax both ways.

    query (P, C) float32 tensor, candidates (K, P, C) float16/float32 -> LongTensor (K,).
    """
    import torch
    counts = []
    arange = torch.arange(query.shape[0])
    with torch.no_grad():
        for k in range(candidates.shape[0]):
            cand = candidates[k].float()
            sim = cand @ query.T                         # (P_cand, P_query)
            best_cand_for_query = sim.argmax(dim=0)      # (P_query,)
            best_query_for_cand = sim.argmax(dim=1)      # (P_cand,)
            mutual = best_query_for_cand[best_cand_for_query] == arange
            counts.append(int(mutual.sum()))
    return torch.tensor(counts, dtype=torch.long)


def synthetic_maps(n_queries: int, k: int, seed: int = 0):
    """-> queries (Q, P, C) float16, candidates (Q, K, P, C) float16."""
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)

    def field(latent):
        up = F.interpolate(latent, size=(H, W), mode="bilinear", align_corners=False)
        return up

    def finish(x, noise):
        x = x + noise * torch.randn(x.shape, generator=g)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], H * W, C)
        return F.normalize(x, dim=-1).to(torch.float16)

    qs, cs = [], []
    for _ in range(n_queries):
        lat = torch.randn(1, C, 16, 16, generator=g)
        qs.append(finish(field(lat), 0.3)[0])
        weights = torch.linspace(0.95, 0.0, k) ** 2
        weights = weights[torch.randperm(k, generator=g)]
        cand = []
        for w in weights:
            shift = int(torch.randint(-2, 3, (1,), generator=g))
            own = torch.randn(1, C, 16, 16, generator=g)
            mix = w * torch.roll(lat, shifts=shift, dims=3) + (1 - w) * own
            cand.append(field(mix))
        cs.append(finish(torch.cat(cand), 0.3))
    return torch.stack(qs), torch.stack(cs)


def int8_store(candidates):
    """(K, P, C) float16 tensor -> the package's int8 store of it (codes + scales)."""
    from vpr_ros.maps.local_store import Int8LocalFeatures, is_unit_norm, quantize_int8
    x = candidates.float().numpy()
    codes, scales = quantize_int8(x)
    return Int8LocalFeatures(codes, scales, unit_norm=is_unit_norm(x, tol=2e-3))


def pca_basis(samples, dim: int):
    import torch
    x = samples.float().reshape(-1, C)
    x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:20000]]
    _, _, v = torch.linalg.svd(x - x.mean(0), full_matrices=False)
    return v[:dim].T.contiguous()                      # (C, dim)


def bf16_counts(query, candidates):
    from vpr_ros.models.rerank import mutual_nn_counts
    return mutual_nn_counts(query, candidates, compute="bf16")


def int16_verified_counts(query, candidates):
    from vpr_ros.models.rerank import mutual_nn_counts
    return mutual_nn_counts(query, candidates, path="verified")


def plain_counts(query, candidates):
    from vpr_ros.models.rerank import mutual_nn_counts
    return mutual_nn_counts(query, candidates, native=False)


def int8_storage_counts(query, store):
    from vpr_ros.models.rerank import mutual_nn_counts
    return mutual_nn_counts(query, store)


def order_of(counts) -> np.ndarray:
    from vpr_ros.models.rerank import official_scores, rerank_order
    return rerank_order(official_scores(counts))


VARIANT_FUNCS = {"official_batched": "official_batched_counts",
                 "per_candidate_loop": "official_style_counts", "package": None,
                 "package_int16_verified": "int16_verified_counts",
                 "package_plain": "plain_counts",
                 "package_int8_storage": "int8_storage_counts", "bf16_compute": "bf16_counts"}


def _child_peak(path: str, name: str) -> None:
    """In a fresh process: load the maps, run one variant, print the extra peak RSS."""
    import json as _json

    import torch
    torch.set_num_threads(2)
    data = torch.load(path, weights_only=True)
    q, c = data["query"], data["candidates"]
    if VARIANT_FUNCS[name] is None:
        from vpr_ros.models.rerank import mutual_nn_counts as fn
    else:
        fn = globals()[VARIANT_FUNCS[name]]
    if name == "package_int8_storage":
        c = int8_store(c)                          # the store is the map's, not work space
    fn(q, c[:1] if name != "package_int8_storage" else [c[0]])   # import / allocator warm-up
    base = rss_mb()
    reset_peak_rss()
    fn(q, c)
    print(_json.dumps({"peak_extra_mb": peak_rss_mb() - base}))


def peak_in_subprocess(query, candidates, names) -> Dict[str, float]:
    """Extra peak RSS (MB) of each variant, each measured in its own fresh process.

    In-process peaks are meaningless here: freed similarity matrices stay in the
    allocator, so a second variant never raises the high-water mark.
    """
    import json as _json
    import subprocess
    import sys
    import tempfile

    import torch
    out: Dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/maps.pt"
        torch.save({"query": query.contiguous(), "candidates": candidates.contiguous()}, path)
        here = str(Path(__file__).resolve().parent)
        for name in names:
            code = (f"import sys; sys.path[:0] = [{here!r}, {str(Path(here).parent)!r}]; "
                    f"import benchmarks.bench_rerank as b; b._child_peak({path!r}, {name!r})")
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 timeout=1800)
            try:
                out[name] = _json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_mb"]
            except (IndexError, ValueError, KeyError):
                out[name] = float("nan")
    return out


def run(quick: bool) -> dict:
    import torch
    from vpr_ros.models.rerank import mutual_nn_counts
    set_threads(2)
    n_queries = 2
    ks = [20] if quick else [20, 100]
    results: Dict[str, dict] = {}
    for k in ks:
        queries, cands = synthetic_maps(n_queries, k, seed=k)
        qf = [q.float() for q in queries]
        # correctness first: identical counts for every query
        base_counts = [official_batched_counts(qf[i], cands[i]) for i in range(n_queries)]
        for i in range(n_queries):
            loop = official_style_counts(qf[i], cands[i])
            stats = {}
            pkg = mutual_nn_counts(qf[i], cands[i], stats=stats)
            assert stats.get("int8") or stats.get("rows"), \
                "no verified path ran (no C compiler?)"
            assert torch.equal(base_counts[i], int16_verified_counts(qf[i], cands[i]))
            assert torch.equal(base_counts[i], plain_counts(qf[i], cands[i]))
            assert torch.equal(base_counts[i], loop), "the two baselines disagree"
            assert torch.equal(base_counts[i], pkg), \
                f"package counts differ from the official counts: {pkg} vs {base_counts[i]}"
        stores = [int8_store(cands[i]) for i in range(n_queries)]
        reps = 2 if quick else 3
        times = interleaved_times({
            "official_batched": lambda: official_batched_counts(qf[0], cands[0]),
            "per_candidate_loop": lambda: official_style_counts(qf[0], cands[0]),
            "package": lambda: mutual_nn_counts(qf[0], cands[0]),
            "package_int16_verified": lambda: int16_verified_counts(qf[0], cands[0]),
            "package_plain": lambda: plain_counts(qf[0], cands[0]),
            "package_int8_storage": lambda: int8_storage_counts(qf[0], stores[0]),
            "bf16_compute": lambda: bf16_counts(qf[0], cands[0]),
        }, reps, warmup=1)
        mem = peak_in_subprocess(qf[0], cands[0], list(times))
        stats, auto = {}, {}
        mutual_nn_counts(qf[0], cands[0], stats=stats, path="verified")
        mutual_nn_counts(qf[0], cands[0], stats=auto)
        entry = {"k": k, "n_queries": n_queries, "counts_identical": True,
                 "auto_path": "int8" if auto.get("int8") else "int16 verified",
                 "recomputed_fraction": {"rows": stats["rows_recomputed"] / stats["rows"],
                                         "cols": stats["cols_recomputed"] / stats["cols"]},
                 "int8_path": ({"ambiguous_rows": auto["int8_ambiguous_rows"] / auto["int8_rows"],
                                "ambiguous_cols": auto["int8_ambiguous_cols"] / auto["int8_cols"],
                                "int16_products_per_point": auto["int16_products"]
                                / (auto["int8_rows"] + auto["int8_cols"]),
                                "fp32_products_per_point": auto["fp32_products"]
                                / (auto["int8_rows"] + auto["int8_cols"])}
                               if auto.get("int8") else None),
                 "count_range": [int(min(c.min() for c in base_counts)),
                                 int(max(c.max() for c in base_counts))],
                 "latency_s": {n: median(t) for n, t in times.items()},
                 "peak_extra_mb": mem}
        lat = entry["latency_s"]
        entry["speedup_vs_baseline"] = {n: lat["official_batched"] / v for n, v in lat.items()}
        entry["speedup_vs_per_candidate_loop"] = {n: lat["per_candidate_loop"] / v
                                                  for n, v in lat.items()}

        # storage variants: effect on counts and on the re-ranked order
        basis = pca_basis(cands[:, :4], 64)
        variants: Dict[str, List] = {"bf16_compute": [], "int8_storage": [],
                                     "pca64_fp16_storage": []}
        for i in range(n_queries):
            variants["bf16_compute"].append(bf16_counts(qf[i], cands[i]))
            variants["int8_storage"].append(int8_storage_counts(qf[i], stores[i]))
            qp = torch.nn.functional.normalize(qf[i] @ basis, dim=-1).half().float()
            cp = torch.nn.functional.normalize(cands[i].float() @ basis, dim=-1).half()
            variants["pca64_fp16_storage"].append(mutual_nn_counts(qp, cp))
        effects = {}
        for name, counts in variants.items():
            diffs = torch.cat([(c - b).abs().float() for c, b in zip(counts, base_counts)])
            rel = torch.cat([((c - b).abs().float() / b.clamp(min=1).float())
                             for c, b in zip(counts, base_counts)])
            same_top1 = np.mean([order_of(c)[0] == order_of(b)[0]
                                 for c, b in zip(counts, base_counts)])
            same_order = np.mean([np.array_equal(order_of(c), order_of(b))
                                  for c, b in zip(counts, base_counts)])
            # rank correlation of the scores
            rhos = []
            for c, b in zip(counts, base_counts):
                rc = np.argsort(np.argsort(c.numpy()))
                rb = np.argsort(np.argsort(b.numpy()))
                rhos.append(np.corrcoef(rc, rb)[0, 1])
            effects[name] = {"mean_abs_count_diff": float(diffs.mean()),
                             "max_abs_count_diff": float(diffs.max()),
                             "mean_rel_count_diff": float(rel.mean()),
                             "reranked_top1_identical": float(same_top1),
                             "reranked_order_identical": float(same_order),
                             "spearman_rho_mean": float(np.mean(rhos))}
        entry["storage_effects"] = effects
        results[f"top{k}"] = entry
        print(f"[rerank] top-{k}: "
              + ", ".join(f"{n} {v:.2f}s" for n, v in entry["latency_s"].items())
              + f"; effects {effects}", flush=True)
    bytes_per_place = {"float32": H * W * C * 4, "float16": H * W * C * 2,
                       "int8 + fp16 scale per point": H * W * C + H * W * 2,
                       "PCA-64 float16": H * W * 64 * 2}
    return {"shape": [H, W, C], "results": results, "small_maps": run_small(quick),
            "mb_per_place": {k: v / 2 ** 20 for k, v in bytes_per_place.items()}}


SMALL_PATHS = ("auto", "fused", "int8", "verified", "plain")


def run_small(quick: bool) -> dict:
    """The shipped demo re-ranker's maps (trained features: near ties everywhere)."""
    import torch

    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
    from vpr_ros.models.rerank import mutual_nn_counts
    from vpr_ros.preprocess import load_image
    set_threads(2)
    root = Path(__file__).resolve().parents[1] / "samples" / "nordland_mini" / "images"
    paths = sorted(root.rglob("*.jpg"))[:21]
    images = [load_image(p) for p in paths]
    extractor = LocalFeatureExtractor("demo_tiny_selavpr", device="cpu")
    _, local = extractor.extract(images)
    describer = GlobalDescriber("demo_tiny", device="cpu", batch_size=1)
    c = local.shape[-1]
    query = torch.from_numpy(np.asarray(local[0]).reshape(-1, c))
    out = {"map_shape": list(local.shape[1:]), "card": "demo_tiny_selavpr", "results": {}}
    reps = 5 if quick else 15
    for k in (10, 20):
        cands = np.ascontiguousarray(np.asarray(local[1:1 + k]).reshape(k, -1, c))
        want = official_style_counts(query.float(), torch.from_numpy(cands))
        stats = {}
        for path in SMALL_PATHS:
            got = mutual_nn_counts(query, cands, path=path,
                                   stats=stats if path == "verified" else None)
            assert torch.equal(got, want), f"{path} counts differ: {got} vs {want}"
        fns = {"describe (demo_tiny, 1 image)": lambda: describer.describe(images[:1]),
               "official per-candidate loop": lambda: official_style_counts(
                   query.float(), torch.from_numpy(cands))}
        for path in SMALL_PATHS:
            fns[f"package {path}"] = (lambda p=path: mutual_nn_counts(query, cands, path=p))
        times = {n: median(t) for n, t in interleaved_times(fns, reps, warmup=2).items()}
        desc = times["describe (demo_tiny, 1 image)"]
        out["results"][f"top{k}"] = {
            "latency_s": times, "vs_describe": {n: v / desc for n, v in times.items()},
            "verified_recomputed_fraction": {
                "rows": stats["rows_recomputed"] / stats["rows"],
                "cols": stats["cols_recomputed"] / stats["cols"]}}
        print(f"[rerank] small maps top-{k}: "
              + ", ".join(f"{n} {v * 1e3:.2f} ms" for n, v in times.items()), flush=True)
    return out


def markdown(res: dict) -> str:
    lines = ["## Re-ranking (mutual nearest neighbours, 61x61x128 local features)", "",
             "Latency per query, one query against K candidates, 2 threads; speed-up over the "
             "official batched algorithm (the issue's baseline) and over the leaner per-candidate "
             "loop; peak = extra RSS while running (each variant in a fresh process). "
             "The package's counts are asserted identical to both baselines'.", ""]
    rows = []
    for key, e in res["results"].items():
        for n in e["latency_s"]:
            rows.append([key, n, fmt(e["latency_s"][n], 3), fmt(e["speedup_vs_baseline"][n], 2),
                         fmt(e["speedup_vs_per_candidate_loop"][n], 2),
                         fmt(e["peak_extra_mb"][n], 0)])
    lines.append(md_table(["candidates", "variant", "s/query", "vs official batched",
                           "vs per-candidate loop", "peak extra MB"], rows))
    for key, e in res["results"].items():
        i8 = e.get("int8_path")
        if i8:
            lines += ["", f"{key}: package = the int8 verified path; rows / columns with "
                      f"several int8 candidates {i8['ambiguous_rows']:.0%} / "
                      f"{i8['ambiguous_cols']:.0%}, int16 products "
                      f"{i8['int16_products_per_point']:.1f} and float32 products "
                      f"{i8['fp32_products_per_point']:.2f} per point."]
    lines += ["", "Storage / compute precision vs float16 storage + float32 compute "
              "(counts and re-ranked order; int8 = the package's per-point int8 storage of the "
              "candidates, query in float32):", ""]
    rows = []
    for key, e in res["results"].items():
        for n, f in e["storage_effects"].items():
            rows.append([key, n, fmt(f["mean_abs_count_diff"], 2), fmt(f["max_abs_count_diff"], 0),
                         fmt(f["mean_rel_count_diff"], 4), fmt(f["spearman_rho_mean"], 4),
                         fmt(f["reranked_top1_identical"], 2),
                         fmt(f["reranked_order_identical"], 2)])
    lines.append(md_table(["candidates", "variant", "mean |dcount|", "max |dcount|",
                           "mean rel. diff", "Spearman rho", "top-1 same", "order same"], rows))
    small = res.get("small_maps")
    if small:
        lines += ["", f"Small maps: the shipped demo re-ranker ({small['card']}, maps "
                  f"{'x'.join(str(v) for v in small['map_shape'])}, trained features of sample "
                  "images), one query, 2 threads, timed interleaved with the demo descriptor "
                  "of one image; counts asserted identical:", ""]
        rows = []
        for key, e in small["results"].items():
            for n, v in e["latency_s"].items():
                rows.append([key, n, fmt(v * 1e3, 2), fmt(e["vs_describe"][n], 2)])
            rec = e["verified_recomputed_fraction"]
            rows.append([key, "(verified path: rows / columns recomputed)",
                         f"{rec['rows']:.0%} / {rec['cols']:.0%}", ""])
        lines.append(md_table(["candidates", "variant", "ms/query", "x describe time"], rows))
    lines += ["", "Storage per place: "
              + ", ".join(f"{k} {v:.2f} MB" for k, v in res["mb_per_place"].items())]
    return "\n".join(lines)


def main() -> None:
    topic_main(__doc__, "rerank", run, markdown)


if __name__ == "__main__":
    main()
