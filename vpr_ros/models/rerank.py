"""SelaVPR re-ranking: mutual-nearest-neighbour matching of dense local features.

For a query map q (P points x C) and a candidate map c (P' x C), S = c q^T.  A query
point i *matches* if its best candidate point j = argmax_j S[j, i] has i as its own
best query point (argmax_i S[j, i] == i): mutual nearest neighbours.  ``argmax`` takes
the first index on exact ties, as ``torch.argmax`` does in the official code.

* :func:`mutual_nn_counts` - number of matches per candidate.  Where the native kernels
  of :mod:`vpr_ros.accel` build (and ``native`` is not False), ``compute="fp32"`` on the
  CPU takes one of the exact native paths (:func:`_counts_cpu`): the *fused* path for
  small maps (every float32 similarity computed as the BLAS computes it, both argmaxes in
  the same pass, the K candidates as one batch of work) and a *verified* path for large
  ones: on CPUs with AVX-512 VNNI the *int8* path (int8 code similarities, every row's
  and column's candidates within the proven int8 error bound decided by exact int16 code
  similarities and, where those cannot, float32; see the comment above
  :class:`_Codes8`), else the *int16* path (int16 code similarities with a fused top-2
  that never stores the matrix, and an exact float32 re-computation of every row and
  column whose margin is within the proven error bound, see the comment above
  :class:`_Codes`).  All give the counts of the plain path, which runs otherwise.  The plain
  path runs one reused similarity buffer (55 MB for 61x61 maps): the
  matmul through numpy's BLAS, the best query point of every candidate point with
  numpy's contiguous argmax, the best candidate point of every query point with
  :func:`first_argmax_over_rows` (tiled, first index on ties); ``candidates`` may be any
  sequence of maps (a memory-mapped float16 array, an int8 store that dequantises one
  place at a time).  On a GPU they are batched in chunks of at most ``max_chunk_bytes``
  of similarity work space.  Float16 inputs are upcast per candidate/chunk.
  ``compute="fp32"`` (the default) is exact: identical counts to the official algorithm.
  ``compute="bf16"`` is opt-in: the similarity matmul runs in bfloat16 (AMX/AVX512-BF16
  on recent CPUs, tensor cores on GPUs), the product is widened exactly to float32 and
  both argmaxes run on that.  What it guarantees: the exact counts (first index on ties)
  *of the bf16 similarities*.  Nothing about the float32 counts or order: rounding
  (~0.004 near 1) moves near-tie matches, a near-duplicate map can lose a third of its
  matches, and on one fixture set it changed which candidate ranked first
  (docs/fast_paths.md).
* :func:`official_scores` - the official score: the count as float, except that a
  count of exactly 1 scores 0 (a quirk of the official ``local_sim``: it squeezes the
  match indices and a 0-d result is treated as "no matches").
* :func:`rerank_order` - candidate order by descending score.  Ties keep their
  first-stage order (stable sort).  The official code reverses numpy's unstable
  ``argsort``, which leaves tied candidates in no defined order; for the short lists it
  happens to put ties in *reverse* first-stage order, we keep the better first-stage
  rank first, which is the sensible reading and is deterministic.
* :func:`train_similarity` - the training-time similarity (``local_sim(trainflag=True)``):
  the mean dot product over the mutual matches of each (query, candidate) pair,
  differentiable in the features.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..constants import RERANK_COMPUTES

ArrayLike = Union[np.ndarray, torch.Tensor]

DEFAULT_MAX_CHUNK_BYTES = 256 * 1024 * 1024

COMPUTES = RERANK_COMPUTES
_COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_compute(compute: str) -> str:
    """Validate a re-ranking compute precision name -> its canonical lower-case form."""
    key = str(compute).strip().lower() if compute is not None else "fp32"
    if key not in _COMPUTE_DTYPES:
        raise ValueError(f"unknown re-ranking compute precision {compute!r}: use one of "
                         f"{', '.join(COMPUTES)} (fp32 = exact official counts, bf16 = faster, "
                         "approximate counts)")
    return key


def _as_points(x: ArrayLike, batched: bool, device: Optional[torch.device]) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # read-only memmaps of a map: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            t = torch.as_tensor(np.asarray(x))
    else:
        t = x
    want = 3 if batched else 2
    if t.ndim == want + 1:                       # (..., H, W, C) -> (..., H*W, C)
        t = t.reshape(*t.shape[:-3], t.shape[-3] * t.shape[-2], t.shape[-1])
    if t.ndim != want:
        shape = "(K,H,W,C) or (K,P,C)" if batched else "(H,W,C) or (P,C)"
        raise ValueError(f"expected local features shaped {shape}, got {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t


def argmax_over_rows(sim: torch.Tensor, block: int = 512) -> torch.Tensor:
    """``sim.argmax(dim=1)`` for (k, R, P), first index on ties, computed in row blocks.

    A reduction over the middle axis is strided and slow on the CPU; a running maximum
    over contiguous blocks of rows gives the identical result several times faster
    (``max`` returns the first maximal index inside a block, and a later block only
    wins when strictly greater).
    """
    if sim.device.type != "cpu" or sim.shape[1] <= block:
        return sim.argmax(dim=1)
    best, index = sim[:, :block].max(dim=1)
    for start in range(block, sim.shape[1], block):
        value, idx = sim[:, start:start + block].max(dim=1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, idx + start, index)
    return index


def _matches_from_similarity(sim: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """sim (k, P', P) -> (valid (k, P) bool, best (k, P) long); first index on ties."""
    best_cand = argmax_over_rows(sim)                  # (k, P): per query point
    best_query = sim.argmax(dim=2)                    # (k, P'): per candidate point
    back = torch.gather(best_query, 1, best_cand)      # (k, P)
    arange = torch.arange(sim.shape[2], device=sim.device)
    return back == arange.unsqueeze(0), best_cand


def _mutual_matches(query: torch.Tensor, cands: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """query (P, C) float32, cands (k, P', C) float32 -> (valid (k, P) bool, best (k, P) long).

    best[k, i] is the candidate point nearest to query point i.
    """
    return _matches_from_similarity(torch.matmul(cands, query.T))   # sim (k, P', P)


def tile_rows(rows: int, target: int = 64) -> int:
    """Rows per tile for :func:`first_argmax_over_rows`: a divisor of ``rows`` near ``target``
    (61 for 61x61 maps), else ``target``."""
    if rows <= target:
        return max(rows, 1)
    for delta in range(0, target // 2):
        for size in (target - delta, target + delta):
            if rows % size == 0:
                return size
    return target


def first_argmax_over_rows(sim: np.ndarray, block: Optional[int] = None) -> np.ndarray:
    """``argmax(sim, axis=0)`` of a C-contiguous (R, P) float array, first row on ties.

    A column-wise argmax walks the matrix with a stride of a whole row; here the maximum
    of every tile of ``block`` rows is taken with contiguous, vectorised reductions, the
    column maximum is the maximum of those, and only the first tile holding it is looked
    at again (``block`` x P gathered values) to find the first row equal to it.  Same
    result as ``torch.argmax``/``np.argmax`` for finite input (both take the first
    maximal index); any NaN falls back to ``np.argmax``.
    """
    r, p = sim.shape
    block = tile_rows(r) if block is None else max(1, min(int(block), r))
    full = (r // block) * block
    parts = [sim[:full].reshape(-1, block, p).max(axis=1)] if full else []
    if full < r:
        parts.append(sim[full:].max(axis=0, keepdims=True))
    tile_max = parts[0] if len(parts) == 1 else np.concatenate(parts)     # (tiles, P)
    col_max = tile_max.max(axis=0)
    if np.isnan(col_max).any():
        return np.argmax(sim, axis=0)
    first_tile = np.argmax(tile_max == col_max, axis=0)                 # (P,)
    # flat positions of the rows of each column's first tile; rows past the end (last,
    # partial tile) are clipped: they come after the real maximum, so never win argmax
    base = first_tile * (block * p) + np.arange(p)
    pos = base[None, :] + (np.arange(block) * p)[:, None]
    np.minimum(pos, r * p - 1, out=pos)
    values = sim.reshape(-1).take(pos)                                   # (block, P)
    return first_tile * block + np.argmax(values == col_max, axis=0)


def mutual_count(sim: np.ndarray) -> int:
    """Mutual nearest-neighbour count of one (P' candidate, P query) similarity matrix."""
    best_query = sim.argmax(axis=1)              # per candidate point, first index on ties
    best_cand = first_argmax_over_rows(sim)      # per query point, first index on ties
    return int(np.count_nonzero(best_query[best_cand] == np.arange(sim.shape[1])))


def _points_np(x, what: str, kernels=None) -> np.ndarray:
    """One local feature map (H, W, C) or (P, C), tensor or array -> (P, C) float32 C-order.
    float16 maps (the default local storage, and the extractor's output) are widened by
    the native ``kernels`` where given: 0.05 ms instead of 0.6-0.9 ms for a 3721 x 128 map
    with numpy or torch, the same values."""
    if (kernels is not None and getattr(x, "dtype", None) in (torch.float16, np.float16)
            and x.ndim in (2, 3)):
        h = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return kernels.half_to_float(np.ascontiguousarray(h.reshape(-1, h.shape[-1])))
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.float().numpy() if x.dtype != torch.float32 else x.numpy()
    a = np.asarray(x)
    if a.ndim == 3:
        a = a.reshape(a.shape[0] * a.shape[1], a.shape[2])
    if a.ndim != 2:
        raise ValueError(f"expected {what} local features shaped (H,W,C) or (P,C), "
                         f"got {tuple(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _map_shape(x) -> Optional[Tuple[int, int]]:
    """(points, channels) of a (H, W, C) or (P, C) map without reading it; None otherwise."""
    shape = np.shape(x)
    if len(shape) == 3:
        return int(shape[0]) * int(shape[1]), int(shape[2])
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else None


EXACT_PATHS = ("auto", "fused", "int8", "verified", "plain")


def _counts_cpu(query, candidates, compute: str, native: Optional[bool] = None,
                stats: Optional[dict] = None, path: str = "auto",
                kernel_cache: Optional[str] = None) -> torch.LongTensor:
    """CPU path.

    ``compute="fp32"`` with the native kernels (the default where a C compiler exists)
    takes one of two exact native paths, chosen per query (:func:`_fused_first`):

    * the *fused* path (small maps, e.g. the demo re-ranker's 29x29x32, and maps the
      verified path cannot decide): every float32 similarity computed as the BLAS does
      (one in-order FMA chain) with both argmaxes in the same pass over tiles, the matrix
      never stored, the K candidates as one batch of work items for the threads;
    * the *int8* path (large maps, kernels built with AVX-512 VNNI): int8 code
      similarities, per row and column the candidates within the proven int8 bound,
      decided by exact int16 code similarities and float32 only where those cannot
      (:class:`_Int8Verifier`).  With several threads the candidates run one per thread
      (:func:`_verified_pooled`); candidates whose candidate pairs exceed the limit
      (near-duplicate maps) are handed back to the fused path (batched under "auto"; read
      once more); one at a time, a hand-back sends the rest to the fused path;
    * the *verified* (int16) path below (large maps without VNNI): int16 code similarities
      with a fused top-2, exact float32 re-computation of the ambiguous rows and columns
      only.  When it has to recompute more than :data:`FUSED_SWITCH_FRACTION` of the rows
      and columns of the first candidate (near-tie features), the remaining candidates go
      to the fused path; otherwise, with several threads, the remaining candidates run one
      per thread.

    All give the counts of the plain path.  ``path`` ("fused", "int8", "verified",
    "plain") forces one of them where it can run (benchmarks, tests); "auto" chooses.  Otherwise
    (``native=False``, no compiler, non-finite features) the plain path: the similarity
    matmul through numpy's BLAS (OpenBLAS in the numpy wheels: about 1.7x faster than
    ``torch.mm`` for this 3721x128x3721 shape on the CPUs measured, and bit-identical on
    them) into one reused buffer, then both argmaxes.  ``compute="bf16"`` runs the matmul
    in bfloat16 with torch and widens the product into the same buffer.  The candidates
    are read one by one (the fused path holds at most :data:`FUSED_BATCH_BYTES` of them
    as float32 at a time), so ``candidates`` may be a memory-mapped array or any sequence
    that gives one map per index (e.g. a dequantising view of int8 storage).
    """
    k = len(candidates)
    counts = np.zeros(k, dtype=np.int64)
    if path not in EXACT_PATHS:
        raise ValueError(f"unknown exact re-ranking path {path!r}: use one of "
                         f"{', '.join(EXACT_PATHS)}")
    # the kernels first (they need only the shapes), so that they widen float16 maps
    candidate0 = candidates[0] if k else None
    q_shape, first_shape = _map_shape(query), _map_shape(candidate0) if k else None
    kernels = (_native_kernels(native, q_shape[1], first_shape[0], q_shape[0], kernel_cache)
               if compute == "fp32" and k and q_shape and first_shape and q_shape[0]
               and path != "plain" else None)
    q = _points_np(query, "query", kernels)
    first = _points_np(candidate0, "candidate", kernels) if k else None
    q_absmax = kernels.finite_absmax(q) if kernels is not None else None   # None: non-finite
    fast = (_NativeCounter(kernels, q, q_absmax, first.shape, path, counts)
            if q_absmax is not None else None)
    plain = None                                   # built where a candidate needs it
    # the int16 path counts the first candidate alone (it decides fused or verified for
    # the rest); the int8 path hands near-duplicate maps back one by one: all pooled
    fast_pool_from = 0 if fast is not None and isinstance(fast.verified, _Int8Verifier) else 1
    done: dict = {}
    for i in range(k):
        if i == fast_pool_from and fast is not None and fast.pool_rest(k):
            done = _verified_pooled(kernels, candidates, first, range(i, k), fast.verified,
                                    fast.q_absmax, fast.stats, fast.fused_only)
            # handed back (near-duplicate maps): counted below by the fused path, in batches
            fast.fused = fast.fused or (bool(fast.fused_only) and path == "auto")
        if i in done:
            counts[i] = done[i]
            continue
        cand = first if i == 0 else _points_np(candidates[i], "candidate", kernels)
        if cand.shape[1] != q.shape[1]:
            raise ValueError(f"query has {q.shape[1]} channels, candidates {cand.shape[1]}")
        if fast is None or not fast.count(i, cand):
            plain = plain or _PlainCounter(q, compute)
            counts[i] = plain.count(cand)
    if fast is not None:
        fast.flush()
        if stats is not None:
            for key, value in fast.stats.items():
                stats[key] = stats.get(key, 0) + value
    return torch.from_numpy(counts)


class _PlainCounter:
    """The plain path: the similarity matmul (numpy's BLAS; bf16 through torch) into one
    reused buffer, then both argmaxes."""

    def __init__(self, q: np.ndarray, compute: str):
        self.q_t = np.ascontiguousarray(q.T)
        self.compute = compute
        self.q_t_bf16 = (torch.from_numpy(self.q_t).to(torch.bfloat16) if compute == "bf16"
                         else None)
        self.sim = self.mm_buf = None

    def count(self, cand: np.ndarray) -> int:
        if self.sim is None or self.sim.shape[0] != cand.shape[0]:
            self.sim = np.empty((cand.shape[0], self.q_t.shape[1]), dtype=np.float32)
            self.mm_buf = None
        if self.compute == "fp32":
            with np.errstate(invalid="ignore", over="ignore"):   # non-finite maps: their
                np.matmul(cand, self.q_t, out=self.sim)         # counts, not a warning
        else:
            if self.mm_buf is None:
                self.mm_buf = torch.empty(self.sim.shape, dtype=torch.bfloat16)
            torch.mm(torch.from_numpy(cand).to(torch.bfloat16), self.q_t_bf16, out=self.mm_buf)
            torch.from_numpy(self.sim).copy_(self.mm_buf)    # exact widening of bf16 values
        return mutual_count(self.sim) if self.sim.size else 0


class _NativeCounter:
    """The fused and verified paths of one query (:func:`_counts_cpu`): fused candidates
    are batched (at most :data:`FUSED_BATCH_BYTES` of them held), verified ones counted at
    once; ``stats`` collects what ran."""

    def __init__(self, kernels, q: np.ndarray, q_absmax: float, first_shape: tuple, path: str,
                 counts: np.ndarray):
        self.kernels, self.q, self.path, self.counts = kernels, q, path, counts
        self.first_shape = first_shape
        self._q_panels = None
        self.q_absmax = q_absmax          # the finite query's largest |component|
        self.fused = path == "fused" or (path == "auto" and _fused_first(
            first_shape[0], q.shape[0], q.shape[1]))
        self.verified = None
        self.stats: dict = {}
        self.fused_only: set = set()        # candidates the int8 path handed back
        if not self.fused:
            int8 = path == "int8" or (path == "auto" and kernels.has_vnni)
            try:
                self.verified = (_Int8Verifier(kernels, q, self.q_absmax) if int8
                                 else _Int16Verifier(kernels, q, self.q_panels))
            except _Unverifiable:
                self.verified = None
        self.batch, self.batch_pos, self.batch_bytes = [], [], 0

    @property
    def q_panels(self):
        """The query packed for the fused path and the float32 re-computations (on first
        use: the int8 path does not need it)."""
        if self._q_panels is None:
            self._q_panels = self.kernels.pack_panels(self.q)
        return self._q_panels

    def pool_rest(self, k: int) -> bool:
        """Run the candidates per thread (verified path, 3+ of them; int8: 2+)?"""
        least = 2 if isinstance(self.verified, _Int8Verifier) else 3
        return (self.verified is not None and not self.fused and k >= least
                and torch.get_num_threads() > 1)

    def count(self, i: int, cand: np.ndarray) -> bool:
        """Count candidate i into ``counts`` (now or at the next flush); False: not taken
        (empty, non-finite, overflowing, or a shape numpy's BLAS sums otherwise)."""
        q = self.q
        absmax = _fusable(self.kernels, cand, self.q_absmax) if cand.shape[0] else None
        if not (absmax is not None
                and (cand.shape == self.first_shape
                     or _blas_is_fma_chain(self.kernels, q.shape[1], cand.shape[0],
                                           q.shape[0]))):
            return False
        if self.fused:
            self.batch.append(cand)
            self.batch_pos.append(i)
            self.batch_bytes += cand.nbytes
            if self.batch_bytes >= FUSED_BATCH_BYTES:
                self.flush()
            return True
        if self.verified is not None and i not in self.fused_only:
            try:
                count = self.verified.count(cand, self.stats, absmax=absmax)
                if count is not None:
                    self.counts[i] = count
                    recomputed = _recomputed_fraction(self.stats)
                    self.fused = (self.path == "auto" and recomputed is not None
                                  and recomputed > FUSED_SWITCH_FRACTION)
                    return True
                # the int8 path's candidates exploded (near-duplicate maps): fused from now
                self.fused = self.path == "auto"
            except _Unverifiable:
                pass
        self.counts[i] = self.kernels.mnn_exact_counts([cand], self.q_panels,
                                                       _fused_splits(1, cand.shape[0]))[0]
        self.stats["fused"] = self.stats.get("fused", 0) + 1
        return True

    def flush(self) -> None:
        if self.batch:
            self.counts[self.batch_pos] = self.kernels.mnn_exact_counts(
                self.batch, self.q_panels, _fused_splits(len(self.batch),
                                                         self.batch[0].shape[0]))
            self.stats["fused"] = self.stats.get("fused", 0) + len(self.batch)
        self.batch, self.batch_pos, self.batch_bytes = [], [], 0


_POOLS: dict = {}
_POOLS_LOCK = threading.Lock()


def _pool(threads: int):
    """A thread pool of ``threads`` workers kept for the process (one per torch thread
    count): new threads on every query cost their start and fresh memory pages in the
    kernels (~4% of a top-20 re-ranking, measured: docs/fast_paths.md section 1)."""
    from concurrent.futures import ThreadPoolExecutor

    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vpr-rerank")
        return pool


def _verified_pooled(kernels, candidates, first: np.ndarray, indices, verified,
                     q_absmax: float, stats: Optional[dict], fused_only: set) -> dict:
    """The verified path over several candidates, one candidate per thread (torch's count
    of threads, each kernel on one): no OpenMP barrier per kernel call, and a thread that
    the OS takes away stalls only its own candidate.  -> {index: count} of the candidates
    it took; the others (another shape, non-finite, unverifiable) are left to the caller,
    those the int8 path handed back added to ``fused_only``.  ``first``: candidate 0,
    already read by the caller (its shape is the one the BLAS check covered).
    """
    def work(i):
        cand = first if i == 0 else _points_np(candidates[i], "candidate", kernels)
        absmax = _fusable(kernels, cand, q_absmax) if cand.shape == first.shape else None
        if absmax is not None:
            local: dict = {}
            try:
                return i, verified.count(cand, local, threads=1, absmax=absmax), local
            except _Unverifiable:
                pass
        return i, None, None

    done = {}
    for i, count, local in _pool(torch.get_num_threads()).map(work, indices):
        if count is None and local is not None:     # handed back by the int8 path
            fused_only.add(i)
        elif count is not None:
            done[i] = count
        if stats is not None and local is not None:
            for key, value in local.items():
                stats[key] = stats.get(key, 0) + value
    return done


# ------------------------------------------------------------------------ fused exact path
#
# ``vpr_mnn_exact_counts`` (int8_kernels.c) computes every float32 similarity as one
# in-order FMA chain - the BLAS value (:func:`_blas_is_fma_chain`) - and both argmaxes
# (first index on ties) in the same pass over tiles of 4 candidate points x 32 query
# points.  It does all the work of the plain path but never writes the matrix, never
# reads it back for the two argmaxes, and has no per-candidate Python overhead; the
# verified path does less arithmetic but pays per candidate for the codes, the bounds and
# the re-computations, which on small or near-tie maps costs more than it saves
# (docs/fast_paths.md, section 1).

FUSED_MAX_MACS = 1 << 27          # maps up to this many products per candidate: fused
FUSED_SWITCH_FRACTION = 0.5       # verified path recomputing more than this: fused
FUSED_BATCH_BYTES = 64 << 20      # float32 candidate maps held at once by the fused path
_OVERFLOW_SAFE = 1e36             # channels x max|x| x max|q| below this: no inf, no NaN


def _fused_first(n_x: int, n_q: int, channels: int) -> bool:
    """Start with the fused path (True) or the verified one (False) for maps of this size."""
    return n_x * n_q * channels <= FUSED_MAX_MACS


def _fused_splits(n_cand: int, n_x: int) -> int:
    """Ranges of candidate points per candidate: at least two work items per thread."""
    want = -(-2 * torch.get_num_threads() // max(n_cand, 1))
    return int(max(1, min(want, -(-n_x // 4))))


def _fusable(kernels, cand: np.ndarray, q_absmax: float) -> Optional[float]:
    """The largest |component| of finite candidate features whose similarities (and every
    partial sum) stay finite, else None."""
    absmax = kernels.finite_absmax(cand) if cand.size else 0.0
    if absmax is None or cand.shape[1] * absmax * q_absmax >= _OVERFLOW_SAFE:
        return None
    return absmax


def _recomputed_fraction(stats: Optional[dict]) -> Optional[float]:
    if not stats or not stats.get("rows"):
        return None
    return ((stats["rows_recomputed"] + stats["cols_recomputed"])
            / (stats["rows"] + stats["cols"]))


# --------------------------------------------------------------------- verified fast path
#
# The similarities are first computed from int16 codes (one scale per map, so the codes
# of all points are comparable), exactly in int32, by a native kernel that keeps each
# row's and column's best two values and never stores the matrix.  A code similarity s'
# differs from the real dot product s by at most E (quantisation error, Cauchy-Schwarz on
# the per-point rounding errors), and the float32 product of the official algorithm
# differs from s by at most F = gamma_C |x| |q| (any summation order).  Where
# best - second > 2 (E + F) the float32 argmax is the best code's index (strictly larger
# than every other float32 value, so no tie can arise); every other row and column -
# exact ties, near ties - is recomputed in float32, first index on ties, each dot product
# as one chain of fused multiply-adds in channel order: the values of the BLAS sgemm the
# plain path uses (and torch.matmul, the official code's) for these shapes.  Small BLAS
# calls (one row: gemv; a few rows) round differently, so the recomputation does not use
# them; :func:`_blas_is_fma_chain` checks the equality once per process and the plain path
# runs where it fails.  So the counts are those of the plain float32 path.

_CODE_NORM = 46340.0        # two code vectors of at most this norm have |dot| < 2^31
_UNIT_ROUNDOFF = 2.0 ** -24
_MARGIN = 1.0 + 1e-9        # covers the float64 rounding of the norms and bounds


class _Unverifiable(ValueError):
    """Features the verified path does not take (non-finite, extreme magnitudes)."""


class _Codes:
    """int16 codes of one map with one scale, and per-point bounds for the error analysis:
    ``err`` = |x - scale code|, ``hat`` = |scale code|, ``norm`` = |x| (float64, with a
    relative margin for their own rounding)."""

    __slots__ = ("codes", "scale", "err", "hat", "norm", "n")

    def __init__(self, kernels, points: np.ndarray, pad_rows: int,
                 threads: Optional[int] = None):
        n, c = points.shape
        c_pad = c + (c % 2)
        norm, absmax = kernels.point_norms(points, threads)
        # the largest norm and the largest component both fit:
        # |round(x / s)| <= |x / s| + sqrt(c_pad) / 2 <= _CODE_NORM - 1, components <= 32766
        scale = max(float(norm.max(initial=0.0)) / (_CODE_NORM - 1.0 - 0.5 * np.sqrt(c_pad)),
                    absmax / 32766.0)
        scale = scale if scale > 0 else 1.0
        if not (np.isfinite(scale) and 1e-30 < scale < 1e30):
            raise _Unverifiable("features too large or too small for int16 codes")
        rows = -(-n // pad_rows) * pad_rows
        self.codes, err, hat = kernels.codes16(points, scale, rows, c_pad, threads)
        # err is a difference: its float64 rounding is relative to |x|, not to err itself
        self.err = err * _MARGIN + 1e-12 * norm
        self.hat, self.norm = hat * _MARGIN, norm * _MARGIN
        self.scale, self.n = scale, n


def _gamma(channels: int) -> float:
    nu = channels * _UNIT_ROUNDOFF
    return nu / (1.0 - nu)


def _error_bounds(x_err: np.ndarray, x_hat: np.ndarray, x_norm: np.ndarray, q_err: np.ndarray,
                  q_norm: np.ndarray, gamma: float) -> Tuple[np.ndarray, np.ndarray]:
    """The largest distance between a code similarity and the float32 value, per candidate
    point (rows) and per query point (columns), from the per-point rounding errors, code
    norms and norms (Cauchy-Schwarz on the codes' errors, plus gamma_C |x| |q| for any
    float32 summation order); both verified paths double it."""
    qn = float(q_norm.max())
    rows = x_err * qn + x_hat * float(q_err.max()) + gamma * x_norm * qn
    cols = (float(x_err.max()) * q_norm + float(x_hat.max()) * q_err
            + gamma * float(x_norm.max()) * q_norm)
    return rows, cols


def _ambiguous(best: np.ndarray, second: np.ndarray, scale: float, bound: np.ndarray) -> np.ndarray:
    margin = (best.astype(np.float64) - second.astype(np.float64)) * scale * (1 - 1e-9)
    return np.flatnonzero(~(margin > bound))


def _verified_count(kernels, cand: np.ndarray, q: np.ndarray, qc: "_Codes",
                    q_layout: np.ndarray, q_panels, gamma: float, stats: Optional[dict],
                    threads: Optional[int] = None) -> int:
    """Mutual nearest-neighbour count of one candidate map, identical to :func:`mutual_count`
    of its float32 similarities (see the comment above).  ``threads``: OpenMP threads of
    its kernels (default torch's count)."""
    from ..accel.int8_kernels import MNN_ROWS

    xc = _Codes(kernels, cand, MNN_ROWS, threads)
    n_x, n_q = cand.shape[0], q.shape[0]
    row_best, row_idx, row_second, col_best, col_idx, col_second = kernels.mnn_top2(
        xc.codes, n_x, q_layout, n_q, threads=threads)
    scale = xc.scale * qc.scale
    bounds = _error_bounds(xc.err, xc.hat, xc.norm, qc.err, qc.norm, gamma)
    row_bound, col_bound = 2.0 * bounds[0], 2.0 * bounds[1]
    # (second is INT32_MIN where a map has one point: the margin is then huge)
    rows = _ambiguous(row_best, row_second, scale, row_bound)
    cols = _ambiguous(col_best, col_second, scale, col_bound)
    best_query = row_idx.astype(np.int64)
    best_cand = col_idx.astype(np.int64)
    if len(rows):                                  # candidate points, exactly
        best_query[rows] = kernels.exact_argmax(cand, q_panels, rows, threads=threads)
    if len(cols):                                  # query points, exactly
        best_cand[cols] = kernels.exact_argmax(q, kernels.pack_panels(cand), cols,
                                               threads=threads)
    if stats is not None:
        stats["rows"] = stats.get("rows", 0) + n_x
        stats["cols"] = stats.get("cols", 0) + n_q
        stats["rows_recomputed"] = stats.get("rows_recomputed", 0) + len(rows)
        stats["cols_recomputed"] = stats.get("cols_recomputed", 0) + len(cols)
    return int(np.count_nonzero(best_query[best_cand] == np.arange(n_q)))


class _Int16Verifier:
    """The verified path of one query with int16 codes (:func:`_verified_count`)."""

    def __init__(self, kernels, q: np.ndarray, q_panels):
        from ..accel.int8_kernels import mnn_query_layout

        qc = _Codes(kernels, q, 1)
        self.kernels, self.q = kernels, q
        self.args = (qc, mnn_query_layout(qc.codes), q_panels, _gamma(q.shape[1]))

    def count(self, cand: np.ndarray, stats: Optional[dict], threads: Optional[int] = None,
              absmax: Optional[float] = None) -> int:
        del absmax
        return _verified_count(self.kernels, cand, self.q, *self.args, stats, threads)


# ---------------------------------------------------------------- int8 verified fast path
#
# The same proof with int8 codes (vpdpbusd: twice the int16 rate on AVX-512 VNNI), whose
# bound (~0.02-0.05 for unit vectors) is too wide to decide most rows from a top-2 alone:
# so every row keeps all its entries within the bound of its maximum (found once the row is
# complete; the kernel holds 4 rows of the matrix at a time) and every column those within
# the bound of its running maximum.  A row or column with one such candidate has its
# float32 argmax; the others (on smooth maps, most of them, ~8 candidates each) compare
# their candidates by exact int16 code similarities (bound ~1e-3), and the few still
# within that bound by their float32 values, first index on ties (vpr_mnn_int8_count in
# int8_kernels.c).  The bounds are those of the int16 path (Cauchy-Schwarz on each point's
# rounding error, plus gamma_C |x| |q| for any float32 summation order), in code units,
# rounded up, plus one.

_INT8_LEVELS = 127.0
_INT8_MAX_PAIRS_PER_POINT = 48    # more candidate pairs: near-duplicate maps, fused path
_INT8_MAX_CHANNELS = 32768        # int32 differences of int8 code sums stay exact


class _Codes8:
    """int8 and int16 codes of one map (one scale each) with per-point bounds, float64."""

    __slots__ = ("c8", "c16", "s8", "s16", "terms", "_bounds")

    def __init__(self, kernels, points: np.ndarray, offset: int, pad_rows: int,
                 absmax: Optional[float] = None):
        n, c = points.shape
        if absmax is None:
            absmax = float(np.abs(points).max(initial=0.0))
        if c > _INT8_MAX_CHANNELS or not (absmax == 0.0 or 1e-30 < absmax < 1e30):
            raise _Unverifiable("features too large or too small for int8 codes")
        c_pad = c + c % 2
        root = float(np.sqrt(c_pad))
        # every |x| <= absmax: int8 codes within +-127; int16 code norms
        # <= |x| / s16 + sqrt(c_pad) / 2 < 46339 (the 1e-6 covers float32 rounding)
        self.s8 = float(np.float32(absmax / _INT8_LEVELS * (1 + 1e-6))) if absmax else 1.0
        self.s16 = (float(np.float32(absmax * root / (_CODE_NORM - 1.0 - 0.5 * root)
                                     * (1 + 1e-6))) if absmax else 1.0)
        rows = -(-n // pad_rows) * pad_rows
        # per point, unscaled: |x - s8 code8|, |s8 code8|, |x - s16 code16|, |s16 code16|, |x|
        self.c8, self.c16, self.terms = kernels.codes_8_16(points, self.s8, self.s16, rows,
                                                           offset)
        self._bounds = None

    def _bound_terms(self) -> Tuple[np.ndarray, ...]:
        if self._bounds is None:
            out = self.terms
            norm = out[:, 4] * _MARGIN
            # the differences are rounded once in float64: relative to |x|, not to themselves
            self._bounds = (out[:, 0] * _MARGIN + 1e-12 * norm, out[:, 1] * _MARGIN,
                            out[:, 2] * _MARGIN + 1e-12 * norm, out[:, 3] * _MARGIN, norm)
        return self._bounds

    err8 = property(lambda self: self._bound_terms()[0])
    hat8 = property(lambda self: self._bound_terms()[1])
    err16 = property(lambda self: self._bound_terms()[2])
    hat16 = property(lambda self: self._bound_terms()[3])
    norm = property(lambda self: self._bound_terms()[4])


def _slacks(xc: _Codes8, qc: _Codes8, gamma: float, bits: int, dtype) -> Tuple[np.ndarray, ...]:
    """Twice the largest distance between a code similarity (int8 or int16 codes) and the
    float32 value, per candidate point (rows) and per query point (columns), in code units,
    rounded up, plus one.  The statement of the bound; the int8 path runs the same float64
    operations in C (``NativeKernels.int8_slacks``), tested equal to this."""
    scale = (xc.s8 * qc.s8) if bits == 8 else (xc.s16 * qc.s16)
    x_err, x_hat = (xc.err8, xc.hat8) if bits == 8 else (xc.err16, xc.hat16)
    rows, cols = _error_bounds(x_err, x_hat, xc.norm, qc.err8 if bits == 8 else qc.err16,
                               qc.norm, gamma)
    top = float(np.iinfo(dtype).max // 4)
    return tuple(np.minimum(np.ceil(2.0 * b / scale * _MARGIN) + 1.0, top).astype(dtype)
                 for b in (rows, cols))


class _Int8Verifier:
    """The int8 verified path of one query (see the comment above :class:`_Codes8`)."""

    def __init__(self, kernels, q: np.ndarray, absmax: Optional[float] = None):
        from ..accel.int8_kernels import mnn_query_layout8

        self.kernels, self.q = kernels, q
        self.qc = _Codes8(kernels, q, 0, 1, absmax)
        self.layout, self.zero = mnn_query_layout8(self.qc.c8.view(np.int8))
        self.gamma = _gamma(q.shape[1])

    def count(self, cand: np.ndarray, stats: Optional[dict], threads: Optional[int] = None,
              absmax: Optional[float] = None) -> Optional[int]:
        """The count of one candidate map (one thread), or None where its candidate pairs
        exceed the limit (near-duplicate maps: the fused path is cheaper).  ``absmax``:
        the map's largest |component| where the caller has it."""
        from ..accel.int8_kernels import MNN_ROWS

        del threads                       # the kernel runs on the calling thread
        xc = _Codes8(self.kernels, cand, 128, MNN_ROWS, absmax)
        qc = self.qc
        # _slacks in C (the same float64 operations; 25 numpy passes cost ~0.2 ms)
        row8, col8, row16, col16 = self.kernels.int8_slacks(
            xc.terms, qc.terms, (xc.s8, xc.s16), (qc.s8, qc.s16), self.gamma, _MARGIN)
        n_x, n_q = cand.shape[0], self.q.shape[0]
        out = self.kernels.mnn_int8_count(
            xc.c8, xc.c16, cand, self.layout, self.zero, qc.c16[:n_q], self.q, row8, col8,
            row16, col16, _INT8_MAX_PAIRS_PER_POINT * (n_x + n_q))
        if out is None:
            if stats is not None:
                stats["int8_handed_back"] = stats.get("int8_handed_back", 0) + 1
            return None
        if stats is not None:
            for key, value in (("int8", 1), ("int8_rows", n_x), ("int8_cols", n_q),
                               ("int8_ambiguous_rows", out[1]),
                               ("int8_ambiguous_cols", out[2]), ("int16_products", out[3]),
                               ("fp32_products", out[4])):
                stats[key] = stats.get(key, 0) + int(value)
        return int(out[0])


_FMA_CHECK: dict = {}


def _check_shape(n_x: int, n_q: int, channels: int) -> Tuple[int, int]:
    """The shape on which :func:`_blas_is_fma_chain` checks maps of n_x x n_q points: the
    maps' own where small (BLAS libraries take other kernels for small matrices: OpenBLAS
    on Zen 4 sums 85x85x32 differently), else one with the same remainders modulo 64
    (the edge tiles) that is still large."""
    if n_x * n_q * channels <= FUSED_MAX_MACS:
        return n_x, n_q
    return 256 + n_x % 64, 256 + n_q % 64


def _blas_is_fma_chain(kernels, channels: int = 128, n_x: int = 320, n_q: int = 320) -> bool:
    """Does numpy's float32 matmul of maps this size give, bit for bit, one in-order
    fused multiply-add chain per dot product (what the exact recomputation and the fused
    path compute)?  Checked once per process and shape (:func:`_check_shape`) on random
    data, every value; False sends re-ranking to the plain path."""
    rows, cols = _check_shape(max(int(n_x), 1), max(int(n_q), 1), int(channels))
    key = (id(kernels), int(channels), rows, cols)
    if key not in _FMA_CHECK:
        rng = np.random.default_rng(12345)
        a = rng.standard_normal((rows, channels)).astype(np.float32)
        b = rng.standard_normal((cols, channels)).astype(np.float32)
        ok = np.array_equal(np.matmul(a, np.ascontiguousarray(b.T)), kernels.fma_matrix(a, b))
        _FMA_CHECK[key] = bool(ok)
        if not ok:
            import logging
            logging.getLogger(__name__).info(
                "numpy's BLAS does not compute float32 dot products of %dx%dx%d maps as "
                "in-order FMA chains; exact re-ranking runs the plain float32 path",
                rows, cols, channels)
    return _FMA_CHECK[key]


def _native_kernels(native: Optional[bool], channels: int = 128, n_x: int = 320,
                    n_q: int = 320, cache: Optional[str] = None):
    """The native kernels for the fused and verified paths, or None (plain float32 path)."""
    if native is False or channels < 1:
        return None
    from ..accel.int8_kernels import native_kernels

    kernels = native_kernels(enabled=native, cache=cache)
    return kernels if kernels is not None and _blas_is_fma_chain(kernels, channels, n_x,
                                                                 n_q) else None


def mutual_nn_counts(query: ArrayLike, candidates, device: Union[str, torch.device, None] = None,
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                     compute: str = "fp32", native: Optional[bool] = None,
                     stats: Optional[dict] = None, path: str = "auto",
                     kernel_cache: Optional[str] = None) -> torch.LongTensor:
    """Mutual nearest-neighbour counts of one query map against K candidate maps -> (K,).

    ``compute``: "fp32" (exact, the official counts) or "bf16" (bfloat16 similarity
    matmul, float32 argmaxes).  On the CPU candidates go one at a time through one
    reused similarity buffer (``candidates`` may then be any sequence of maps, e.g. a
    memory-mapped array); on a GPU they are batched in chunks of at most
    ``max_chunk_bytes`` of similarity work space.  ``native``: False runs the plain
    float32 path on the CPU (no native kernels).  ``path``: which exact CPU path
    ("auto" chooses; "fused", "int8", "verified", "plain" force one where it can run, for
    benchmarks and tests; see :func:`_counts_cpu`).  ``stats``: a dict that collects how
    many candidates went through the fused and int8 paths, how many rows and columns the
    int16 verified path recomputed, and what the int8 path had to decide at its int16 and
    float32 levels.  ``kernel_cache``: folder of the compiled kernels
    (``AccelOptions.kernel_cache``; None = override / default).
    """
    compute = check_compute(compute)
    if device is None:
        device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu":
        return _counts_cpu(query, candidates, compute, native, stats, path, kernel_cache)
    mm_dtype = _COMPUTE_DTYPES[compute]
    if len(candidates) == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if not isinstance(candidates, (torch.Tensor, np.ndarray)):     # a sequence of maps
        candidates = np.stack([np.asarray(candidates[i], dtype=np.float32)
                               for i in range(len(candidates))])
    q = _as_points(query, False, device).float()
    cands = _as_points(candidates, True, None)
    k, p_cand, c = cands.shape
    if c != q.shape[1]:
        raise ValueError(f"query has {q.shape[1]} channels, candidates {c}")
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    # similarity + argmax work space per candidate (bf16 also holds its bf16 product)
    per_candidate = p_cand * q.shape[0] * (4 * 2 + (2 if compute == "bf16" else 0))
    chunk = max(1, int(max_chunk_bytes // max(per_candidate, 1)))
    q_mm = q.to(mm_dtype)
    # One similarity buffer reused by every chunk (a fresh 100+ MB tensor per chunk costs
    # page faults); same kernels, same values.
    rows = min(chunk, k)
    sim_buf = torch.empty((rows, p_cand, q.shape[0]), dtype=torch.float32, device=device)
    mm_buf = sim_buf if compute == "fp32" else torch.empty(sim_buf.shape, dtype=mm_dtype,
                                                           device=device)
    counts = []
    with torch.no_grad():
        for start in range(0, k, chunk):
            block = cands[start:start + chunk].to(device).to(mm_dtype)
            n = block.shape[0]
            sim = torch.matmul(block, q_mm.T, out=mm_buf[:n])
            if compute == "bf16":
                sim = sim_buf[:n].copy_(sim)     # exact widening of the bf16 values
            valid, _ = _matches_from_similarity(sim)
            counts.append(valid.sum(dim=1))
        del sim_buf, mm_buf
    return torch.cat(counts).to(torch.long)


def official_scores(counts: ArrayLike) -> torch.FloatTensor:
    """Counts -> official re-ranking scores (count == 1 gives 0)."""
    counts = torch.as_tensor(np.asarray(counts)) if isinstance(counts, np.ndarray) else counts
    scores = counts.to(torch.float32)
    return torch.where(counts == 1, torch.zeros_like(scores), scores)


def rerank_order(scores: ArrayLike) -> np.ndarray:
    """Positions of the candidates by descending score; ties keep first-stage order."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    return np.argsort(-s.astype(np.float64), kind="stable")


def rerank(query: ArrayLike, candidates: ArrayLike, device=None,
           max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
           compute: str = "fp32") -> Tuple[np.ndarray, np.ndarray]:
    """Convenience: (order of candidates, official scores in first-stage order)."""
    scores = official_scores(mutual_nn_counts(query, candidates, device, max_chunk_bytes,
                                              compute=compute))
    return rerank_order(scores), scores.cpu().numpy()


def train_similarity(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Pairwise training similarity of queries[i] and candidates[i] -> (B,).

    Mean over the query's mutual matches of the dot product with the matched candidate
    point.  As the official code: when exactly one match exists it falls back to the mean
    dot product of same-position points.  Gradients flow through the features (the
    matching itself is a hard argmax).
    """
    q = _as_points(queries, True, None)
    c = _as_points(candidates, True, q.device)
    if q.shape[0] != c.shape[0]:
        raise ValueError(f"{q.shape[0]} queries but {c.shape[0]} candidates")
    out = []
    for i in range(q.shape[0]):
        qi, ci = q[i], c[i]
        with torch.no_grad():
            valid, best = _mutual_matches(qi.detach().float(), ci.detach().float().unsqueeze(0))
        idx = torch.nonzero(valid[0]).squeeze(1)
        if idx.numel() == 1:
            out.append((qi * ci).sum(dim=1).mean())
        else:
            out.append((qi[idx] * ci[best[0, idx]]).sum(dim=1).mean())
    return torch.stack(out)
