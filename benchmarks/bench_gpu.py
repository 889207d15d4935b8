"""GPU benchmark (run by `make gpu-check`): descriptors, re-ranking and FAISS on one CUDA device.

Needs a CUDA device and the package's virtual environment; no network (random weights,
synthetic maps).  Sized to finish in a few minutes on one data-centre GPU:

* SciceVPR-B (random weights) at 224x224: ms per image at batch 1 and 8 in fp32, fp16
  and bf16 (autocast), and with CUDA graphs (fp16, batch 1: ``torch.cuda.graphs``, the
  launch overhead of ~200 small kernels removed); cosine to fp32.
* SelaVPR ViT-L/14 query features (global + 61x61x128 local), batch 1, fp32 / fp16.
* MNN re-ranking of 61x61x128 maps, top-20 and top-100: the official algorithm in the
  official code's shape on the GPU (``bench_rerank.official_batched_counts`` on CUDA
  tensors: all K matrices in one batched matmul) against the package's chunked GPU path
  in fp32 (counts asserted identical) and bf16.  The official SelaVPR paper reports
  0.018 s for top-20 re-ranking on an RTX 3090; the table quotes it for reference only
  (another GPU, not a ratio).
* FAISS flat inner-product search of 100k x 1024 descriptors on the GPU, where
  faiss-gpu is installed (else the row says so).

Every ratio is between variants timed round-robin in this run on this GPU.  Writes
``gpu.json`` / ``gpu.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import DEFAULT_OUT, machine_info, md_table, write_outputs

OFFICIAL_SELAVPR_TOP20_RTX3090_S = 0.018


def cuda_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds per call, variants interleaved, with device synchronisation."""
    import statistics

    import torch
    for fn in fns.values():                                # warm-up (cuDNN / cuBLAS choices)
        fn()
    torch.cuda.synchronize()
    times: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {n: statistics.median(t) for n, t in times.items()}


