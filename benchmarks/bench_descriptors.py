"""Descriptor speed: SciceVPR-B (and SelaVPR ViT-L) on this CPU, per precision and speed lever.

All variants run the *same* randomly initialised weights (seed 0; no download needed):

* ``eager_fp32``: the baseline, a plain eager float32 forward of the package model
  with timm's fused attention switched off (explicit softmax(QK^T)V, as the official
  DINOv2 code without xFormers) and the positional-embedding cache disabled (the
  bicubic resampling runs every call, as in the official code).  It is checked to give
  the same descriptors as the package's fp32 path.
* ``package_fp32`` / ``package_bf16``: ``vpr_ros.inference.GlobalDescriber`` as shipped
  (fused SDPA attention, cached positional embedding; bf16 = autocast).
* ``package_int8``: ``GlobalDescriber(precision="int8")`` as shipped
  (``vpr_ros.accel.int8_linear``: int8 weights per output channel, int8 activations with
  one scale per token, exact int32 ``torch._int_mm``; whole batches, batch-invariant; the
  passes between the matmuls fused in the native kernels of ``int8_kernels.c``), and
  ``package_int8_torch_ops``: the same model with those kernels switched off
  (``VPR_ROS_NATIVE_KERNELS=0``, the path used where no C compiler exists).
* prototypes of further levers, all on copies of the same model: ``bf16_weights``
  (weights and activations stored in bf16, no autocast casts), ``int8_dynamic``
  (``torch.ao.quantization.quantize_dynamic`` on the Linear layers, VNNI: one activation
  scale per whole input tensor, so a batch's images change each other's descriptors;
  the package's int8 before ``package_int8``, which then ran image by image),
  ``jit_freeze_bf16`` (TorchScript trace under bf16 autocast + ``torch.jit.freeze``:
  constant folding, oneDNN weight prepacking; the fp32 variant gave no gain in trials),
  ``ort_fp32`` / ``ort_int8_dynamic`` (ONNX Runtime, when installed: see
  ``onnxruntime_variants``), and with ``--compile``
  ``compile_bf16`` (``torch.compile``, inductor with ``freezing=True``, under bf16
  autocast; the first call compiles for minutes on 2 cores).

Reported: median seconds per image and images/s at batch 1 and 8 (interleaved runs, so
the ratios hold even when other processes load the machine), the speed-up over
``eager_fp32``, and fidelity on Nordland images: cosine to the fp32 descriptors and
whether every query keeps its top-1 database match.

Run: ``python benchmarks/bench_descriptors.py [--quick] [--compile]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_OUT, REPO_ROOT, fmt, interleaved_times, md_table, median,
                               peak_rss_mb, set_threads, write_json)

NORDLAND = REPO_ROOT.parent / "shared" / "data" / "nordland64_summer_winter_part1" / "images" / "test"


def load_nordland(n_db: int, n_q: int) -> tuple:
    from vpr_ros.preprocess import load_image
    db_files = sorted((NORDLAND / "database").glob("*.jpg"))
    q_files = sorted((NORDLAND / "queries").glob("*.jpg"))
    step_db = max(1, len(db_files) // n_db)
    step_q = max(1, len(q_files) // n_q)
    db = [load_image(p) for p in db_files[::step_db][:n_db]]
    q = [load_image(p) for p in q_files[::step_q][:n_q]]
    return db, q


def random_card(name: str):
    from vpr_ros.models.cards import load_card
    return load_card(name).replace(random_init_seed=0)


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """``name=value`` in os.environ for the block, the previous state restored after."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def eager_baseline(model):
    """A copy of the model with fused attention off and no positional-embedding cache."""
    from vpr_ros.models.dinov2 import resample_position_embedding
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = False
    bb = m.backbone

    def uncached(grid, bb=bb):
        return resample_position_embedding(bb.pos_embed, bb.pos_embed_grid, grid, bb.interpolate_offset)
    bb.position_embedding = uncached
    return m


