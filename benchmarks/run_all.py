"""Run every benchmark and write results.json + results.md (+ PNG plots) into one folder.

    python benchmarks/run_all.py [--quick] [--out benchmarks/results] [--only index,rerank]

``--quick`` uses small sizes (a few minutes); the full run takes ~20 minutes on a
2-core CPU and needs ~5 GB of RAM and ~3 GB of disk in the cache folder
(``--cache``, default /tmp/vpr_bench_cache; reused between runs).  Speeds are medians
of interleaved repeats and are reported as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (DEFAULT_CACHE, DEFAULT_OUT, machine_info, md_table, set_threads,
                               write_json, write_text)

TOPICS = ("descriptors", "rerank", "index", "growth", "node", "stream")


def _run_topic(name: str, quick: bool, out: Path, cache: Path, compile_: bool):
    if name == "descriptors":
        from benchmarks import bench_descriptors as m
        return m.run(quick, compile_), m.markdown
    if name == "rerank":
        from benchmarks import bench_rerank as m
        return m.run(quick), m.markdown
    if name == "index":
        from benchmarks import bench_index as m
        return m.run(quick, out, cache), m.markdown
    if name == "growth":
        from benchmarks import bench_growth as m
        return m.run(quick, out, cache), m.markdown
    if name == "node":
        from benchmarks import bench_node as m
        return m.run(quick), m.markdown
    if name == "stream":
        from benchmarks import bench_stream as m
        return m.run(quick), m.markdown
    raise ValueError(name)


def _markdown_of(name: str):
    import importlib
    return importlib.import_module(f"benchmarks.bench_{name}").markdown


def summary(results: dict) -> str:
    """The headline ratios, one line each."""
    lines = []
    d = results.get("descriptors", {})
    if "speed" in d:
        rows = []
        for name, r in d["speed"].items():
            rows.append([name, f"{r['b1']['speedup_vs_eager_fp32']:.2f}x", f"{r['b8']['speedup_vs_eager_fp32']:.2f}x",
                         f"{d['fidelity'][name]['cosine_min']:.5f}" if name in d["fidelity"] else "1",
                         f"{d['fidelity'][name]['top1_identical']:.3f}" if name in d["fidelity"] else "1"])
        lines += ["Descriptor speed-ups over plain eager fp32 (SciceVPR-B):", "",
                  md_table(["variant", "batch 1", "batch 8", "min cosine", "top-1 identical"], rows), ""]
        child = d.get("speed_omp_default", {}).get("speed", {})
        if child:
            lines += ["Under the OpenMP runtime's default wait policy (as the node and CLI run): "
                      + ", ".join(f"{name} {r['b1']['speedup_vs_eager_fp32']:.2f}x / "
                                  f"{r['b8']['speedup_vs_eager_fp32']:.2f}x"
                                  for name, r in child.items() if name != "eager_fp32")
                      + " (batch 1 / batch 8).", ""]
    r = results.get("rerank", {})
    if "results" in r:
        for key, e in r["results"].items():
            lat, sp = e["latency_s"], e["speedup_vs_baseline"]
            loop = e.get("speedup_vs_per_candidate_loop", {})
            lines.append(f"- Re-ranking {key}: package (exact) {sp['package']:.2f}x faster than the "
                         f"official batched algorithm ({lat['package']:.2f} s vs "
                         f"{lat['official_batched']:.2f} s), {loop.get('package', float('nan')):.2f}x "
                         f"faster than a per-candidate loop, counts identical; int8 storage "
                         f"{sp.get('package_int8_storage', float('nan')):.2f}x.")
    i = results.get("index", {})
    if "best_under_goals" in i:
        for n, b in i["best_under_goals"].items():
            lines.append(f"- {int(n):,} places: " + (f"{b[1]} ({b[2]}) {b[0]:.2f} ms/query, {b[3]:.0f} MB"
                                                      if b else "no index met all goals"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--only", default=",".join(TOPICS), help=f"comma list of {TOPICS}")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile in descriptors")
    ap.add_argument("--render", action="store_true",
                    help="only re-write results.md from the results.json in --out")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other topics of an existing results.json in --out (re-run some topics only)")
    a = ap.parse_args()
    set_threads(2)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.render:
        import json
        render(json.loads((out / "results.json").read_text()), out)
        return
    started = datetime.now(timezone.utc)
    results: dict = {"mode": "quick" if a.quick else "full", "started_utc": started.isoformat(),
                     "machine": machine_info()}
    chosen = [t.strip() for t in a.only.split(",") if t.strip()]
    previous = {}
    if a.merge and (out / "results.json").exists():
        import json
        previous = json.loads((out / "results.json").read_text())
        earlier = previous.get("merged_from", {})
        results["merged_from"] = {t: earlier.get(t, previous.get("started_utc")) for t in TOPICS
                                  if t in previous and t not in chosen}
    for name in TOPICS:
        if name in previous and name not in chosen:
            results[name] = previous[name]
    for name in chosen:
        t0 = time.perf_counter()
        print(f"=== {name} ===", flush=True)
        try:
            res, _ = _run_topic(name, a.quick, out, a.cache, a.compile)
            res["wall_s"] = time.perf_counter() - t0
            results[name] = res
        except Exception as exc:  # noqa: BLE001 - keep the other topics' results
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "wall_s": time.perf_counter() - t0}
        write_json(out / "results.json", results)      # partial results survive a later crash
    results["finished_utc"] = datetime.now(timezone.utc).isoformat()
    write_json(out / "results.json", results)
    render(results, out)


def render(results: dict, out: Path) -> None:
    """results.json -> results.md, topics in the fixed TOPICS order."""
    sections = []
    merged = results.get("merged_from", {})
    for name in TOPICS:
        if name not in results:
            continue
        res = results[name]
        if "error" in res:
            sections.append(f"## {name}\n\nFAILED: {res['error']}")
            continue
        try:
            md = _markdown_of(name)(res)
        except Exception as exc:  # noqa: BLE001
            md = f"## {name}\n\n(could not render: {exc}; see results.json)"
        if name in merged:
            md += f"\n\n(measured in the run started {merged[name]})"
        sections.append(md)
    started = datetime.fromisoformat(results["started_utc"])
    m = results["machine"]
    head = [f"# vpr_ros benchmark results ({results['mode']} run)", "",
            f"Run {started:%Y-%m-%d %H:%M} UTC on {m['cpu_model']}, {m['logical_cpus']} logical CPUs, "
            f"{m.get('memory_gb', '?')} GB RAM, flags: {' '.join(m['cpu_flags'])}; "
            f"load average at start {[round(x, 1) for x in m.get('loadavg_at_start', [])]}.", "",
            "Topics re-run later (merged): " + (", ".join(f"{k} ({v})" for k, v in merged.items()) or "none")
            + ".", "",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()), "",
            "The machine is shared with other jobs: absolute times are noisy, ratios come from "
            "interleaved runs in the same process.", "", "## Summary", "", summary(results), ""]
    write_text(out / "results.md", "\n".join(head + sections) + "\n")
    print("\n".join(head))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    main()
