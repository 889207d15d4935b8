"""Synthetic place descriptors with the structure of real VPR maps, generated in chunks.

Real global descriptors are not i.i.d. noise: a map is a set of routes, consecutive
places along a route look alike, different areas form clusters, most of the variance
lives in a low-dimensional subspace and the rest is spread thinly over all
dimensions.  This generator reproduces that at the SciceVPR-B dimension (10752):

* every route ``r`` (``route_len`` places) has a cluster centre ``m_r`` in a
  ``latent``-dimensional space; along the route the latent code is an AR(1) random
  walk around it (correlation ``rho`` between neighbours), so nearby places are the
  hard negatives, as on a real trajectory;
* the latent code is mapped to 10752 dimensions by a fixed random mixing matrix with a
  decaying spectrum (power law), L2-normalised, and mixed with dense isotropic noise
  (energy ratio ``noise``), then L2-normalised again (like the real descriptor);
* a query of place ``p`` uses the same latent code moved by a common "season" shift
  plus its own jitter, and fresh dense noise: the ground-truth place is known.

The full 10752-D vectors are produced ``chunk`` rows at a time (never all at once: 1M x
10752 float32 would be 43 GB) and projected with a PCA learnt from a sample of places
(``faiss.PCAMatrix``, the same transform as the ``PCA<d>`` factory prefix); only the
reduced vectors are kept, in a memory-mapped ``.npy`` cache.  PCA components are sorted
by variance, so the first ``d`` columns of the 1024-D projection are the ``d``-D PCA.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DEFAULT_CACHE, atomic_path, write_json  # noqa: F401


@dataclass(frozen=True)
class SyntheticSpec:
    dim: int = 10752
    latent: int = 128
    route_len: int = 1000
    rho: float = 0.92          # latent correlation between consecutive places
    cluster_std: float = 1.0   # spread of route centres
    walk_std: float = 0.8      # spread of places around their route centre
    spectrum_power: float = 0.6
    noise: float = 1.3         # dense noise norm relative to the unit structured part
    season_std: float = 0.25   # common appearance shift of all queries
    jitter_std: float = 0.35   # per-query latent jitter
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


class SyntheticPlaces:
    """Deterministic generator: the same spec gives the same places, chunk by chunk."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 1])
        s = (np.arange(1, spec.latent + 1, dtype=np.float64)) ** (-spec.spectrum_power)
        mixing = rng.standard_normal((spec.latent, spec.dim)).astype(np.float32)
        mixing /= np.sqrt(spec.dim)
        self.mixing = (mixing * s[:, None].astype(np.float32)).astype(np.float32)
        self.season = (rng.standard_normal(spec.latent) * spec.season_std).astype(np.float32)

    # -- latent codes ------------------------------------------------------------
    def route_latents(self, route: int) -> np.ndarray:
        sp = self.spec
        rng = np.random.default_rng([sp.seed, 2, route])
        centre = rng.standard_normal(sp.latent) * sp.cluster_std
        eps = rng.standard_normal((sp.route_len, sp.latent))
        walk = np.empty_like(eps)
        walk[0] = eps[0]
        a, b = sp.rho, np.sqrt(1.0 - sp.rho ** 2)
        for t in range(1, sp.route_len):
            walk[t] = a * walk[t - 1] + b * eps[t]
        return (centre + sp.walk_std * walk).astype(np.float32)

    def latents(self, start: int, stop: int) -> np.ndarray:
        L = self.spec.route_len
        out = []
        for route in range(start // L, (stop - 1) // L + 1):
            z = self.route_latents(route)
            lo = max(start - route * L, 0)
            hi = min(stop - route * L, L)
            out.append(z[lo:hi])
        return np.concatenate(out, axis=0)

    def latents_of(self, places: np.ndarray) -> np.ndarray:
        L = self.spec.route_len
        out = np.empty((len(places), self.spec.latent), np.float32)
        cache: Dict[int, np.ndarray] = {}
        for i, p in enumerate(places):
            r = int(p) // L
            if r not in cache:
                cache[r] = self.route_latents(r)
            out[i] = cache[r][int(p) - r * L]
        return out

    # -- full-dimensional vectors ------------------------------------------------
    def full_vectors(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Latent codes (n, latent) -> unit descriptors (n, dim) float32."""
        x = z.astype(np.float32) @ self.mixing
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        # dense noise: centred uniform (cheaper to draw than normal; after PCA it is
        # Gaussian-like anyway), scaled to norm ~= spec.noise
        u = rng.random(x.shape, dtype=np.float32)
        u -= 0.5
        u *= np.float32(self.spec.noise * np.sqrt(12.0 / self.spec.dim))
        x += u
        del u
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def places(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, 3, start, stop])
        return self.full_vectors(self.latents(start, stop), rng)

    def queries(self, targets: np.ndarray, tag: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, 4, tag])
        z = self.latents_of(targets)
        z = z + self.season + rng.standard_normal(z.shape).astype(np.float32) * self.spec.jitter_std
        return self.full_vectors(z, rng)


def _pca_training_sample(gen: SyntheticPlaces, n_places: int, n_train: int) -> np.ndarray:
    """Places drawn from routes spread over the whole map (not only its first routes)."""
    L = gen.spec.route_len
    n_routes = max(1, n_places // L)
    rng = np.random.default_rng([gen.spec.seed, 5])
    routes = rng.choice(n_routes, size=min(n_routes, 64), replace=False)
    per_route = int(np.ceil(n_train / len(routes)))
    zs = []
    for r in routes:
        z = gen.route_latents(int(r))
        zs.append(z[rng.choice(L, size=min(per_route, L), replace=False)])
    z = np.concatenate(zs)[:n_train]
    return gen.full_vectors(z, np.random.default_rng([gen.spec.seed, 6]))


class ReducedGenerator:
    """Draws the PCA projection of :meth:`SyntheticPlaces.full_vectors` without the 10752-D detour.

    With ``v = normalize(z @ mixing)`` and dense noise ``u`` (i.i.d., variance
    ``noise**2 / dim`` per coordinate), a place is ``x = (v + u) / |v + u|`` and the PCA
    gives ``P (x - mean)``.  ``P v`` follows exactly from the (latent x d) matrix
    ``mixing @ P.T`` and ``|z @ mixing|`` from the (latent x latent) Gram matrix; ``P u`` is
    isotropic noise of the same per-coordinate variance (P has orthonormal rows; the sum
    over 10752 coordinates makes it Gaussian); ``|v + u|^2 = 1 + |u|^2 + 2 <v, u>`` is
    drawn with the right mean and spread.  So the reduced vectors have the distribution
    the full pipeline gives, at a 20x lower cost; ``build_cache`` checks this on a subset
    generated the long way (``fidelity`` in ``done.json``).
    """

    def __init__(self, gen: "SyntheticPlaces", pca):
        import faiss
        d_out = pca.d_out
        P = faiss.vector_to_array(pca.PCAMat).reshape(-1, gen.spec.dim)[:d_out].astype(np.float64)
        mean = faiss.vector_to_array(pca.mean).astype(np.float64)
        M = gen.mixing.astype(np.float64)
        self.gen = gen
        self.d_out = d_out
        self.proj = (M @ P.T).astype(np.float64)          # latent x d
        self.gram = M @ M.T                              # latent x latent
        self.p_mean = (P @ mean).astype(np.float64)       # d
        self.sigma = gen.spec.noise / np.sqrt(gen.spec.dim)  # per-coordinate noise std

    def reduced(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        z = z.astype(np.float64)
        n1 = np.sqrt(np.sum((z @ self.gram) * z, axis=1))
        pv = (z @ self.proj) / n1[:, None]
        pu = rng.standard_normal((len(z), self.d_out)) * self.sigma
        D = self.gen.spec.dim
        var_u = self.sigma ** 2
        # |u|^2: sum of D i.i.d. squared centred uniforms (variance of u^2 = 0.8 var_u^2)
        uu = D * var_u + rng.standard_normal(len(z)) * np.sqrt(0.8 * D) * var_u
        vu = rng.standard_normal(len(z)) * self.sigma    # <v, u>, v unit
        n2 = np.sqrt(1.0 + uu + 2.0 * vu)
        return ((pv + pu) / n2[:, None] - self.p_mean).astype(np.float32)

    def places(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.gen.spec.seed, 8, start, stop])
        return self.reduced(self.gen.latents(start, stop), rng)

    def queries(self, targets: np.ndarray, tag: int = 0) -> np.ndarray:
        rng = np.random.default_rng([self.gen.spec.seed, 9, tag])
        z = self.gen.latents_of(targets)
        z = z + self.gen.season + rng.standard_normal(z.shape).astype(np.float32) * self.gen.spec.jitter_std
        return self.reduced(z, rng)


def _neighbour_stats(db: np.ndarray, q: np.ndarray, targets: np.ndarray) -> Dict[str, float]:
    """Cosine statistics in the (normalised) reduced space: query-truth and place-next place."""
    dbn = db / np.linalg.norm(db, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    qt = np.einsum("ij,ij->i", qn, dbn[targets])
    nb = np.einsum("ij,ij->i", dbn[:-1], dbn[1:])
    rnd = np.einsum("ij,ij->i", dbn[: len(dbn) // 2], dbn[len(dbn) // 2: 2 * (len(dbn) // 2)])
    return {"cos_query_truth_mean": float(qt.mean()), "cos_query_truth_std": float(qt.std()),
            "cos_next_place_mean": float(nb.mean()), "cos_random_pair_mean": float(rnd.mean())}


def build_cache(n_places: int, query_sizes: Sequence[int], n_queries: int = 1000,
                d_out: int = 512, n_train: int = 2048, chunk: int = 2500,
                fidelity_places: int = 10_000, n_fidelity_queries: int = 300,
                spec: Optional[SyntheticSpec] = None, cache_dir: Path = DEFAULT_CACHE,
                progress: bool = True) -> Path:
    """Learn the PCA on full 10752-D places, then write the reduced map to a disk cache.

    Writes to ``cache_dir/<spec key>_<n_places>_<d_out>/``: ``db.npy`` (n_places, d_out)
    float32 (PCA-projected, not normalised), ``queries_<N>.npy`` / ``targets_<N>.npy``
    for every N in ``query_sizes`` (queries of places uniform in [0, N)),
    ``eigenvalues.npy``, ``pca.faissmatrix`` and the fidelity subset: the first
    ``fidelity_places`` places generated the long way (full 10752-D, chunk by chunk, then
    PCA) in ``fid_db.npy`` with queries ``fid_queries.npy`` / ``fid_targets.npy`` and
    their exact full-D top-10 in ``fid_gt.npy``.  A complete cache is reused.
    """
    import faiss
    from tqdm import tqdm

    spec = spec or SyntheticSpec()
    folder = Path(cache_dir) / f"v2_{spec.key()}_{n_places}_{d_out}"
    done = folder / "done.json"
    query_sizes = sorted(set(int(n) for n in query_sizes))
    if done.exists():
        meta = json.loads(done.read_text())
        if all(n in meta["query_sizes"] for n in query_sizes) and meta["n_queries"] >= n_queries:
            return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = SyntheticPlaces(spec)
    t0 = time.perf_counter()

    train = _pca_training_sample(gen, n_places, n_train)
    pca = faiss.PCAMatrix(spec.dim, d_out)
    pca.train(train)
    del train
    eig = faiss.vector_to_array(pca.eigenvalues)[:d_out].astype(np.float32)
    np.save(folder / "eigenvalues.npy", eig)
    faiss.write_VectorTransform(pca, str(folder / "pca.faissmatrix"))
    t_pca = time.perf_counter() - t0

    # fidelity subset: the long way, 10752-D chunks, exact full-D ground truth
    t1 = time.perf_counter()
    n_fid = min(fidelity_places, n_places)
    rng = np.random.default_rng([spec.seed, 10])
    fid_targets = rng.integers(0, n_fid, size=n_fidelity_queries)
    fq = gen.queries(fid_targets, tag=10**9 + 1)
    np.save(folder / "fid_queries.npy", pca.apply_py(fq))
    np.save(folder / "fid_targets.npy", fid_targets)
    fid_db = np.empty((n_fid, d_out), np.float32)
    sims = np.empty((len(fq), n_fid), np.float32)
    for start in tqdm(range(0, n_fid, chunk), desc="fidelity subset (10752-D)",
                      disable=not progress, mininterval=2.0):
        stop = min(start + chunk, n_fid)
        x = gen.places(start, stop)
        sims[:, start:stop] = fq @ x.T
        fid_db[start:stop] = pca.apply_py(x)
        del x
    np.save(folder / "fid_gt.npy", np.argsort(-sims, axis=1, kind="stable")[:, :10])
    np.save(folder / "fid_db.npy", fid_db)
    del sims, fq
    t_fid = time.perf_counter() - t1

    red = ReducedGenerator(gen, pca)
    for n in query_sizes:
        rng = np.random.default_rng([spec.seed, 7, n])
        targets = rng.integers(0, n, size=n_queries)
        np.save(folder / f"queries_{n}.npy", red.queries(targets, tag=n))
        np.save(folder / f"targets_{n}.npy", targets)

    db = np.lib.format.open_memmap(folder / "db.npy", mode="w+", dtype=np.float32,
                                   shape=(n_places, d_out))
    big = 50_000
    for start in tqdm(range(0, n_places, big), desc=f"synthetic places (PCA{d_out})",
                      disable=not progress, mininterval=2.0):
        stop = min(start + big, n_places)
        db[start:stop] = red.places(start, stop)
    db.flush()

    # the closed form vs the long way on the same places (different noise draws)
    fid_q = np.load(folder / "fid_queries.npy")
    closed_q = red.queries(fid_targets, tag=10**9 + 2)
    fidelity = {"full_dim_path": _neighbour_stats(fid_db, fid_q, fid_targets),
                "closed_form_path": _neighbour_stats(np.asarray(db[:n_fid]), closed_q, fid_targets)}
    del db
    meta = {"spec": asdict(spec), "n_places": n_places, "d_out": d_out, "n_train": n_train,
            "query_sizes": query_sizes, "n_queries": n_queries, "fidelity_places": n_fid,
            "n_fidelity_queries": int(n_fidelity_queries), "fidelity": fidelity,
            "pca_train_s": t_pca, "fidelity_subset_s": t_fid,
            "total_s": time.perf_counter() - t0}
    write_json(done, meta)
    return folder


class ReducedMap:
    """The cached reduced vectors, viewed at a size ``n`` and dimension ``d`` (+ whitening)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "done.json").read_text())
        self.db = np.load(self.folder / "db.npy", mmap_mode="r")
        self.eig = np.load(self.folder / "eigenvalues.npy")

    def _post(self, x: np.ndarray, d: int, whiten: bool) -> np.ndarray:
        x = np.array(x[:, :d], dtype=np.float32, order="C", copy=True)
        if whiten:
            x = x / np.sqrt(np.maximum(self.eig[:d], 1e-12))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def database(self, n: int, d: int, whiten: bool = False) -> np.ndarray:
        out = np.empty((n, d), np.float32)
        step = 100_000
        for s in range(0, n, step):
            out[s:s + step] = self._post(self.db[s:min(s + step, n)], d, whiten)
        return out

    def database_chunks(self, n: int, d: int, whiten: bool = False, step: int = 100_000):
        for s in range(0, n, step):
            yield self._post(self.db[s:min(s + step, n)], d, whiten)

    def queries(self, n: int, d: int, whiten: bool = False):
        q = np.load(self.folder / f"queries_{n}.npy")
        t = np.load(self.folder / f"targets_{n}.npy")
        return self._post(q, d, whiten), t

    def fidelity_set(self, d: int, whiten: bool = False):
        """(database, queries, targets, full-D exact top-10) of the long-way subset."""
        db = self._post(np.load(self.folder / "fid_db.npy"), d, whiten)
        q = self._post(np.load(self.folder / "fid_queries.npy"), d, whiten)
        return db, q, np.load(self.folder / "fid_targets.npy"), np.load(self.folder / "fid_gt.npy")