def variants(model, describer_fp32, describer_bf16, compile_: bool,
             describer_int8=None, onnx: bool = True) -> Dict[str, Callable]:
    """name -> f(x: preprocessed float32 (B,3,H,W)) -> (B, D) float32 unit descriptors."""
    import torch
    import torch.nn.functional as F

    out: Dict[str, Callable] = {}
    base = eager_baseline(model).eval()
    out["eager_fp32"] = torch.inference_mode()(lambda x: base(x))
    out["package_fp32"] = describer_fp32.describe_tensor
    out["package_bf16"] = describer_bf16.describe_tensor
    if describer_int8 is not None:
        out["package_int8"] = describer_int8.describe_tensor

        def int8_torch_ops(x, d=describer_int8):
            """The same int8 model with the native fused kernels switched off."""
            from vpr_ros.accel.int8_kernels import ENV_SWITCH
            with environment(ENV_SWITCH, "0"):
                return d.describe_tensor(x)
        out["package_int8_torch_ops"] = int8_torch_ops

    m16 = copy.deepcopy(model).to(torch.bfloat16).eval()

    @torch.inference_mode()
    def bf16_weights(x):
        return F.normalize(m16(x.to(torch.bfloat16)).float(), dim=-1)
    out["bf16_weights"] = bf16_weights

    try:
        q8 = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                    dtype=torch.qint8)

        @torch.inference_mode()
        def int8_dynamic(x):
            return F.normalize(q8(x).float(), dim=-1)
        out["int8_dynamic"] = int8_dynamic
    except Exception as exc:  # noqa: BLE001 - a lever that does not work is a result
        print(f"[descriptors] int8_dynamic unavailable: {exc}")

    example = torch.zeros(1, 3, 224, 224)
    for name, dtype in (("jit_freeze_bf16", torch.bfloat16),):
        try:
            m = copy.deepcopy(model).eval()
            with torch.inference_mode(False), torch.no_grad():
                if dtype == torch.bfloat16:
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        traced = torch.jit.trace(m, example, check_trace=False)
                else:
                    traced = torch.jit.trace(m, example, check_trace=False)
                frozen = torch.jit.freeze(traced)

            def run(x, frozen=frozen, dtype=dtype):
                with torch.no_grad():
                    if dtype == torch.bfloat16:
                        with torch.autocast("cpu", dtype=torch.bfloat16):
                            y = frozen(x)
                    else:
                        y = frozen(x)
                return F.normalize(y.float(), dim=-1)
            run(example)
            out[name] = run
        except Exception as exc:  # noqa: BLE001
            print(f"[descriptors] {name} unavailable: {type(exc).__name__}: {str(exc)[:200]}")

    if onnx:
        out.update(onnxruntime_variants(model))

    if compile_:
        try:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True           # fold weights, oneDNN prepacking
            mc = torch.compile(copy.deepcopy(model).eval())

            @torch.inference_mode()
            def compiled(x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y = mc(x)
                return F.normalize(y.float(), dim=-1)
            t0 = time.perf_counter()
            compiled(torch.zeros(1, 3, 224, 224))
            compiled(torch.zeros(8, 3, 224, 224))
            print(f"[descriptors] torch.compile warm-up {time.perf_counter() - t0:.0f} s")
            out["compile_bf16"] = compiled
        except Exception as exc:  # noqa: BLE001
            print(f"[descriptors] compile_bf16 unavailable: {type(exc).__name__}: {str(exc)[:200]}")
    return out


def onnxruntime_variants(model) -> Dict[str, Callable]:
    """ONNX Runtime prototypes, if ``onnxruntime`` and ``onnx`` are installed
    (``benchmarks/requirements-optional.txt``; not needed by the package):

    * ``ort_fp32``: the model exported with the TorchScript exporter (opset 17, dynamic
      batch), CPU execution provider, all graph optimisations, torch's thread count;
    * ``ort_int8_dynamic``: ``onnxruntime.quantization.quantize_dynamic`` of that file
      (int8 weights per channel, activations quantised per tensor at run time, so a
      batch's images change each other's descriptors).
    """
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        print("[descriptors] onnxruntime not installed: ORT variants skipped "
              "(pip install -r benchmarks/requirements-optional.txt)")
        return {}
    import shutil
    import tempfile

    import torch
    import torch.nn.functional as F
    folder = Path(tempfile.mkdtemp(prefix="vpr_ort_"))
    try:
        fp32_path, int8_path = folder / "scicevpr_b.onnx", folder / "scicevpr_b_int8.onnx"
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(copy.deepcopy(model).eval(), (torch.zeros(1, 3, 224, 224),),
                              str(fp32_path), opset_version=17, dynamo=False,
                              input_names=["image"], output_names=["descriptor"],
                              dynamic_axes={"image": {0: "batch"}, "descriptor": {0: "batch"}})
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8,
                         per_channel=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        out: Dict[str, Callable] = {}
        for name, path in (("ort_fp32", fp32_path), ("ort_int8_dynamic", int8_path)):
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

            def run(x, session=session):
                y = session.run(None, {"image": x.contiguous().numpy()})[0]
                return F.normalize(torch.from_numpy(y).float(), dim=-1)
            out[name] = run
        return out
    except Exception as exc:  # noqa: BLE001 - a lever that does not work is a result
        print(f"[descriptors] ONNX Runtime variants unavailable: {type(exc).__name__}: "
              f"{str(exc)[:200]}")
        return {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)     # the sessions hold the models in memory


def describe_all(fn: Callable, images: List[np.ndarray], batch: int = 8) -> np.ndarray:
    from vpr_ros.preprocess import preprocess
    outs = []
    for s in range(0, len(images), batch):
        x = preprocess(images[s:s + batch], (224, 224))
        outs.append(fn(x).detach().float().cpu().numpy())
    return np.concatenate(outs)


def fidelity(fns: Dict[str, Callable], db_imgs, q_imgs) -> Dict[str, dict]:
    """Cosine to package_fp32 and top-1 agreement of query -> database retrieval."""
    ref_db = describe_all(fns["package_fp32"], db_imgs)
    ref_q = describe_all(fns["package_fp32"], q_imgs)
    ref_top1 = np.argmax(ref_q @ ref_db.T, axis=1)
    out = {}
    for name, fn in fns.items():
        if name == "package_fp32":
            continue
        t0 = time.perf_counter()
        vdb = describe_all(fn, db_imgs)
        vq = describe_all(fn, q_imgs)
        cos = np.concatenate([np.sum(vdb * ref_db, 1), np.sum(vq * ref_q, 1)])
        top1 = np.argmax(vq @ vdb.T, axis=1)
        out[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "max_abs_diff": float(max(np.abs(vdb - ref_db).max(), np.abs(vq - ref_q).max())),
                     "top1_identical": float((top1 == ref_top1).mean()),
                     "n_db": len(db_imgs), "n_queries": len(q_imgs),
                     "seconds": time.perf_counter() - t0}
        print(f"[descriptors] fidelity {name}: cos min {cos.min():.5f}, top-1 same "
              f"{(top1 == ref_top1).mean():.3f}", flush=True)
    return out


INVARIANCE_VARIANTS = ("package_fp32", "package_int8", "package_int8_torch_ops", "int8_dynamic",
                       "ort_int8_dynamic")


def batch_invariance(fns: Dict[str, Callable], images,
                     names=INVARIANCE_VARIANTS) -> Dict[str, dict]:
    """Each image described alone vs within one batch of all ``images``: max |difference|."""
    from vpr_ros.preprocess import preprocess
    x = preprocess(images, (224, 224))
    out = {}
    for name in names:
        if name not in fns:
            continue
        batch = fns[name](x).detach().float().cpu().numpy()
        alone = np.concatenate([fns[name](x[i:i + 1]).detach().float().cpu().numpy()
                                for i in range(len(images))])
        out[name] = {"max_abs_diff_alone_vs_batch": float(np.abs(alone - batch).max()),
                     "bit_identical": bool(np.array_equal(alone, batch)), "batch": len(images)}
        print(f"[descriptors] batch invariance {name}: {out[name]}", flush=True)
    return out


def speed(fns: Dict[str, Callable], x_by_batch: Dict[int, object], repeats: Dict[int, int]) -> Dict[str, dict]:
    out: Dict[str, dict] = {name: {} for name in fns}
    for b, x in x_by_batch.items():
        calls = {name: (lambda fn=fn, x=x: fn(x)) for name, fn in fns.items()}
        times = interleaved_times(calls, repeats[b], warmup=1)
        base = median(times["eager_fp32"])
        for name, ts in times.items():
            m = median(ts)
            # each round times all variants back to back: the median of the per-round
            # ratios is the least sensitive to load that drifts during the run
            paired = median([e / t for e, t in zip(times["eager_fp32"], ts)])
            out[name][f"b{b}"] = {"s_per_batch": m, "ms_per_image": 1000 * m / b,
                                  "images_per_s": b / m, "speedup_vs_eager_fp32": base / m,
                                  "speedup_paired": paired,
                                  # other jobs only ever add time: the fastest of N runs is
                                  # the closest to the undisturbed cost
                                  "speedup_best_of_runs": min(times["eager_fp32"]) / min(ts),
                                  "runs": len(ts)}
        print(f"[descriptors] batch {b}: " + ", ".join(
            f"{n} {1000 * median(t) / b:.0f} ms/img" for n, t in times.items()), flush=True)
    return out


CHILD_VARIANTS = ("eager_fp32", "package_fp32", "package_bf16", "package_int8",
                  "package_int8_torch_ops")


def speed_with_omp_default(quick: bool) -> dict:
    """The package's variants timed again in a child process under the OpenMP default.

    This benchmark process runs with ``OMP_WAIT_POLICY=PASSIVE`` (set in common.py for
    FAISS on a loaded machine): idle OpenMP threads sleep at once and every parallel
    region starts by waking them, which costs a forward with many short regions (the
    int8 path at batch 1) more than one with few long ones.  The node and the CLI do not
    set the policy, so the OpenMP runtime's default (spin briefly, then sleep) is what
    users get; the child measures that, with the same weights, inputs and rounds.
    """
    import json
    import subprocess
    import sys

    from benchmarks.common import OMP_DEFAULT_ENV
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env[OMP_DEFAULT_ENV] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-speed"] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describers():
    """The package's fp32, bf16 and int8 describers of SciceVPR-B with the same weights
    (random, seed 0); fp32 and bf16 share one model (bf16 = autocast over it)."""
    import torch
    from vpr_ros.inference import GlobalDescriber
    card = random_card("scicevpr_b")
    d32 = GlobalDescriber(card, device="cpu", precision="fp32", batch_size=8)
    d16 = GlobalDescriber.__new__(GlobalDescriber)
    d16.__dict__.update(d32.__dict__)
    d16.dtype, d16.precision = torch.bfloat16, "bf16"
    d8 = GlobalDescriber(card, device="cpu", precision="int8", batch_size=8)
    return d32, d16, d8


def speed_setup(quick: bool):
    """(Nordland database images, query images, inputs by batch size, rounds by batch size)."""
    from vpr_ros.preprocess import preprocess
    n = 8 if quick else 32
    db_imgs, q_imgs = load_nordland(n, n)
    x_by_batch = {1: preprocess(q_imgs[:1], (224, 224)), 8: preprocess(q_imgs[:8], (224, 224))}
    repeats = {1: 2, 8: 1} if quick else {1: 11, 8: 5}
    return db_imgs, q_imgs, x_by_batch, repeats


def child_speed(quick: bool) -> dict:
    set_threads(2)
    d32, d16, d8 = describers()
    fns = variants(d32.model, d32, d16, False, describer_int8=d8, onnx=False)
    fns = {name: fns[name] for name in CHILD_VARIANTS}
    _, _, x_by_batch, repeats = speed_setup(quick)
    return {"omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (runtime default)"),
            "speed": speed(fns, x_by_batch, repeats)}


