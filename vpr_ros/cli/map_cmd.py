"""`vpr map build|info|add`: make a map from images with poses, show it, extend it."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

from ..constants import MAX_POSE_GAP_S
from ..errors import ConfigError
from .common import (add_image_args, add_lock_arg, non_negative_float, positive_float,
                     positive_int)

log = logging.getLogger(__name__)


def add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("map source (one of: --images+--poses, --dataset, --bag)")
    g.add_argument("--images", metavar="DIR", help="folder of images (with --poses CSV)")
    g.add_argument("--poses", metavar="CSV",
                   help="poses CSV: with --images one row per image (filename, x|east_m, "
                        "y|north_m, [z], [yaw_deg | qx,qy,qz,qw], [stamp_ns|t_s]); with --bag "
                        "rows with stamp_ns or t_s matched to the image stamps")
    g.add_argument("--dataset", metavar="DIR",
                   help="benchmark-layout dataset (images/test/database/@east@north@...jpg)")
    g.add_argument("--split", default="database", choices=("database", "queries"),
                   help="dataset split to use (default database)")
    g.add_argument("--bag", metavar="BAG", help="rosbag2 folder (sqlite3 or mcap)")
    g.add_argument("--image-topic", metavar="TOPIC", help="image topic in --bag")
    g.add_argument("--pose-topic", metavar="TOPIC",
                   help="pose topic in --bag (Odometry, PoseStamped, PoseWithCovarianceStamped)")
    g.add_argument("--max-pose-gap", type=positive_float, default=MAX_POSE_GAP_S, metavar="S",
                   help="bag frames in a pose gap longer than S are dropped "
                        "(default %(default)s s)")
    k = p.add_argument_group("keyframes")
    k.add_argument("--min-distance", type=non_negative_float, default=0.0, metavar="M",
                   help="keep an image only this far (m) from the last kept one (default 0)")
    k.add_argument("--min-interval", type=non_negative_float, default=0.0, metavar="S",
                   help="keep an image only this long (s) after the last kept one (default 0)")
    add_image_args(p)
    add_lock_arg(p)


def add_rerank_model_args(p: argparse.ArgumentParser) -> None:
    """``--rerank-model`` / ``--rerank-weights``: aliases of the shared --local-model/-weights."""
    g = p.add_argument_group("re-ranking model (aliases of --local-model/--local-weights)")
    g.add_argument("--rerank-model", dest="local_model", metavar="CARD", default=None,
                   help="SelaVPR card for local features (e.g. selavpr_vitl14)")
    g.add_argument("--rerank-weights", dest="local_weights", metavar="FILE", default=None,
                   help="weights for the re-ranking model (official SelaVPR .pth)")


def source_from_args(args):
    """-> (entries iterable, description, BagSource or None, total or None, source info)."""
    from ..maps import BagSource, benchmark_source, folder_source, select_keyframes

    given = [name for name, v in (("--images", args.images), ("--dataset", args.dataset),
                                  ("--bag", args.bag)) if v]
    if len(given) != 1:
        raise ConfigError("give exactly one map source: --images DIR --poses CSV, --dataset DIR, "
                          f"or --bag BAG --image-topic T (got {', '.join(given) or 'none'})")
    bag = None
    if args.images:
        if not args.poses:
            raise ConfigError("--images needs --poses CSV (one pose row per image)")
        entries = folder_source(args.images, args.poses, max_pixels=args.max_pixels)
        what = f"{args.images} + {args.poses}"
        info = {"type": "images+csv", "images": str(args.images), "poses": str(args.poses)}
    elif args.dataset:
        entries = benchmark_source(args.dataset, args.split, max_pixels=args.max_pixels)
        what = f"{args.dataset} ({args.split})"
        info = {"type": "benchmark", "dataset": str(args.dataset), "split": args.split}
    else:
        if not args.image_topic:
            raise ConfigError("--bag needs --image-topic TOPIC")
        bag = BagSource(args.bag, args.image_topic, pose_topic=args.pose_topic,
                        poses_csv=args.poses, max_gap_s=args.max_pose_gap)
        entries = bag
        what = f"{args.bag} {args.image_topic}"
        info = bag.stats
    total = len(entries) if isinstance(entries, list) else None
    if args.min_distance > 0 or args.min_interval > 0:
        entries = select_keyframes(entries, args.min_distance, args.min_interval)
        total = None
        if not callable(info):
            info = dict(info, min_distance_m=args.min_distance, min_interval_s=args.min_interval)
    return entries, what, bag, total, info


def register(subparsers) -> None:
    from .common import add_model_args

    p = subparsers.add_parser("map", help="build, inspect and extend place maps",
                              description="Place maps: images with poses, their descriptors "
                                          "and a FAISS index (docs/maps.md).")
    sub = p.add_subparsers(dest="map_command", metavar="ACTION")
    sub.required = True

    b = sub.add_parser("build", help="build a map from images with poses",
                       description="Describe every image of a source and write a map folder "
                                   "atomically (a failed build leaves the old map).")
    b.add_argument("out", metavar="OUT", help="map folder to create")
    add_source_args(b)
    add_model_args(b, local=True)
    add_rerank_model_args(b)
    b.add_argument("--local-features", action="store_true",
                   help="also store SelaVPR dense local features for re-ranking (model from "
                        "--rerank-model/--local-model, default the shipped demo re-ranker, else "
                        "selavpr_tiny_random)")
    b.add_argument("--local-storage", default="float16", choices=("float16", "int8"),
                   help="how local features are stored: float16 (0.95 MB/place for SelaVPR "
                        "ViT-L, exact re-ranking counts; default) or int8 with a scale per "
                        "point (0.48 MB/place, counts change by ~0.5%%)")
    b.add_argument("--index", default="Flat", metavar="FACTORY",
                   help="FAISS factory string: Flat (exact, default), PCA256,Flat, HNSW32, "
                        "IVF1024,PQ64, ...")
    b.add_argument("--pca-dim", type=positive_int, default=None, metavar="N",
                   help="shortcut: project descriptors to N dimensions with PCA first")
    b.add_argument("--descriptor-dtype", default="float32", choices=("float32", "float16"),
                   help="storage type of descriptors.npy (default float32)")
    b.add_argument("--frame-id", default="map", help="frame of the place poses (default map)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing map at OUT")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON (last line)")
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="show what a map holds")
    i.add_argument("map", metavar="MAP")
    i.add_argument("--json", action="store_true", help="one JSON object on the last line")
    i.add_argument("--verify", default="full", choices=("full", "size", "none"),
                   help="checksum check: full sha256 (default), size only, or none")
    i.set_defaults(func=run_info)

    a = sub.add_parser("add", help="append places to a map (same model)",
                       description="Describe only the new images with the map's own model "
                                   "and rebuild the index; atomic.")
    a.add_argument("map", metavar="MAP")
    add_source_args(a)
    add_model_args(a, local=True)
    add_rerank_model_args(a)
    a.add_argument("--json", action="store_true", help="print the manifest as JSON (last line)")
    a.set_defaults(func=run_add)


def _command_line() -> str:
    return "vpr " + " ".join(shlex.quote(x) for x in sys.argv[1:])


def default_rerank_model(map_path=None) -> str:
    """The re-ranking card when none is given: the card that made ``map_path``'s local
    features, else the shipped demo re-ranker, else selavpr_tiny_random."""
    from ..maps import read_manifest
    from ..models.cards import default_rerank_card_name

    if map_path:
        local = read_manifest(map_path).get("local_features") or {}
        card = (local.get("model") or {}).get("card") if local.get("present") else None
        if card:
            return card
    return default_rerank_card_name()


def _local_extractor(args, force: bool):
    from .common import local_extractor_from_args

    if getattr(args, "local_model", None) is None and force:
        args.local_model = default_rerank_model()
        log.info("--local-features without --rerank-model: using %s", args.local_model)
    return local_extractor_from_args(args)


def run_build(args) -> int:
    from ..atomic import write_lock

    # The writer lock first: another writer, or a read-only folder, is reported before
    # the model loads.  build_map takes the same lock again (re-entrant).
    with write_lock(args.out, wait_s=args.wait_lock, what=f"map {args.out}"):
        return _run_build(args)


def _run_build(args) -> int:
    from ..maps import build_map
    from .common import describer_from_args

    entries, what, bag, total, info = source_from_args(args)
    describer = describer_from_args(args)
    local = _local_extractor(args, args.local_features)
    log.info("building map %s from %s with %s (%s)", args.out, what, describer.card.name,
             describer.fingerprint[:24])
    manifest = build_map(entries, args.out, describer, local_extractor=local, index=args.index,
                         pca_dim=args.pca_dim, frame_id=args.frame_id, overwrite=args.overwrite,
                         batch_size=args.batch_size, descriptor_dtype=args.descriptor_dtype,
                         command=_command_line(), total=total, source_info=info,
                         local_storage=args.local_storage, wait_lock=args.wait_lock)
    if bag is not None:
        print(f"bag frames: {bag.frames}, dropped without pose: {bag.dropped}")
    print(f"map {args.out}: {manifest['counts']['places']} places, index "
          f"{manifest['index']['factory']}, model {manifest['model']['card']}")
    if args.json:
        print(json.dumps(manifest))
    return 0


def _model_for_map(args, map_path):
    """Default to the map's own card when --model is not given."""
    from ..maps import read_manifest

    if args.model is None:
        args.model = (read_manifest(map_path).get("model") or {}).get("card")
    local = read_manifest(map_path).get("local_features") or {}
    if local.get("present") and getattr(args, "local_model", None) is None:
        args.local_model = (local.get("model") or {}).get("card")


