"""`vpr localize --map MAP IMAGES...`: best matching place for each image."""

from __future__ import annotations

import argparse
import json
import logging

from ..constants import CONFIDENCE_THRESHOLD

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .common import (add_image_args, add_model_args, add_rerank_compute_arg,
                         non_negative_int, positive_int, probability)
    from .map_cmd import add_rerank_model_args

    p = subparsers.add_parser(
        "localize", help="localize images against a map",
        description="For each image: best place (id, image, position), similarity, "
                    "confidence and the top candidates.  Without --model the map's own card "
                    "is used (pass --weights when the map was built with a weights file).")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files or folders (images in sorted order)")
    p.add_argument("--map", required=True, metavar="MAP", help="map folder (vpr map build)")
    add_model_args(p, local=True)
    add_rerank_model_args(p)
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K",
                   help="candidates to report (default 5)")
    p.add_argument("--rerank-k", type=non_negative_int, default=None, metavar="K",
                   help="re-rank the first K candidates with SelaVPR local features (default: "
                        "20 when the map has local features, with the map's re-ranking card "
                        "unless --rerank-model is given; 0 turns re-ranking off)")
    add_rerank_compute_arg(p)
    p.add_argument("--sequence", action="store_true",
                   help="the images are one camera stream in the order given: localize them "
                        "with the stream localizer (sequence evidence, calibrated confidence)")
    p.add_argument("--temporal", dest="sequence", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--odometry", metavar="CSV", default=None,
                   help="with --sequence: the robot's odometry at the images (columns "
                        "filename|t_s, x, y[, z]; by file name)")
    p.add_argument("--confidence-threshold", type=probability, default=CONFIDENCE_THRESHOLD,
                   metavar="C",
                   help="confident = confidence >= C (default 0.5)")
    add_image_args(p)
    p.add_argument("--verify", default="full", choices=("full", "size", "none"),
                   help="map checksum check (default full sha256)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (all results) on the last line")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from ..errors import ConfigError
    from ..localizer import Localizer
    from ..maps import PlaceMap, read_manifest
    from ..preprocess import load_image
    from .common import describer_from_args, local_extractor_from_args
    from .describe_cmd import expand_images

    paths = expand_images(args.images)
    manifest = read_manifest(args.map)
    if args.model is None:
        args.model = (manifest.get("model") or {}).get("card")
    stored_local = manifest.get("local_features") or {}
    if args.local_model is None and stored_local.get("present") and args.rerank_k != 0:
        args.local_model = (stored_local.get("model") or {}).get("card")
    describer = describer_from_args(args)
    local = local_extractor_from_args(args)
    rerank_k = args.rerank_k
    if rerank_k is None:
        rerank_k = 20 if local is not None else 0
    place_map = PlaceMap.open_for(args.map, describer,
                                  local_extractor=local if rerank_k > 0 else None,
                                  verify=args.verify, device=args.device)
    stream = None
    odometry = None
    if args.odometry and not args.sequence:
        raise ConfigError("--odometry goes with --sequence (odometry only helps a stream)")
    if args.sequence:
        from ..stream import StreamLocalizer

        stream = StreamLocalizer.for_map(place_map)
        if args.odometry:
            from ..evaluation.odometry_csv import align_odometry, read_odometry_csv

            table = read_odometry_csv(args.odometry)
            if table["key"] != "filename":
                raise ConfigError("with vpr localize the odometry CSV is matched by file name "
                                  "(column filename)")
            odometry = align_odometry(table, [p.name for p in paths],
                                      np.zeros(len(paths), dtype=np.int64))
    loc = Localizer(place_map, describer, local_extractor=local, top_k=args.top_k,
                    rerank_k=rerank_k, confidence_threshold=args.confidence_threshold,
                    rerank_compute=args.rerank_compute, stream=stream)
    results = []
    for i, path in enumerate(paths):
        stamp = i * 1_000_000_000 if stream is not None else None
        if odometry is not None and np.isfinite(odometry[i]).all():
            stream.add_odometry(stamp, odometry[i])
        r = loc.localize(load_image(path, max_pixels=args.max_pixels), stamp_ns=stamp)
        d = r.to_dict()
        d["query"] = str(path)
        results.append(d)
        if not args.json:
            x, y, z = r.position
            flag = "confident" if r.confident else "not confident"
            if r.stream is not None:
                flag += (", localized" if r.stream.localized else ", lost") + (
                    f"; single frame: place {r.single_frame['place_id']}")
            if r.quality is not None and r.quality.degenerate:
                flag += f"; degenerate frame ({r.quality.reason})"
            print(f"{path}: place {r.place_id} {r.image_name} at ({x:.2f}, {y:.2f}, {z:.2f}) "
                  f"{r.frame_id}  similarity {r.similarity:.4f}  confidence {r.confidence:.3f} "
                  f"({flag})  {r.timings_ms['total']:.1f} ms")
            for c in r.candidates[:args.top_k]:
                extra = f"  mnn {c.rerank_score:.3f}" if c.rerank_score is not None else ""
                print(f"    #{c.place_id:<6d} {c.similarity:.4f}{extra}  {c.image_name}")
    if args.json:
        print(json.dumps({"map": str(args.map), "results": results}))
    return 0
