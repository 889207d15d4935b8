#!/usr/bin/env python3
"""Stress test: concurrent `vpr map add` on one map, optionally under CPU load.

Each round starts WRITERS `vpr map add` processes at once on the same map, each adding
its own PER_WRITER sample images, and then checks: every writer that exited 0 has all
its places in the map, no place appears that no successful writer reported, no stderr
holds a traceback, a failed writer printed exactly one line ("being written by PID N"),
the map opens, and no temporary folder is left.  ``--load N`` runs N busy-looping
processes meanwhile (the probe lost an update only on a loaded machine).

    python scripts/stress_map_writers.py --rounds 10 --load 2 [--wait-lock 600]

Prints one line per round and a JSON summary; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x = (x * 31 + 7) % 1000003


def _places(map_dir: Path) -> list:
    return [line.split(",")[1] for line in (map_dir / "places.csv").read_text().splitlines()[1:]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--per-writer", type=int, default=3)
    ap.add_argument("--base-places", type=int, default=20)
    ap.add_argument("--load", type=int, default=0, help="busy-looping processes meanwhile")
    ap.add_argument("--wait-lock", type=float, default=None,
                    help="pass --wait-lock S to the writers (default: fail-fast)")
    ap.add_argument("--card", default="scicevpr_tiny_random")
    args = ap.parse_args()

    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # run the cleanup below
    from vpr_ros.inference import GlobalDescriber
    from vpr_ros.maps import PlaceMap, benchmark_source, build_map

    entries = benchmark_source(REPO / "samples" / "nordland_mini", "database")
    need = args.base_places + args.rounds * args.writers * args.per_writer
    if need > len(entries):
        ap.error(f"needs {need} sample images, the sample has {len(entries)}")
    work = Path(tempfile.mkdtemp(prefix="vpr_stress_"))
    target = work / "m"
    build_map(entries[:args.base_places], target, GlobalDescriber(args.card, device="cpu"),
              progress=False)
    burners = []
    if args.load:
        stop_at = time.time() + 24 * 3600
        burners = [multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True)
                   for _ in range(args.load)]
        for b in burners:
            b.start()
    expected = list(_places(target))
    summary = {"rounds": args.rounds, "writers": args.writers, "load": args.load,
               "wait_lock": args.wait_lock, "successes": 0, "refused": 0, "lost": 0,
               "unexpected": 0, "tracebacks": 0, "bad_error_lines": 0, "leftovers": 0}
    next_image = args.base_places
    try:
        for r in range(args.rounds):
            procs = []
            for w in range(args.writers):
                folder = work / f"add_{r}_{w}"
                folder.mkdir()
                rows = ["filename,x,y"]
                for e in entries[next_image:next_image + args.per_writer]:
                    shutil.copy(e.path, folder / e.path.name)
                    rows.append(f"{e.path.name},{e.position[0]},{e.position[1]}")
                next_image += args.per_writer
                (work / f"add_{r}_{w}.csv").write_text("\n".join(rows) + "\n")
                cmd = [sys.executable, "-m", "vpr_ros.cli.main", "-q", "map", "add", str(target),
                       "--images", str(folder), "--poses", str(work / f"add_{r}_{w}.csv"),
                       "--device", "cpu"]
                if args.wait_lock is not None:
                    cmd += ["--wait-lock", str(args.wait_lock)]
                procs.append((folder, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                                       stderr=subprocess.PIPE, text=True)))
            outcome = []
            for folder, p in procs:
                _, err = p.communicate()
                summary["tracebacks"] += "Traceback" in err
                if p.returncode == 0:
                    summary["successes"] += 1
                    expected += sorted(q.name for q in folder.iterdir())
                    outcome.append("ok")
                else:
                    summary["refused"] += 1
                    lines = [x for x in err.splitlines() if x.strip()]
                    if len(lines) != 1 or "being written by PID" not in lines[0]:
                        summary["bad_error_lines"] += 1
                        print(err, file=sys.stderr)
                    outcome.append(f"exit {p.returncode}")
            got = _places(target)
            lost = len(set(expected) - set(got))
            unexpected = len(set(got) - set(expected))
            left = [p.name for p in work.iterdir() if p.name.startswith(".m.")]
            summary["lost"] += lost
            summary["unexpected"] += unexpected
            summary["leftovers"] += len(left)
            n = len(PlaceMap.open(target))
            print(f"round {r + 1}: {', '.join(outcome)}; map {n} places, expected "
                  f"{len(expected)}, lost {lost}, unexpected {unexpected}, leftovers {left}",
                  flush=True)
    finally:
        for b in burners:
            b.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    bad = (summary["lost"] or summary["unexpected"] or summary["tracebacks"]
           or summary["bad_error_lines"] or summary["leftovers"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
