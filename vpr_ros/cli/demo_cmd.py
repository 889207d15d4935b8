"""`vpr demo`: the whole robot job on the shipped sample, end to end, through the live node.

1. build a map from samples/nordland_mini (summer database) with the default model,
2. write the winter query sequence as a rosbag2 (images + ground-truth poses),
3. start the real ROS 2 localizer node on a private DDS domain (localhost discovery) and
   publish the bag into it with its timing, printing one line per frame it publishes,
4. score what the node published and write the report (report.json + PNG plots).

`make demo` runs this.  The sample folder is found in the source tree or, when installed,
in ``share/vpr_ros/samples``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List

SAMPLE_NAME = "nordland_mini"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="map the shipped sample, replay its queries through the live ROS 2 node",
        description="Build a map from the shipped Nordland sample with the default model, write "
                    "the query sequence as a bag, replay it through the real localizer node over "
                    "DDS (private domain), print what the node publishes and the final scores, "
                    "and write the report (JSON + PNG) to --out.")
    p.add_argument("--out", default="demo_output", metavar="DIR",
                   help="output folder: map/, queries_bag/, report/, node.log (default "
                        "demo_output)")
    p.add_argument("--model", default=None, metavar="CARD",
                   help="model card (default: the shipped demo model, else scicevpr_tiny_random)")
    p.add_argument("--weights", default=None, metavar="FILE", help="weights for --model")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--fps", type=float, default=4.0,
                   help="camera rate of the query bag in frames per second (default 4)")
    p.add_argument("--rate", type=float, default=1.0,
                   help="replay speed factor (default 1.0 = the bag's own timing)")
    p.add_argument("--radius", type=float, default=25.0, metavar="M",
                   help="a match is correct within this distance (default 25 m)")
    p.add_argument("--max-places", type=int, default=None, metavar="N",
                   help="map only the first N database places (quick runs)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="replay only the first N query frames (quick runs)")
    p.add_argument("--samples", default=None, metavar="DIR",
                   help="sample dataset folder (default: the shipped nordland_mini)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    p.set_defaults(func=run)


def sample_candidates() -> List[Path]:
    """Where the shipped sample may be: source tree, ament share, <prefix>/share."""
    here = Path(__file__).resolve()
    dirs = [here.parents[2] / "samples" / SAMPLE_NAME]
    try:
        from ament_index_python.packages import get_package_share_directory

        dirs.append(Path(get_package_share_directory("vpr_ros")) / "samples" / SAMPLE_NAME)
    except Exception:  # not installed as a ROS package / ament_index not available
        pass
    dirs.append(Path(sys.prefix) / "share" / "vpr_ros" / "samples" / SAMPLE_NAME)
    return dirs


def find_samples(explicit=None) -> Path:
    from ..errors import DatasetError

    if explicit:
        path = Path(explicit)
        if not (path / "images" / "test").is_dir():
            raise DatasetError(f"{path} is not a benchmark-layout dataset (images/test/...)")
        return path
    for d in sample_candidates():
        if (d / "images" / "test" / "database").is_dir():
            return d
    raise DatasetError("the shipped sample (samples/nordland_mini) was not found in: "
                       + ", ".join(str(d) for d in sample_candidates())
                       + "; reinstall vpr_ros or pass --samples DIR")


def _say(text: str) -> None:
    print(text, flush=True)


def run(args) -> int:
    import numpy as np

    from ..bags import BagFrame, write_image_bag
    from ..evaluation.bag_eval import BagEvalSettings, evaluate_bag, public_report
    from ..inference import GlobalDescriber
    from ..maps import PlaceMap, benchmark_source, build_map
    from ..models import default_card_name
    from .eval_bag_cmd import print_summary

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = find_samples(args.samples)
    card = args.model or default_card_name()

    _say(f"== 1/4 map: {samples} (database split), model {card}")
    describer = GlobalDescriber(card=card, weights=args.weights, device=args.device)
    database = benchmark_source(samples, "database")
    if args.max_places:
        database = database[:args.max_places]
    map_dir = out / "map"
    build_map(database, map_dir, describer, overwrite=True, index="Flat",
              command="vpr demo")
    place_map = PlaceMap.open_for(map_dir, describer, verify="size", device="cpu")
    _say(f"   {len(place_map)} places -> {map_dir}")

    _say(f"== 2/4 bag: query sequence at {args.fps:g} fps")
    queries = benchmark_source(samples, "queries")
    if args.max_frames:
        queries = queries[:args.max_frames]
    if args.fps <= 0:
        from ..errors import ConfigError

        raise ConfigError(f"--fps must be > 0, got {args.fps}")
    period = int(round(1e9 / args.fps))
    frames = (BagFrame(stamp_ns=1_000_000_000 + i * period, image=q.load(),
                       position=[float(v) for v in q.position]) for i, q in enumerate(queries))
    bag_dir = out / "queries_bag"
    n = write_image_bag(bag_dir, frames, image_topic="/camera/image_raw",
                        pose_topic="/ground_truth/pose", storage="sqlite3", progress=True,
                        total=len(queries))
    gt = np.array([q.position for q in queries], dtype=np.float64)
    _say(f"   {n} frames -> {bag_dir}")

    _say("== 3/4 live node: replaying the bag through the ROS 2 localizer node "
         f"(private DDS domain, localhost only; node log {out / 'node.log'})")
    _say("   frame  stamp(s)  place   score   conf  pose  error(m)  result  latency(ms)")
    counts = {"ok": 0, "n": 0}

    def on_frame(rec: dict) -> None:
        i = rec["index"]
        err = float(np.linalg.norm(np.asarray(rec["position"][:2]) - gt[i, :2])) \
            if 0 <= i < len(gt) else float("nan")
        ok = err <= args.radius
        counts["n"] += 1
        counts["ok"] += int(ok)
        score = rec["scores"][0] if rec["scores"] else float("nan")
        _say(f"   {i:5d}  {(rec['stamp_ns'] - 1_000_000_000) / 1e9:8.2f}  "
             f"{rec['place_ids'][0] if rec['place_ids'] else -1:5d}  {score:6.3f}  "
             f"{rec['confidence']:5.2f}  {'yes' if rec['confident'] else ' no'}  "
             f"{err:8.1f}  {'OK   ' if ok else 'wrong'}  {rec['latency_ms']:8.1f}")

    settings = BagEvalSettings(image_topic="/camera/image_raw", pose_topic="/ground_truth/pose",
                               radius_m=args.radius, top_k=20, realtime=True, rate=args.rate)
    model_ref = str(Path(args.model).resolve()) if args.model and Path(args.model).is_file() \
        else describer.card.name          # a card given as a YAML path stays a path
    node_params = {"map_path": str(map_dir.resolve()), "model": model_ref,
                   "weights": str(Path(args.weights).resolve()) if args.weights else "",
                   "device": args.device}
    report_dir = out / "report"
    report = evaluate_bag(bag_dir, place_map, settings, node_params=node_params,
                          out_dir=report_dir, on_frame=on_frame,
                          node_log=str(out / "node.log"))
    rep = public_report(report)

    _say("== 4/4 scores")
    print_summary(rep)
    _say(f"report: {report_dir}/report.json, trajectory.png, error_over_time.png, pr_curve.png")
    _say(f"demo finished in {time.monotonic() - t_start:.0f} s")
    if args.json:
        print(json.dumps({"recall": rep.get("recall"), "frames": rep["frames"],
                          "confidence_gate": rep.get("confidence_gate"),
                          "localization_error_m": rep.get("localization_error_m"),
                          "latency_ms": (rep.get("latency_ms") or {}).get("total"),
                          "model": card, "report_dir": str(report_dir)}))
    return 0