def run_add(args) -> int:
    from ..atomic import write_lock

    with write_lock(args.map, wait_s=args.wait_lock, what=f"map {args.map}"):
        return _run_add(args)


def _run_add(args) -> int:
    from ..maps import add_to_map
    from .common import describer_from_args, local_extractor_from_args

    _model_for_map(args, args.map)
    entries, what, bag, total, info = source_from_args(args)
    describer = describer_from_args(args)
    local = local_extractor_from_args(args)
    manifest = add_to_map(args.map, entries, describer, local_extractor=local,
                          batch_size=args.batch_size, command=_command_line(), total=total,
                          source_info=info, wait_lock=args.wait_lock)
    added = manifest["updates"][-1]["added_places"]
    print(f"map {args.map}: added {added} places from {what}, now "
          f"{manifest['counts']['places']} places")
    if args.json:
        print(json.dumps(manifest))
    return 0


def run_info(args) -> int:
    from ..maps import PlaceMap

    place_map = PlaceMap.open(args.map, verify=args.verify, device="cpu")
    s = place_map.summary()
    if not args.json:
        m = s["model"] or {}
        print(f"map:          {s['path']} (format {s['format_version']})")
        print(f"places:       {s['places']} in frame {s['frame_id']!r}")
        if s["extent_m"]:
            lo, hi = s["extent_m"]["min"], s["extent_m"]["max"]
            print(f"extent:       x {lo[0]:.1f}..{hi[0]:.1f}  y {lo[1]:.1f}..{hi[1]:.1f}  "
                  f"z {lo[2]:.1f}..{hi[2]:.1f} m")
        print(f"model:        {m.get('card')} ({m.get('architecture')}), dim "
              f"{m.get('descriptor_dim')}, input {m.get('input_size')}, {m.get('fingerprint')}")
        idx = s["index"] or {}
        print(f"index:        {idx.get('factory')} (inner product, trained={idx.get('trained')})")
        lf = s["local_features"] or {}
        print("local feats:  " + (f"{lf.get('shape')} {lf.get('storage', 'float16')} from "
                                  f"{(lf.get('model') or {}).get('card')}" if lf.get("present")
                                  else "none (no re-ranking)"))
        conf = s["confidence"]
        print("confidence:   "
              + ("fitted " + json.dumps(conf) if conf else "defaults (not fitted)"))
        src = place_map.manifest.get("source")
        if src:
            print("source:       " + ", ".join(f"{k}={v}" for k, v in src.items()))
        c = s["created"] or {}
        print(f"created:      {c.get('utc')} on {c.get('host')} by vpr_ros "
              f"{c.get('vpr_ros_version')}")
        print(f"              {c.get('command')}")
        for u in s["updates"]:
            print(f"updated:      {u.get('utc')} +{u.get('added_places')} places: "
                  f"{u.get('command')}")
        total = sum(s["files"].values())
        print(f"files:        {len(s['files'])} files, {total / 1e6:.2f} MB, checksums "
              f"{'verified' if args.verify == 'full' else args.verify + ' check'}")
    print(json.dumps(s)) if args.json else None
    return 0
