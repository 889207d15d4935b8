"""`vpr bag from-images` (write an image sequence as a rosbag2) and `vpr bag info`."""

from __future__ import annotations

import json
from typing import Iterator, List


from .common import add_image_args, non_negative_float, positive_float, positive_int


def register(subparsers) -> None:
    p = subparsers.add_parser("bag", help="write image sequences as bags, inspect bags",
                              description="rosbag2 helpers (no ROS installation needed).")
    sub = p.add_subparsers(dest="bag_command", metavar="WHAT")
    sub.required = True

    f = sub.add_parser(
        "from-images", help="write images (+ ground-truth poses) as a rosbag2",
        description="Write a benchmark split (--dataset DIR --split queries) or an image folder "
                    "with a poses CSV (--images DIR --poses CSV) as a rosbag2 with "
                    "sensor_msgs/Image (or CompressedImage) and geometry_msgs/PoseStamped "
                    "ground truth. Timing: --rate HZ, else the stamps of the poses CSV "
                    "(t_s / stamp_ns columns).")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", metavar="DIR", help="benchmark-layout dataset folder")
    src.add_argument("--images", metavar="DIR", help="folder of images named in --poses")
    f.add_argument("--split", default="queries", choices=("queries", "database"),
                   help="split of --dataset (default queries)")
    f.add_argument("--poses", metavar="CSV", help="poses CSV for --images")
    f.add_argument("--out", required=True, metavar="BAG", help="bag folder to write")
    f.add_argument("--storage", default="sqlite3", choices=("sqlite3", "mcap"))
    f.add_argument("--compressed", action="store_true",
                   help="write sensor_msgs/CompressedImage (JPEG) instead of raw Image")
    f.add_argument("--encoding", default="rgb8",
                   help="raw Image encoding (rgb8, bgr8, mono8, bayer_rggb8, yuv422, ...)")
    f.add_argument("--rate", type=positive_float, default=None, metavar="HZ",
                   help="frame rate of the stamps (default: timing from the poses' t_s)")
    f.add_argument("--start-time", type=non_negative_float, default=None, metavar="S",
                   help="stamp of the first frame in seconds (with --rate; default 1.0)")
    f.add_argument("--max-frames", type=positive_int, default=None, metavar="N",
                   help="write only the first N images")
    f.add_argument("--image-topic", default="/camera/image_raw")
    f.add_argument("--pose-topic", default="/ground_truth/pose",
                   help="ground-truth pose topic ('' for none)")
    f.add_argument("--frame-id", default="camera", help="frame_id of the images")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    f.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    add_image_args(f)
    f.set_defaults(func=run_from_images)

    i = sub.add_parser("info", help="topics, types, counts and duration of a bag")
    i.add_argument("bag", metavar="BAG")
    i.add_argument("--json", action="store_true",
                   help="print one JSON object on the last line of stdout")
    i.set_defaults(func=run_info)


def entries_from_args(args) -> List:
    from ..errors import DatasetError
    from ..maps import benchmark_source, folder_source

    if args.dataset:
        entries = benchmark_source(args.dataset, args.split, max_pixels=args.max_pixels)
    else:
        if not args.poses:
            raise DatasetError("--images needs --poses CSV (image name and position per row)")
        entries = folder_source(args.images, args.poses, max_pixels=args.max_pixels)
    if args.max_frames is not None:
        entries = entries[:max(0, args.max_frames)]
    if not entries:
        raise DatasetError("no images to write")
    return entries


def frame_stamps(entries, rate, start_time) -> List[int]:
    """Stamps (ns): evenly at ``rate`` Hz, else from the entries' own stamps."""
    from ..errors import DatasetError

    if rate is not None:
        if rate <= 0:
            raise DatasetError(f"--rate must be > 0, got {rate}")
        start = int(round((1.0 if start_time is None else start_time) * 1e9))
        return [start + int(round(i * 1e9 / rate)) for i in range(len(entries))]
    stamps = [int(e.stamp_ns) for e in entries]
    if any(s < 0 for s in stamps):
        raise DatasetError("the poses have no timing (no t_s or stamp_ns column): pass --rate HZ")
    if any(b < a for a, b in zip(stamps, stamps[1:])):
        raise DatasetError("the poses' stamps go backwards: sort the rows by time or pass --rate")
    if start_time is not None:
        shift = int(round(start_time * 1e9)) - stamps[0]
        stamps = [s + shift for s in stamps]
    return stamps


def _frames(entries, stamps) -> Iterator:
    from ..bags import BagFrame

    for e, s in zip(entries, stamps):
        yield BagFrame(stamp_ns=s, image=e.load(), position=[float(v) for v in e.position],
                       orientation=[float(v) for v in e.orientation])


def run_from_images(args) -> int:
    from ..bags import bag_summary, write_image_bag
    from ..errors import BagError

    entries = entries_from_args(args)
    stamps = frame_stamps(entries, args.rate, args.start_time)
    from pathlib import Path

    if Path(args.out).exists() and not args.overwrite:
        raise BagError(f"{args.out} exists; pass --overwrite or choose another --out")
    n = write_image_bag(args.out, _frames(entries, stamps), image_topic=args.image_topic,
                        pose_topic=args.pose_topic or None, storage=args.storage,
                        compressed=args.compressed, frame_id=args.frame_id,
                        encoding=args.encoding, progress=True, total=len(entries))
    summary = bag_summary(args.out)
    print(f"wrote {n} images to {args.out} ({args.storage}, "
          f"{'CompressedImage' if args.compressed else 'Image ' + args.encoding}, "
          f"{summary['duration_s']:.1f} s)")
    if args.json:
        print(json.dumps(summary))
    return 0


def run_info(args) -> int:
    from ..bags import bag_summary

    s = bag_summary(args.bag)
    print(f"bag:      {s['path']} ({s['storage']})")
    print(f"duration: {s['duration_s']:.3f} s, {s['message_count']} messages")
    width = max([len(t) for t in s["topics"]] + [5])
    for topic, t in s["topics"].items():
        print(f"  {topic:<{width}}  {t['type']:<45} {t['count']:>7}")
    if args.json:
        print(json.dumps(s))
    return 0