def place_recall(pred: np.ndarray, targets: np.ndarray, tolerance: int = 2,
                 ns: Sequence[int] = (1, 10)) -> Dict[str, float]:
    """Fraction of queries with a retrieved place within ``tolerance`` places of the truth."""
    out = {}
    hit = np.abs(pred - targets[:, None]) <= tolerance
    for n in ns:
        out[f"R@{n}"] = float(hit[:, :n].any(axis=1).mean())
    return out


def agreement_recall(pred: np.ndarray, exact: np.ndarray, ns: Sequence[int] = (1, 10)) -> Dict[str, float]:
    """ANN vs exact: recall@1 = top-1 identical; recall@k = |top-k(ANN) & top-k(exact)| / k."""
    out = {}
    for n in ns:
        if n == 1:
            out["recall@1"] = float((pred[:, 0] == exact[:, 0]).mean())
        else:
            inter = [len(np.intersect1d(a[:n], b[:n])) for a, b in zip(pred, exact)]
            out[f"recall@{n}"] = float(np.mean(inter) / n)
    return out


if __name__ == "__main__":  # quick look at the structure
    import argparse
    import faiss
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    a = p.parse_args()
    t0 = time.perf_counter()
    f = build_cache(a.n, [a.n], n_queries=500)
    print("cache s", time.perf_counter() - t0)
    m = ReducedMap(f)
    print(json.dumps(m.meta["fidelity"], indent=1))
    for d in (128, 256, 512):
        db, q, t, gt = m.fidelity_set(d)
        print("full-D exact place R@1 (+-2):", place_recall(gt, t))
        ix = faiss.IndexFlatIP(d)
        ix.add(db)
        _, I = ix.search(q, 10)
        print(d, "long way", place_recall(I, t), agreement_recall(I, gt))
        xb = m.database(a.n, d)
        q, t = m.queries(a.n, d)
        ix = faiss.IndexFlatIP(d)
        ix.add(xb)
        _, I = ix.search(q, 10)
        print(d, "closed form", place_recall(I, t))
