"""`vpr eval bag`: localization quality of a recorded bag against a map (offline or live node).

Registered under `vpr eval` by eval_cmd.py (``register(eval_subparsers)``).
"""

from __future__ import annotations

import json

from ..constants import CONFIDENCE_THRESHOLD, MAX_POSE_GAP_S, RADIUS_M
from ..errors import ConfigError


def register(eval_subparsers) -> None:
    from .common import add_model_args, positive_float, positive_int, probability
    from .map_cmd import add_rerank_model_args

    p = eval_subparsers.add_parser(
        "bag", help="Recall@N, pose error and latency on a recorded bag",
        description="Localize every camera frame of BAG against --map and score it against "
                    "ground truth (a pose topic in the bag or --poses CSV): Recall@N, "
                    "precision/recall of the confidence gate, error of the published pose, "
                    "latency. Offline (default) runs the Localizer on every frame; --realtime "
                    "starts the real ROS 2 node on a private DDS domain, publishes the bag's "
                    "images with their recorded timing and scores what the node published "
                    "(dropped frames counted).")
    p.add_argument("bag", metavar="BAG", help="rosbag2 folder (sqlite3 or mcap)")
    p.add_argument("--map", required=True, metavar="MAP", help="map built with `vpr map build`")
    p.add_argument("--image-topic", required=True, metavar="T",
                   help="camera topic (sensor_msgs/Image or CompressedImage)")
    gt = p.add_mutually_exclusive_group()
    gt.add_argument("--pose-topic", metavar="P",
                    help="ground-truth pose topic (Odometry, PoseStamped, "
                         "PoseWithCovarianceStamped); default: the bag's only pose topic")
    gt.add_argument("--poses", metavar="CSV",
                    help="ground-truth poses CSV (x/y or east_m/north_m; stamp_ns or t_s)")
    add_model_args(p, local=True)
    add_rerank_model_args(p)
    p.add_argument("--rerank", action="store_true",
                   help="re-rank with SelaVPR local features (the map must store them)")
    p.add_argument("--rerank-k", type=positive_int, default=20, metavar="K")
    p.add_argument("--top-k", type=positive_int, default=20, metavar="K",
                   help="candidates per frame (Recall@N up to N=K; default 20)")
    p.add_argument("--confidence-threshold", type=probability, default=CONFIDENCE_THRESHOLD,
                   metavar="C",
                   help="confident at confidence >= C (default 0.5)")
    from .eval_cmd import add_stream_args

    add_stream_args(p, bag=True)
    p.add_argument("--radius", type=positive_float, default=RADIUS_M, metavar="M",
                   help="a match is correct within this distance (default %(default)s m)")
    p.add_argument("--max-gap", type=positive_float, default=MAX_POSE_GAP_S, metavar="S",
                   help="interpolate ground truth only across pose gaps up to S s "
                        "(default %(default)s)")
    p.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                   help="use only the first N frames")
    p.add_argument("--realtime", action="store_true",
                   help="replay through the live ROS 2 node with the recorded timing")
    p.add_argument("--rate", type=positive_float, default=1.0,
                   help="replay speed factor for --realtime (2.0 = twice as fast)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write report.json, trajectory.png, route_over_time.png, "
                        "error_over_time.png, pr_curve.png")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    p.set_defaults(func=run)


def _pct(x) -> str:
    return "  -   " if x is None else f"{100 * x:6.2f}"