def selavpr_speed(quick: bool) -> dict:
    """SelaVPR ViT-L (global + 61x61x128 local features), batch 1: fp32 vs bf16 weights vs
    int8 (with the integer attention, and with float32 SDPA: VPR_ROS_INTEGER_ATTENTION=0)."""
    import torch
    from vpr_ros.inference import LocalFeatureExtractor
    from vpr_ros.accel.int8_block import ENV_ATTENTION
    card = random_card("selavpr_vitl14")
    t0 = time.perf_counter()
    fp32 = LocalFeatureExtractor(card, device="cpu", precision="fp32", batch_size=1)
    build_s = time.perf_counter() - t0
    bf16 = LocalFeatureExtractor.__new__(LocalFeatureExtractor)
    bf16.__dict__.update(fp32.__dict__)          # same model object, other precision
    bf16.dtype, bf16.precision = torch.bfloat16, "bf16"
    int8 = LocalFeatureExtractor(card, device="cpu", precision="int8", batch_size=1)

    def int8_float_attention(x):
        with environment(ENV_ATTENTION, "0"):
            return int8.extract_tensor(x)

    x = torch.randn(1, 3, 224, 224)
    reps = 2 if quick else 4
    fns = {"fp32": fp32.extract_tensor, "bf16": bf16.extract_tensor, "int8": int8.extract_tensor,
           "int8_float_attention": int8_float_attention}
    times = interleaved_times({k: (lambda f=f: f(x)) for k, f in fns.items()}, reps, warmup=1)
    g32, l32 = fp32.extract_tensor(x)
    res = {"build_s": build_s, "fp32_s_per_image": median(times["fp32"]),
           "official_fp32_s_per_image_reference": 1.4}
    for name in ("bf16", "int8", "int8_float_attention"):
        g, loc = fns[name](x)
        res[f"{name}_s_per_image"] = median(times[name])
        res[f"{name}_speedup"] = median(times["fp32"]) / median(times[name])
        res[f"{name}_global_cosine_min"] = torch.nn.functional.cosine_similarity(g32, g.float()).min().item()
        res[f"{name}_local_cosine_mean"] = (l32 * loc.float()).sum(-1).mean().item()
    return res


