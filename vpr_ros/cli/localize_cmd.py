"""`vpr localize --map MAP IMAGES...`: best matching place for each image."""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    from .common import add_model_args, add_rerank_compute_arg
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
    p.add_argument("--top-k", type=int, default=5, metavar="K",
                   help="candidates to report (default 5)")
    p.add_argument("--rerank-k", type=int, default=None, metavar="K",
                   help="re-rank the first K candidates with SelaVPR local features (default: "
                        "20 when the map has local features, with the map's re-ranking card "
                        "unless --rerank-model is given; 0 turns re-ranking off)")
    add_rerank_compute_arg(p)
    p.add_argument("--temporal", action="store_true",
                   help="treat the images as a sequence and apply the place-belief filter")
    p.add_argument("--temporal-sigma", type=float, default=30.0, metavar="M",
                   help="temporal filter: motion spread per frame in metres (default 30)")
    p.add_argument("--confidence-threshold", type=float, default=0.5, metavar="C",
                   help="confident = confidence >= C (default 0.5)")
    p.add_argument("--verify", default="full", choices=("full", "size", "none"),
                   help="map checksum check (default full sha256)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (all results) on the last line")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..localizer import Localizer
    from ..maps import PlaceMap, read_manifest
    from ..preprocess import load_image
    from ..temporal import PlaceBeliefFilter
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
    temporal = None
    if args.temporal:
        temporal = PlaceBeliefFilter(place_map.places.positions, sigma_m=args.temporal_sigma)
    loc = Localizer(place_map, describer, local_extractor=local, top_k=args.top_k,
                    rerank_k=rerank_k, confidence_threshold=args.confidence_threshold,
                    rerank_compute=args.rerank_compute,
                    temporal_filter=temporal)
    results = []
    for path in paths:
        r = loc.localize(load_image(path))
        d = r.to_dict()
        d["query"] = str(path)
        results.append(d)
        if not args.json:
            x, y, z = r.position
            flag = "confident" if r.confident else "not confident"
            print(f"{path}: place {r.place_id} {r.image_name} at ({x:.2f}, {y:.2f}, {z:.2f}) "
                  f"{r.frame_id}  similarity {r.similarity:.4f}  confidence {r.confidence:.3f} "
                  f"({flag})  {r.timings_ms['total']:.1f} ms")
            for c in r.candidates[:args.top_k]:
                extra = f"  mnn {c.rerank_score:.3f}" if c.rerank_score is not None else ""
                print(f"    #{c.place_id:<6d} {c.similarity:.4f}{extra}  {c.image_name}")
    if args.json:
        print(json.dumps({"map": str(args.map), "results": results}))
    return 0