def descriptors(repeats: int) -> dict:
    import torch

    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
    from vpr_ros.models.cards import load_card

    card = load_card("scicevpr_b").replace(random_init_seed=0)
    out: dict = {}
    models = {p: GlobalDescriber(card, device="cuda", precision=p)
              for p in ("fp32", "fp16", "bf16") if p != "bf16" or torch.cuda.is_bf16_supported()}
    for batch in (1, 8):
        x = torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0)).cuda()
        ref = models["fp32"].describe_tensor(x).float()
        t = cuda_times({p: (lambda m=m: m.describe_tensor(x)) for p, m in models.items()}, repeats)
        for p, m in models.items():
            cos = torch.nn.functional.cosine_similarity(m.describe_tensor(x).float(), ref).min()
            out[f"scicevpr_b b{batch} {p}"] = {"ms_per_image": 1e3 * t[p] / batch,
                                               "speedup_vs_fp32": t["fp32"] / t[p],
                                               "min_cosine_to_fp32": float(cos)}
    # CUDA graphs: one captured forward replayed (batch 1, fp16 weights)
    half = models["fp16"]
    try:
        net = half.model
        static = torch.rand(1, 3, 224, 224, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad(), torch.autocast("cuda", torch.float16):
            for _ in range(3):
                net(static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad(), torch.autocast("cuda", torch.float16):
            static_out = net(static)
        t = cuda_times({"eager": lambda: half.describe_tensor(static), "graph": graph.replay},
                       repeats)
        out["scicevpr_b b1 fp16 CUDA graph"] = {"ms_per_image": 1e3 * t["graph"],
                                                "speedup_vs_eager_fp16": t["eager"] / t["graph"],
                                                "output_shape": list(static_out.shape)}
    except Exception as exc:                            # report, do not hide
        out["scicevpr_b b1 fp16 CUDA graph"] = {"error": f"{type(exc).__name__}: {exc}"}
    sela = {p: LocalFeatureExtractor(load_card("selavpr_vitl14").replace(random_init_seed=0),
                                     device="cuda", precision=p) for p in ("fp32", "fp16")}
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    t = cuda_times({p: (lambda m=m: m.extract_tensor(x)) for p, m in sela.items()}, repeats)
    for p in sela:
        out[f"selavpr_vitl14 b1 {p}"] = {"ms_per_image": 1e3 * t[p],
                                         "speedup_vs_fp32": t["fp32"] / t[p]}
    return out


def rerank(repeats: int) -> dict:
    import torch

    from bench_rerank import official_batched_counts, synthetic_maps
    from vpr_ros.models.rerank import mutual_nn_counts

    out: dict = {}
    for k in (20, 100):
        queries, cands = synthetic_maps(1, k, seed=k)
        q, c = queries[0].float().cuda(), cands[0].cuda()

        def official():
            with torch.no_grad():
                sims = torch.matmul(c.float(), q.T)
                best_cand, best_query = sims.argmax(dim=1), sims.argmax(dim=2)
                back = best_query[torch.arange(sims.shape[0], device="cuda").reshape(-1, 1),
                                  best_cand]
                arange = torch.arange(sims.shape[-1], device="cuda")
                mutual = arange.repeat(sims.shape[0], 1) == back
                return [torch.nonzero(mutual[i]).squeeze().numel() for i in range(k)]

        want = official_batched_counts(queries[0].float(), cands[0])
        assert official() == want.tolist()
        assert torch.equal(mutual_nn_counts(q, c, device="cuda").cpu(), want)
        t = cuda_times({"official": official,
                        "package fp32": lambda: mutual_nn_counts(q, c, device="cuda"),
                        "package bf16": lambda: mutual_nn_counts(q, c, device="cuda",
                                                                 compute="bf16")}, repeats)
        for name, v in t.items():
            out[f"top{k} {name}"] = {"s_per_query": v, "speedup_vs_official": t["official"] / v}
    return out


def faiss_search(repeats: int) -> dict:
    import numpy as np
    try:
        import faiss
    except ImportError:
        return {"faiss": {"note": "faiss not installed"}}
    if not hasattr(faiss, "StandardGpuResources"):
        return {"faiss": {"note": "faiss-cpu only (install faiss-gpu for this row)"}}
    import torch
    rng = np.random.default_rng(0)
    base = rng.standard_normal((100_000, 1024)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    query = base[:1] + 0.01
    cpu = faiss.IndexFlatIP(1024)
    cpu.add(base)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, cpu)
    t = cuda_times({"cpu": lambda: cpu.search(query, 10), "gpu": lambda: gpu.search(query, 10)},
                   repeats)
    _ = torch  # (cuda_times synchronises torch's stream; FAISS calls are synchronous)
    return {"faiss flat 100k x 1024, 1 query": {"cpu_ms": 1e3 * t["cpu"], "gpu_ms": 1e3 * t["gpu"],
                                                "speedup": t["cpu"] / t["gpu"]}}


def markdown(res: dict) -> str:
    lines = ["## GPU check", "", f"{res['date_utc']} UTC; {res['gpu']}; "
             f"{res['machine'].get('cpu_model', '?')}", ""]
    rows = [[name, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in vals.items())]
            for section in ("descriptors", "rerank", "faiss")
            for name, vals in res[section].items()]
    lines.append(md_table(["measurement", "values"], rows))
    lines += ["", f"Official SelaVPR paper: top-20 re-ranking {OFFICIAL_SELAVPR_TOP20_RTX3090_S} s "
              "on an RTX 3090 (another GPU: for reference, not a ratio)."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(2)
    res = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
           "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "machine": machine_info(), "descriptors": descriptors(args.repeats),
           "rerank": rerank(args.repeats), "faiss": faiss_search(args.repeats)}
    print(write_outputs(args.out, "gpu", res, markdown))


if __name__ == "__main__":
    main()