def run(quick: bool, compile_: bool = False, selavpr: bool = True) -> dict:
    set_threads(2)
    t0 = time.perf_counter()
    d32, d16, d8 = describers()
    build_s = time.perf_counter() - t0
    fns = variants(d32.model, d32, d16, compile_, describer_int8=d8)
    db_imgs, q_imgs, x_by_batch, repeats = speed_setup(quick)
    res = {"model": "scicevpr_b (random weights, seed 0)", "build_s": build_s,
           "official_fp32_s_per_image_reference": 0.38,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset (runtime default)"),
           "speed": speed(fns, x_by_batch, repeats),
           "fidelity": fidelity(fns, db_imgs, q_imgs),
           "batch_invariance": batch_invariance(fns, q_imgs[:8])}
    del fns, d32, d16, d8
    res["speed_omp_default"] = speed_with_omp_default(quick)
    if selavpr:
        try:
            res["selavpr_vitl14"] = selavpr_speed(quick)
        except Exception as exc:  # noqa: BLE001 - keep the SciceVPR results
            res["selavpr_vitl14_error"] = f"{type(exc).__name__}: {exc}"
    res["peak_rss_mb"] = peak_rss_mb()
    return res


def _speedup(r: dict) -> str:
    text = fmt(r["speedup_vs_eager_fp32"], 2)
    if "speedup_best_of_runs" in r:
        text += f" ({fmt(r['speedup_best_of_runs'], 2)})"
    return text


