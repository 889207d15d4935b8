"""`vpr demo`: the whole robot job on the shipped sample, end to end, through the live node.

1. build a map from samples/nordland_mini (summer database) with the default model and,
   when the shipped demo re-ranker is installed, its SelaVPR local features,
2. write the winter query sequence as a rosbag2 (images + ground-truth poses),
3. start the real ROS 2 localizer node on a private DDS domain (localhost discovery) and
   publish the bag into it with its timing, printing one line per frame it publishes;
   with local features the node re-ranks (two stages),
4. score what the node published and write the report (report.json + PNG plots).  With
   re-ranking the same frames are scored twice, side by side: single-frame = the node's
   first-stage (global descriptor) order of its candidates, two-stage = its re-ranked
   order (vpr_ros.evaluation.compare).

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
    p.add_argument("--rerank-model", default=None, metavar="CARD",
                   help="SelaVPR card of the second stage (default: the shipped demo re-ranker "
                        "demo_tiny_selavpr when its weights are installed)")
    p.add_argument("--rerank-weights", default=None, metavar="FILE",
                   help="weights for --rerank-model")
    p.add_argument("--rerank-k", type=int, default=10, metavar="K",
                   help="candidates the node re-ranks per frame (default 10: the demo re-ranker "
                        "costs ~2 ms per candidate and does least harm at 10, see "
                        "docs/evaluation.md)")
    p.add_argument("--no-rerank", dest="rerank", action="store_false",
                   help="single stage only: no local features in the map, no re-ranking")
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


def rerank_card(args):
    """The second stage's card: --rerank-model, else the shipped demo re-ranker; None when
    re-ranking is off or no trained re-ranker is installed (random features prove nothing)."""
    from ..errors import ConfigError
    from ..models.cards import DEMO_RERANK_CARD_NAME, default_rerank_card_name

    if args.rerank_k < 1:
        raise ConfigError(f"--rerank-k must be >= 1, got {args.rerank_k}")
    if not args.rerank:
        return None
    if args.rerank_model:
        return args.rerank_model
    return DEMO_RERANK_CARD_NAME if default_rerank_card_name() == DEMO_RERANK_CARD_NAME else None


def _card_ref(card: str) -> str:
    """A card given as a YAML path stays a (resolved) path for the node, a name stays a name."""
    return str(Path(card).resolve()) if Path(card).is_file() else card


def run(args) -> int:
    import numpy as np

    from ..bags import BagFrame, write_image_bag
    from ..evaluation.bag_eval import (BagEvalSettings, evaluate_bag, public_report,
                                       write_bag_report)
    from ..evaluation.compare import (FRAME_METHODS, SINGLE_FRAME, format_table, method_tracks,
                                      public_rows)
    from ..inference import GlobalDescriber, LocalFeatureExtractor
    from ..maps import PlaceMap, benchmark_source, build_map
    from ..models import default_card_name
    from .eval_bag_cmd import print_summary

    t_start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = find_samples(args.samples)
    card = args.model or default_card_name()
    rcard = rerank_card(args)

    _say(f"== 1/4 map: {samples} (database split), model {card}"
         + (f", local features {rcard} (two-stage)" if rcard else
            " (single stage: " + ("--no-rerank)" if not args.rerank else
                                  "no trained re-ranker installed)")))
    describer = GlobalDescriber(card=card, weights=args.weights, device=args.device)
    local = LocalFeatureExtractor(card=rcard, weights=args.rerank_weights, device=args.device) \
        if rcard else None
    database = benchmark_source(samples, "database")
    if args.max_places:
        database = database[:args.max_places]
    map_dir = out / "map"
    build_map(database, map_dir, describer, local_extractor=local, overwrite=True, index="Flat",
              command="vpr demo")
    place_map = PlaceMap.open_for(map_dir, describer, local_extractor=local, verify="size",
                                  device="cpu")
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
    _say("   frame  stamp(s)  place   score   conf  pose  error(m)  result  latency(ms)"
         + ("  1st-stage place" if rcard else ""))
    frames: List[dict] = []
    first_stage = FRAME_METHODS[SINGLE_FRAME]

    def on_frame(rec: dict) -> None:
        i = rec["index"]
        frames.append(rec)
        err = float(np.linalg.norm(np.asarray(rec["position"][:2]) - gt[i, :2])) \
            if 0 <= i < len(gt) else float("nan")
        ok = err <= args.radius
        score = rec["scores"][0] if rec["scores"] else float("nan")
        extra = ""
        if rcard and rec["place_indices"]:
            top = first_stage(rec)["ranked"][0]
            changed = "" if top == rec["place_indices"][0] else " (changed)"
            extra = f"  {int(place_map.places.ids[top]):5d}{changed}"
        _say(f"   {i:5d}  {(rec['stamp_ns'] - 1_000_000_000) / 1e9:8.2f}  "
             f"{rec['place_ids'][0] if rec['place_ids'] else -1:5d}  {score:6.3f}  "
             f"{rec['confidence']:5.2f}  {'yes' if rec['confident'] else ' no'}  "
             f"{err:8.1f}  {'OK   ' if ok else 'wrong'}  {rec['latency_ms']:8.1f}{extra}")

    settings = BagEvalSettings(image_topic="/camera/image_raw", pose_topic="/ground_truth/pose",
                               radius_m=args.radius, top_k=20, realtime=True, rate=args.rate)
    model_ref = _card_ref(args.model) if args.model else describer.card.name
    node_params = {"map_path": str(map_dir.resolve()), "model": model_ref,
                   "weights": str(Path(args.weights).resolve()) if args.weights else "",
                   "device": args.device}
    if rcard:
        node_params.update({"rerank": True, "rerank_model": _card_ref(rcard),
                            "rerank_weights": str(Path(args.rerank_weights).resolve())
                            if args.rerank_weights else "",
                            "rerank_k": int(args.rerank_k),
                            "top_k": max(int(args.rerank_k), settings.top_k)})
    report_dir = out / "report"
    report = evaluate_bag(bag_dir, place_map, settings, node_params=node_params,
                          out_dir=None, on_frame=on_frame, node_log=str(out / "node.log"))

    _say("== 4/4 scores")
    rows = compare_frames(frames, gt, place_map, args.radius)
    report["comparison"] = public_rows(rows)
    write_bag_report(report, report_dir, place_map,
                     tracks=method_tracks(rows, place_map.places.positions) if rows else None)
    rep = public_report(report)
    print_summary(rep)
    if rows:
        _say(f"\nsame {rows[0]['frames']} frames, {args.radius:g} m radius "
             "(latency: stages each method needs, in the node):")
        _say(format_table(rows))
    _say(f"report: {report_dir}/report.json, route_over_time.png, error_over_time.png, "
         "trajectory.png, pr_curve.png")
    _say(f"demo finished in {time.monotonic() - t_start:.0f} s")
    if args.json:
        print(json.dumps({"recall": rep.get("recall"), "frames": rep["frames"],
                          "confidence_gate": rep.get("confidence_gate"),
                          "localization_error_m": rep.get("localization_error_m"),
                          "latency_ms": (rep.get("latency_ms") or {}).get("total"),
                          "comparison": rep["comparison"], "rerank_model": rcard,
                          "model": card, "report_dir": str(report_dir)}))
    return 0


def compare_frames(frames: List[dict], gt, place_map, radius_m: float) -> List[dict]:
    """Score every method present in the node's records on the frames with ground truth."""
    import numpy as np

    from ..evaluation.compare import answers_from_frames, compare_methods

    usable = sorted((f for f in frames if 0 <= f["index"] < len(gt)), key=lambda f: f["stamp_ns"])
    if not usable:
        return []
    methods = answers_from_frames(usable)
    rows = compare_methods(methods, np.array([gt[f["index"]] for f in usable]),
                           place_map.places.positions, radius_m)
    return rows
