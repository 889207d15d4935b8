"""The int8 multiply-add peak of this CPU, and the package's int8 matmul against it.

A floor claimed from a spec sheet can be wrong by the clock, the VM or the core count;
this measures it.  A small C program (compiled here with ``cc -O2 -march=native
-fopenmp``) runs 16 independent chains of ``vpdpbusd zmm`` (AVX-512 VNNI: 64 u8 x s8
multiply-adds each, operands in registers, no memory traffic) on 1 thread and on
``--threads`` threads; that rate is the most any int8 matmul can reach here.  In the same
run, ``NativeKernels.int8_gemm`` (``vpr_int8_gemm``, what the int8 models multiply with)
runs the SciceVPR-B and SelaVPR ViT-L layer shapes at 257 rows, with hot weights (one
weight reused) and cold weights (~60 MB of weights cycled, as in a forward, where every
layer's weights come from DRAM); the table gives each rate as a share of the peak.

Run: ``python benchmarks/bench_vnni_peak.py [--threads 2] [--out DIR]``; prints the table,
writes ``vnni_peak.json`` and ``vnni_peak.md`` into ``--out``.  Needs a C compiler and a
CPU with AVX-512 VNNI (exit status 2 with one line otherwise).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_OUT, machine_info, md_table, median, set_threads,
                               write_outputs)

PEAK_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#ifndef __AVX512VNNI__
#error "no AVX-512 VNNI"
#endif
/* argv: threads, instructions per thread (a multiple of 16).  Prints G multiply-adds/s
 * of all threads. */
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    const int threads = atoi(argv[1]);
    const long per_thread = atol(argv[2]) / 16 * 16;
    if (threads < 1 || per_thread < 16) return 2;
    long sink = 0;
    const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
        __m512i acc[16];
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_epi32(i);
        __m512i a = _mm512_set1_epi32(0x01010101), b = _mm512_set1_epi32(0x02020202);
        for (long it = 0; it < per_thread / 16; ++it) {
            /* unrolled, so that the 16 accumulators live in registers */
#pragma GCC unroll 16
            for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
            __asm__ volatile("" : "+v"(a));   /* the operands stay live: no hoisting */
        }
        for (int i = 0; i < 16; ++i) sink += _mm512_reduce_add_epi32(acc[i]);
    }
    const double t = omp_get_wtime() - t0;
    printf("%.3f %ld\n", (double)threads * per_thread * 64.0 / t / 1e9, sink & 1);
    return 0;
}
"""

# (K, N) of the int8 layers at 257 rows, and how many of each one image runs
SHAPES = {
    "SciceVPR-B": {(768, 2304): 12, (768, 768): 12, (768, 3072): 12, (3072, 768): 12},
    "SelaVPR ViT-L": {(1024, 3072): 24, (1024, 1024): 24, (1024, 4096): 24, (4096, 1024): 24,
                      (1024, 512): 48, (512, 1024): 48},
}
ROWS = 257


class PeakUnavailable(RuntimeError):
    pass