def markdown(res: dict) -> str:
    lines = ["## Descriptors (SciceVPR-B, 224x224, random weights, 2 threads)", "",
             "Speed-up = median eager fp32 time / median variant time, measured interleaved "
             "in the same run; in brackets the ratio of the fastest runs (other jobs on the "
             "machine only ever add time, and a fixed added delay shrinks the ratio of a "
             "faster variant most). "
             "Fidelity vs the package fp32 descriptors on Nordland images "
             f"({next(iter(res['fidelity'].values()))['n_queries']} queries x "
             f"{next(iter(res['fidelity'].values()))['n_db']} database).", ""]
    rows = []
    for name, r in res["speed"].items():
        f = res["fidelity"].get(name, {})
        rows.append([name, fmt(r["b1"]["ms_per_image"], 0), _speedup(r["b1"]),
                     fmt(r["b8"]["ms_per_image"], 0), fmt(r["b8"]["images_per_s"], 2),
                     _speedup(r["b8"]),
                     fmt(f.get("cosine_min"), 5) if f else "1 (reference)",
                     fmt(f.get("top1_identical"), 3) if f else "1"])
    lines.append(md_table(["variant", "b1 ms/img", "b1 speed-up", "b8 ms/img", "b8 img/s",
                           "b8 speed-up", "min cosine to fp32", "top-1 identical"], rows))
    child = res.get("speed_omp_default", {})
    if "speed" in child:
        lines += ["", "The package's variants again, in a child process under the OpenMP runtime's "
                  f"default wait policy (this process: OMP_WAIT_POLICY={res.get('omp_wait_policy')}; "
                  "the node and the CLI do not set it):", ""]
        crow = [[name, fmt(r["b1"]["ms_per_image"], 0), _speedup(r["b1"]), fmt(r["b8"]["ms_per_image"], 0),
                 _speedup(r["b8"])] for name, r in child["speed"].items()]
        lines.append(md_table(["variant", "b1 ms/img", "b1 speed-up", "b8 ms/img", "b8 speed-up"], crow))
    elif "error" in child:
        lines += ["", f"(child run under the OpenMP default failed: {child['error'][-300:]})"]
    if res.get("batch_invariance"):
        lines.append("")
    for name, r in res.get("batch_invariance", {}).items():
        lines.append(f"- {name}: alone vs in a batch of {r['batch']}: "
                     + ("bit-identical" if r["bit_identical"]
                        else f"max |difference| {r['max_abs_diff_alone_vs_batch']:.2e}"))
    if "selavpr_vitl14" in res:
        s = res["selavpr_vitl14"]
        lines += ["", "SelaVPR ViT-L/14 (global + 61x61x128 local features), batch 1, interleaved; "
                  "official fp32 on this CPU: 1.4 s/img:", "",
                  "| variant | s/img | speed-up vs fp32 | global cosine min | local cosine mean |",
                  "|---|---|---|---|---|",
                  f"| fp32 | {s['fp32_s_per_image']:.2f} | 1.00 | reference | reference |"]
        for name in ("bf16", "int8", "int8_float_attention"):
            if f"{name}_s_per_image" in s:
                lines.append(f"| {name} | {s[f'{name}_s_per_image']:.2f} | {s[f'{name}_speedup']:.2f} "
                             f"| {s[f'{name}_global_cosine_min']:.5f} "
                             f"| {s[f'{name}_local_cosine_mean']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (slow warm-up)")
    ap.add_argument("--no-selavpr", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--child-speed", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child_speed:                      # see speed_with_omp_default
        import json
        print(json.dumps(child_speed(a.quick)))
        return
    res = run(a.quick, a.compile, not a.no_selavpr)
    write_json(a.out / "descriptors.json", res)
    print(markdown(res))


if __name__ == "__main__":
    main()
