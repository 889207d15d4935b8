"""SelaVPR re-ranking: mutual-nearest-neighbour matching of dense local features.

For a query map q (P points x C) and a candidate map c (P' x C), S = c q^T.  A query
point i *matches* if its best candidate point j = argmax_j S[j, i] has i as its own
best query point (argmax_i S[j, i] == i): mutual nearest neighbours.  ``argmax`` takes
the first index on exact ties, as ``torch.argmax`` does in the official code.

* :func:`mutual_nn_counts` - number of matches per candidate.  On the CPU the candidates
  go one at a time through one reused similarity buffer (55 MB for 61x61 maps): the
  matmul through numpy's BLAS, the best query point of every candidate point with
  numpy's contiguous argmax, the best candidate point of every query point with
  :func:`first_argmax_over_rows` (tiled, first index on ties); ``candidates`` may be any
  sequence of maps (a memory-mapped float16 array, an int8 store that dequantises one
  place at a time).  On a GPU they are batched in chunks of at most ``max_chunk_bytes``
  of similarity work space.  Float16 inputs are upcast per candidate/chunk.
  ``compute="fp32"`` (the default) is exact: identical counts to the official algorithm.
  ``compute="bf16"`` is an
  opt-in fast path: the similarity matmul runs in bfloat16 (AMX/AVX512-BF16 on recent
  CPUs, tensor cores on GPUs), each chunk's bf16 product is widened to float32 (exactly:
  every bf16 value is a float32 value) and both argmaxes run on that, so they are still
  first-index-on-ties exact *for the bf16 similarities*; only the similarities themselves
  are rounded (resolution ~0.004 near 1), which moves near-tie matches: counts of maps of
  different places change by ~0.5-3%, but a near-duplicate map (the same place seen
  again, many neighbouring points within one bf16 step of the best) can lose a third of
  its matches to first-index ties (docs/fast_paths.md).
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


def _points_np(x, what: str) -> np.ndarray:
    """One local feature map (H, W, C) or (P, C), tensor or array -> (P, C) float32 C-order."""
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


def _counts_cpu(query, candidates, compute: str) -> torch.LongTensor:
    """CPU path: one candidate at a time into one reused similarity buffer.

    The similarity matmul goes through numpy's BLAS (OpenBLAS in the numpy wheels: about
    1.7x faster than ``torch.mm`` for this 3721x128x3721 shape on the CPUs measured, and
    bit-identical on them: both accumulate the 128 products in order); ``compute="bf16"``
    runs it in bfloat16 with torch and widens the product into the same buffer.  The
    candidates are read one by one, so ``candidates`` may be a memory-mapped array or any
    sequence that gives one map per index (e.g. a dequantising view of int8 storage).
    """
    q = _points_np(query, "query")
    k = len(candidates)
    counts = np.zeros(k, dtype=np.int64)
    q_t = np.ascontiguousarray(q.T)
    q_t_bf16 = torch.from_numpy(q_t).to(torch.bfloat16) if compute == "bf16" else None
    sim = mm_buf = None
    for i in range(k):
        cand = _points_np(candidates[i], "candidate")
        if cand.shape[1] != q.shape[1]:
            raise ValueError(f"query has {q.shape[1]} channels, candidates {cand.shape[1]}")
        if sim is None or sim.shape[0] != cand.shape[0]:
            sim = np.empty((cand.shape[0], q.shape[0]), dtype=np.float32)
            mm_buf = None
        if compute == "fp32":
            np.matmul(cand, q_t, out=sim)
        else:
            if mm_buf is None:
                mm_buf = torch.empty(sim.shape, dtype=torch.bfloat16)
            torch.mm(torch.from_numpy(cand).to(torch.bfloat16), q_t_bf16, out=mm_buf)
            torch.from_numpy(sim).copy_(mm_buf)            # exact widening of bf16 values
        counts[i] = mutual_count(sim)
    return torch.from_numpy(counts)


def mutual_nn_counts(query: ArrayLike, candidates, device: Union[str, torch.device, None] = None,
                     max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                     compute: str = "fp32") -> torch.LongTensor:
    """Mutual nearest-neighbour counts of one query map against K candidate maps -> (K,).

    ``compute``: "fp32" (exact, the official counts) or "bf16" (bfloat16 similarity
    matmul, float32 argmaxes).  On the CPU candidates go one at a time through one
    reused similarity buffer (``candidates`` may then be any sequence of maps, e.g. a
    memory-mapped array); on a GPU they are batched in chunks of at most
    ``max_chunk_bytes`` of similarity work space.
    """
    compute = check_compute(compute)
    if device is None:
        device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu":
        return _counts_cpu(query, candidates, compute)
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