def build_peak(work: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise PeakUnavailable("no C compiler (cc) on PATH")
    src, exe = work / "vnni_peak.c", work / "vnni_peak"
    src.write_text(PEAK_SOURCE)
    done = subprocess.run([cc, "-O2", "-march=native", "-fopenmp", "-o", str(exe), str(src)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        why = "this CPU has no AVX-512 VNNI" if "no AVX-512 VNNI" in done.stderr else \
            f"the peak program did not compile: {last}"
        raise PeakUnavailable(why)
    return exe


def peak_rate(exe: Path, threads: int, instructions: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        done = subprocess.run([str(exe), str(threads), str(instructions)], capture_output=True,
                              text=True)
        if done.returncode != 0 or not done.stdout.split():
            raise PeakUnavailable(f"the peak program failed (exit status {done.returncode})")
        rates.append(float(done.stdout.split()[0]))
    return max(rates)   # the peak: interference only ever slows a run down


def gemm_rates(repeats: int) -> dict:
    """Each layer shape's matmul rate (torch's thread count, set by :func:`run`)."""
    import torch

    from vpr_ros.accel.int8_kernels import native_kernels, pack_int8_weight

    kernels = native_kernels()
    if kernels is None or not kernels.has_vnni:
        raise PeakUnavailable("the package's native kernels did not build with VNNI")
    torch.manual_seed(0)
    shapes = sorted({s for model in SHAPES.values() for s in model})
    rows = {}
    for k, n in shapes:
        copies = max(2, 60_000_000 // (k * n))
        weights = [pack_int8_weight(torch.randint(-127, 128, (k, n), dtype=torch.int8))
                   for _ in range(copies)]
        a = torch.randint(-128, 128, (ROWS, k), dtype=torch.int8)
        out = torch.empty((ROWS, n), dtype=torch.int32)
        hot, cold = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(copies):
                kernels.int8_gemm(a, weights[0], out)
            hot.append((time.perf_counter() - t) / copies)
            t = time.perf_counter()
            for w in weights:
                kernels.int8_gemm(a, w, out)
            cold.append((time.perf_counter() - t) / copies)
        macs = ROWS * k * n
        rows[f"{k}x{n}"] = {"k": k, "n": n, "hot_s": median(hot), "cold_s": median(cold),
                            "hot_gmacs": macs / median(hot) / 1e9,
                            "cold_gmacs": macs / median(cold) / 1e9}
    return rows


def run(threads: int, repeats: int) -> dict:
    set_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_peak(Path(tmp))
        peak_1 = peak_rate(exe, 1, 2_000_000_000, repeats)
        peak_n = peak_rate(exe, threads, 2_000_000_000, repeats)
    shapes = gemm_rates(repeats)
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": machine_info(), "threads": threads, "repeats": repeats, "rows": ROWS,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "runtime default"),
            "peak_gmacs_1_thread": peak_1, "peak_gmacs": peak_n, "shapes": shapes,
            "models": model_floors(peak_n, shapes)}


def model_floors(peak_gmacs: float, shapes: dict) -> dict:
    """Per model: its int8 multiply-adds (G), their time at the peak (the floor) and the
    sum of its layers' measured cold-weight matmul times (``shapes`` from
    :func:`gemm_rates`)."""
    models = {}
    for model, counts in SHAPES.items():
        macs = sum(ROWS * k * n * c for (k, n), c in counts.items())
        cold = sum(shapes[f"{k}x{n}"]["cold_s"] * c for (k, n), c in counts.items())
        models[model] = {"gmacs": macs / 1e9, "floor_s": macs / (peak_gmacs * 1e9),
                         "cold_s": cold}
    return models


def markdown(res: dict) -> str:
    m, peak = res["machine"], res["peak_gmacs"]
    lines = ["## int8 multiply-add peak and the package's matmul against it", "",
             f"{res['date_utc']} UTC; {m.get('cpu_model', '?')}, {m.get('logical_cpus', '?')} "
             f"logical CPUs, load average at start {m.get('loadavg_at_start', '?')}; "
             f"OMP_WAIT_POLICY={res['omp_wait_policy']} (each matmul call is one parallel "
             "region: under PASSIVE it includes waking the sleeping thread).", "",
             f"`vpdpbusd zmm` peak: **{res['peak_gmacs_1_thread']:.0f} G multiply-adds/s on 1 "
             f"thread, {peak:.0f} G/s on {res['threads']}** (best of {res['repeats']}).", ""]
    table = [[name, f"{r['hot_gmacs']:.0f}", f"{100 * r['hot_gmacs'] / peak:.0f}%",
              f"{r['cold_gmacs']:.0f}", f"{100 * r['cold_gmacs'] / peak:.0f}%"]
             for name, r in res["shapes"].items()]
    lines.append(md_table([f"K x N ({res['rows']} rows)", "hot weights G/s", "of peak",
                           "cold weights G/s", "of peak"], table))
    lines += ["", md_table(["model", "int8 G multiply-adds", "floor at the peak",
                            "matmuls, cold weights"],
                           [[name, f"{r['gmacs']:.1f}", f"{1e3 * r['floor_s']:.0f} ms",
                             f"{1e3 * r['cold_s']:.0f} ms"]
                            for name, r in res["models"].items()])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="threads of the peak and the matmul")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if args.threads < 1 or args.repeats < 1:
        print("bench_vnni_peak: --threads and --repeats must be at least 1", file=sys.stderr)
        sys.exit(2)
    try:
        res = run(args.threads, args.repeats)
    except PeakUnavailable as exc:
        print(f"bench_vnni_peak: {exc}", file=sys.stderr)
        sys.exit(2)
    print(write_outputs(args.out, "vnni_peak", res, markdown))


if __name__ == "__main__":
    main()