def print_summary(rep: dict) -> None:
    fr = rep["frames"]
    dropped = (f", {fr.get('frames_dropped', 0)} dropped by the node"
               if rep["mode"] == "realtime" else "")
    print(f"bag {rep['bag']} ({rep['mode']}): {fr['total']} frames, {fr['localized']} localized, "
          f"{fr['bad']} bad{dropped}; ground truth {rep['ground_truth']}")
    rec = rep.get("recall") or {}
    print("recall:  " + "  ".join(f"R@{n} {_pct(v)}%" for n, v in rec.items()))
    gate = rep.get("confidence_gate")
    if gate:
        prec = gate["precision_of_confident"]
        print(f"confidence gate: {gate['confident_frames']} confident frames, precision "
              f"{_pct(prec)}%, recall {_pct(gate['recall_of_confident'])}%, AP "
              f"{gate['pr_auc']:.3f}, recall at 100% precision "
              f"{_pct(gate['recall_at_100_precision'])}%")
    err = (rep.get("localization_error_m") or {}).get("confident")
    if err:
        print(f"pose error (confident): median {err['p50']:.1f} m, p90 {err['p90']:.1f} m, "
              f"max {err['max']:.1f} m")
    lat = (rep.get("latency_ms") or {}).get("total")
    if lat:
        print(f"latency: {lat['mean']:.1f} ms mean, {lat['p95']:.1f} ms p95, "
              f"{lat['max']:.1f} ms max")
    st = rep.get("stream")
    if st:
        from .eval_cmd import print_stream_summary

        print_stream_summary(st)
        live = st.get("published_as_run") or {}
        if live.get("frames") is not None:
            print(f"poses published by the localizer (map threshold): {live['frames']} frames "
                  f"({_pct(live['fraction'])}%), precision {_pct(live['precision'])}%")


def run(args) -> int:
    from ..evaluation.bag_eval import BagEvalSettings, evaluate_bag, public_report
    from ..maps import PlaceMap, read_manifest
    from .common import describer_from_args, local_extractor_from_args
    from .eval_cmd import stream_config_from_args

    manifest = read_manifest(args.map)
    if args.model is None:
        args.model = (manifest.get("model") or {}).get("card")
    settings = BagEvalSettings(image_topic=args.image_topic, pose_topic=args.pose_topic,
                               poses_csv=args.poses, radius_m=args.radius,
                               max_gap_s=args.max_gap, top_k=args.top_k,
                               rerank_k=args.rerank_k if args.rerank else 0,
                               confidence_threshold=args.confidence_threshold,
                               stream=args.stream,
                               stream_config=stream_config_from_args(args),
                               odometry_topic=args.odometry_topic,
                               target_precision=args.target_precision,
                               realtime=args.realtime, rate=args.rate,
                               max_frames=args.max_frames)
    if args.realtime:
        place_map = PlaceMap.open(args.map, verify="size", device="cpu")
        node_params = {"map_path": str(args.map), "model": args.model or "",
                       "weights": args.weights or "", "device": args.device,
                       "precision": args.precision, "rerank": bool(args.rerank),
                       "rerank_k": int(args.rerank_k), "rerank_model": args.local_model or "",
                       "rerank_weights": args.local_weights or ""}
        report = evaluate_bag(args.bag, place_map, settings, node_params=node_params,
                              out_dir=args.out)
    else:
        describer = describer_from_args(args)
        local = None
        if args.rerank:
            if args.local_model is None:
                lf = (manifest.get("local_features") or {}).get("model") or {}
                args.local_model = lf.get("card")
            local = local_extractor_from_args(args)
        place_map = PlaceMap.open_for(args.map, describer, local, device=args.device)
        report = evaluate_bag(args.bag, place_map, settings, describer=describer,
                              local_extractor=local, out_dir=args.out)
    rep = public_report(report)
    print_summary(rep)
    if args.store_calibration:
        if "stream" not in rep:
            raise ConfigError("--store-calibration needs the stream localizer (drop --no-stream)")
        from ..maps import set_stream_calibration

        set_stream_calibration(args.map, rep["stream"]["calibration"])
        print(f"stream calibration stored in {args.map}/manifest.json (threshold "
              f"{rep['stream']['calibration']['threshold']:.4f} for precision "
              f"{rep['stream']['calibration']['target_precision']:g})")
    if args.out:
        print(f"report: {args.out}/report.json (+ trajectory.png, route_over_time.png, "
              "error_over_time.png, pr_curve.png)")
    if args.json:
        print(json.dumps({k: v for k, v in rep.items() if k != "per_frame"}))
    return 0
