"""Shared helpers of the benchmark scripts: timing, memory, machine description, output.

Benchmarks report medians of repeated measurements and ratios measured in the same
run; nothing here asserts a wall-clock limit.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# Idle OpenMP threads sleep instead of spinning.  On a shared, oversubscribed machine
# spinning threads steal time slices from each other (FAISS k-means and 2-thread search
# became 10-100x slower at load average 14); set before FAISS/torch load OpenMP.
# VPR_BENCH_OMP_DEFAULT=1 keeps the OpenMP runtime's default instead (what the node and
# the CLI run with: spin briefly, then sleep); bench_descriptors measures both.
OMP_DEFAULT_ENV = "VPR_BENCH_OMP_DEFAULT"
if os.environ.get(OMP_DEFAULT_ENV) != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from vpr_ros.atomic import atomic_path, atomic_write_json, atomic_write_text  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CACHE = Path(os.environ.get("VPR_BENCH_CACHE", "/tmp/vpr_bench_cache"))


def set_threads(n: int = 2) -> None:
    """Use ``n`` threads in torch, FAISS and BLAS (the benchmark machine has 2 cores)."""
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:
        pass


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    """Run ``fn`` ``warmup`` times, then ``repeats`` times; return seconds per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved_times(fns: Dict[str, Callable[[], object]], repeats: int,
                      warmup: int = 1) -> Dict[str, List[float]]:
    """Time several variants round-robin so that load from other processes hits all alike.

    The machine is shared; alternating A, B, C, A, B, C ... makes the *ratios* between
    variants robust even when absolute times drift.  Seconds of wall time per call.
    """
    return interleaved_wall_cpu(fns, repeats, warmup)[0]


def interleaved_wall_cpu(fns: Dict[str, Callable[[], object]], repeats: int,
                         warmup: int = 1, alternate: bool = False
                         ) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """:func:`interleaved_times` that also returns each call's CPU time (all threads of the
    process: waiting for a core costs wall time, not CPU time, so it is the steadier
    measure on a loaded machine): ``(wall, cpu)`` seconds per call and variant.
    ``alternate``: every other round runs the variants in reverse order (A B, B A, ...),
    so that neither always runs right after the other (caches, thread wake-ups)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: Dict[str, List[float]] = {k: [] for k in fns}
    cpu: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(repeats):
        for name, fn in (order[::-1] if alternate and r % 2 else order):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def median(xs: List[float]) -> float:
    return float(statistics.median(xs))


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far in MB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to /proc/self/clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def machine_info() -> dict:
    """CPU model, core count, relevant ISA flags, memory and library versions."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version()}
    cpu_model, flags = "unknown", []
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu_model = m.group(1).strip() if m else cpu_model
        m = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
        all_flags = m.group(1).split() if m else []
        wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                  "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")
        flags = [f for f in wanted if f in all_flags]
    except OSError:
        pass
    info["cpu_model"] = cpu_model
    info["cpu_flags"] = flags
    info["logical_cpus"] = os.cpu_count()
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["memory_gb"] = round(mem_kb / 1024 ** 2, 1)
    except (OSError, AttributeError):
        pass
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    versions = {}
    for name in ("numpy", "torch", "faiss", "timm", "scipy"):
        try:
            mod = __import__(name)
            versions[name] = getattr(mod, "__version__", "?")
        except ImportError:
            versions[name] = None
    try:
        import torch
        versions["torch_threads"] = torch.get_num_threads()
        versions["mkldnn"] = bool(torch.backends.mkldnn.is_available())
        versions["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - purely informational
        pass
    try:
        versions["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["versions"] = versions
    return info


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj)


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def fmt(x: Optional[float], nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (x != x):
        return "n/a"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{nd}f}"


def md_table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, name: str, res: dict, markdown: Callable[[dict], str]) -> str:
    """``<name>.json`` and ``<name>.md`` into ``out`` (created); returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", res)
    text = markdown(res)
    write_text(out / f"{name}.md", text + "\n")
    return text


def topic_main(doc: str, topic: str, run: Callable[[bool], dict],
               markdown: Callable[[dict], str]) -> None:
    """Command line of a benchmark with only --quick and --out: run, write <topic>.json, print."""
    import argparse
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args()
    res = run(a.quick)
    write_json(a.out / f"{topic}.json", res)
    print(markdown(res))


def dump_stdout(obj) -> None:
    print(json.dumps(obj, indent=1, default=str)[:4000])
