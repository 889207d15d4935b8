"""`vpr eval recall` (and `vpr eval bag` when vpr_ros/cli/eval_bag_cmd.py is installed)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shlex
import sys

from ..constants import TARGET_PRECISION
from ..errors import ConfigError

log = logging.getLogger(__name__)


def add_stream_args(p, bag: bool = False) -> None:
    """Stream localizer options shared by `vpr eval recall` and `vpr eval bag`."""
    import argparse

    from .common import float_in, positive_int

    g = p.add_argument_group("stream localizer (sequence matching over the frames in order)")
    g.add_argument("--no-stream", dest="stream", action="store_false",
                   help="score single frames only")
    g.add_argument("--no-temporal", dest="stream", action="store_false", help=argparse.SUPPRESS)
    if bag:
        g.add_argument("--odometry-topic", metavar="T", default=None,
                       help="the robot's odometry in the bag (nav_msgs/Odometry or a pose "
                            "topic; never the ground-truth topic); default: images alone")
        g.add_argument("--store-calibration", action="store_true",
                       help="store the fitted stream calibration (threshold for "
                            "--target-precision) in the map's manifest")
    else:
        g.add_argument("--odometry", metavar="CSV", default=None,
                       help="the robot's odometry at the queries (columns filename|t_s, x, "
                            "y[, z]); default: images alone")
    g.add_argument("--target-precision", type=float_in(0.0, 1.0, True, True),
                   default=TARGET_PRECISION, metavar="P",
                   help="precision the published-pose threshold is fitted for (default 0.99)")
    g.add_argument("--stream-candidates", type=positive_int, default=50, metavar="K",
                   help="retrieval candidates per frame used as stream evidence (default 50)")


def stream_config_from_args(args):
    from ..stream import StreamConfig

    return StreamConfig(candidates=args.stream_candidates).validate()


def register(subparsers) -> None:
    from .common import (add_model_args, add_rerank_compute_arg, non_negative_int,
                         positive_float, positive_int)
    from .map_cmd import add_rerank_model_args

    p = subparsers.add_parser("eval", help="evaluate recall on datasets (and bags)",
                              description="Evaluation commands.")
    sub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    sub.required = True

    r = sub.add_parser(
        "recall", help="Recall@N on a benchmark-layout dataset",
        description="Build a map from the database split (or use --map), describe the "
                    "queries, report Recall@1/5/10/20 (with and without re-ranking), the "
                    "precision/recall curve of the confidence gate, the stream localizer over "
                    "the queries in driving order and per-stage latency; write report.json "
                    "and PNG plots to --out.")
    r.add_argument("--dataset", required=True, metavar="DIR",
                   help="dataset in the benchmark layout (images/test/{database,queries})")
    r.add_argument("--map", metavar="MAP", default=None,
                   help="use this map instead of building one from the database split "
                        "(the map's own card is the default --model then)")
    r.add_argument("--save-map", metavar="DIR", default=None,
                   help="keep the map built from the database split here, with the fitted "
                        "confidence calibration in its manifest")
    add_model_args(r, local=True)
    add_rerank_model_args(r)
    r.add_argument("--rerank", action="store_true",
                   help="re-rank with SelaVPR local features (model from --rerank-model; "
                        "default: the card of --map's local features, else the shipped demo "
                        "re-ranker, else selavpr_tiny_random); implied by --rerank-model")
    r.add_argument("--rerank-k", type=positive_int, default=20, metavar="K",
                   help="candidates re-ranked per query (default 20)")
    add_rerank_compute_arg(r)
    r.add_argument("--radius", type=positive_float, default=25.0, metavar="M",
                   help="a match is correct within this distance (default 25 m)")
    r.add_argument("--index", default="Flat", metavar="FACTORY",
                   help="FAISS factory string for the map built here (default Flat)")
    r.add_argument("--max-queries", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N queries")
    add_stream_args(r)
    r.add_argument("--latency-queries", type=non_negative_int, default=20, metavar="N",
                   help="queries timed one by one through the Localizer (default 20)")
    r.add_argument("--out", metavar="REPORT_DIR", default=None,
                   help="write report.json, recall_at_n.png, pr_curve.png, examples.png (and "
                        "route_over_time.png, error_over_time.png for a drive) here")
    r.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    r.set_defaults(func=run_recall)

    if importlib.util.find_spec(f"{__package__}.eval_bag_cmd") is not None:
        importlib.import_module(f"{__package__}.eval_bag_cmd").register(sub)


def _pct(x) -> str:
    return "   -  " if x is None else f"{100 * x:6.2f}"


def run_recall(args) -> int:
    from ..evaluation.recall_eval import RecallSettings, evaluate_recall, public_report
    from ..maps import PlaceMap
    from .common import describer_from_args, local_extractor_from_args
    from .map_cmd import default_rerank_model

    if args.map and args.save_map:
        raise ConfigError("--save-map keeps the map this command builds; with --map no map is "
                          "built (give one of the two)")
    if args.map and args.model is None:
        from ..maps import read_manifest

        args.model = (read_manifest(args.map).get("model") or {}).get("card")
    describer = describer_from_args(args)
    local = None
    if args.rerank or args.local_model is not None:
        if args.local_model is None:
            args.local_model = default_rerank_model(args.map)
            log.info("--rerank without --rerank-model: using %s", args.local_model)
        local = local_extractor_from_args(args)
    place_map = None
    if args.map:
        place_map = PlaceMap.open_for(args.map, describer,
                                      local_extractor=local, device=args.device)
    settings = RecallSettings(radius_m=args.radius, rerank_k=args.rerank_k,
                              rerank_compute=args.rerank_compute,
                              max_queries=args.max_queries, index=args.index,
                              latency_queries=args.latency_queries, stream=args.stream,
                              stream_config=stream_config_from_args(args),
                              odometry_csv=args.odometry,
                              target_precision=args.target_precision)
    command = "vpr " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    report = evaluate_recall(args.dataset, describer, local_extractor=local, place_map=place_map,
                             settings=settings, out_dir=args.out, map_out=args.save_map,
                             command=command)
    rep = public_report(report)
    ns = ["1", "5", "10", "20"]
    print(f"dataset {args.dataset}: {rep['num_queries']} queries, {rep['num_database']} "
          f"database places, radius {args.radius} m, model {rep['model']['card']}")
    print("                    " + "".join(f"   R@{n:<3s}" for n in ns))
    print("global descriptor   " + "".join(f"  {_pct(rep['recall'].get(n))}" for n in ns))
    if "recall_reranked" in rep:
        print("re-ranked           " + "".join(f"  {_pct(rep['recall_reranked'].get(n))}"
                                               for n in ns))
    print(f"confidence gate: recall at 100% precision {100 * rep['recall_at_100_precision']:.2f}%, "
          f"average precision {rep['pr_auc']:.3f}")
    if "stream" in rep:
        print_stream_summary(rep["stream"])
    lat = rep.get("latency_ms", {}).get("total")
    if lat:
        print(f"latency per image: {lat['mean']:.1f} ms mean, {lat['p95']:.1f} ms p95 "
              f"({rep['device']})")
    if args.out:
        print(f"report: {args.out}/report.json (+ recall_at_n.png, pr_curve.png, examples.png, "
              "route_over_time.png, error_over_time.png)")
    if args.json:
        summary = {k: rep[k] for k in ("recall", "recall_reranked",
                                       "num_queries", "num_database", "radius_m",
                                       "recall_at_100_precision", "pr_auc", "latency_ms",
                                       "confidence_calibration") if k in rep}
        if "stream" in rep:
            summary["stream"] = stream_summary(rep["stream"])
        summary["report_dir"] = args.out
        print(json.dumps(summary))
    return 0


STREAM_KEYS = ("recall", "recall_at_100_precision", "precision_of_published",
               "published_fraction", "method", "odometry", "motion_prior_fits",
               "stream_answered_fraction", "target_precision")


def stream_summary(stream: dict) -> dict:
    """The `stream` object of the --json line (the report.json has every number)."""
    return {k: stream.get(k) for k in STREAM_KEYS}


def print_stream_summary(st: dict) -> None:
    ns = ["1", "5", "10", "20"]
    print("stream localizer    " + "".join(f"  {_pct(st['recall'].get(n))}" for n in ns)
          + ("   (with odometry)" if st.get("odometry") else "   (images only)"))
    prec = st.get("precision_of_published")
    print("stream confidence: recall at 100% precision "
          f"{100 * st['recall_at_100_precision']:.2f}%; "
          f"published (target precision {100 * st['target_precision']:.0f}%): "
          f"{100 * st['published_fraction']:.1f}% of frames at precision "
          + ("   -  " if prec is None else f"{100 * prec:.1f}%"))
    if st.get("motion_prior_fits") is False or st.get("stream_answered_fraction", 1.0) < 0.5:
        print("note: the queries are not one continuous drive, so the stream prior does not fit; "
              f"the stream answered from sequence evidence on "
              f"{100 * st.get('stream_answered_fraction', 0):.0f}% of frames and fell back to "
              "single-frame answers elsewhere")
