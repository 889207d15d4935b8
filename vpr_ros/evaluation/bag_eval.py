"""Evaluate localization on a recorded bag (`vpr eval bag`).

Two modes produce the same per-frame predictions, scored the same way:

* offline (default, ROS-free, deterministic): every decodable frame goes through the
  :class:`~vpr_ros.localizer.Localizer` in order;
* realtime: the real ROS node runs as a subprocess on a private DDS domain and the bag's
  images are published with their recorded timing (``vpr_ros.ros.replay``); only what the
  node published is scored, and frames it dropped are counted.

Ground truth comes from a pose topic in the bag (Odometry, PoseStamped,
PoseWithCovarianceStamped; interpolated at the image stamps) or a poses CSV (matched by
stamp, or by order when the CSV has no stamps and one row per frame).  A frame is correct
at N when one of its first N places lies within ``radius_m`` of the ground truth.

Reported: Recall@N, precision/recall of the confidence gate, the error (m) of the
published pose of confident matches, latency, frame counts, and the ``stream`` object of
the stream localizer (:mod:`vpr_ros.evaluation.stream_eval`; on by default, the node's
default too); plots (:mod:`vpr_ros.evaluation.plots`): trajectory (ground truth vs matched
places, coloured by correctness), matched place along the route over time, error over
time, PR curve.

Odometry for the stream comes from an odometry topic of the bag (``--odometry-topic``:
nav_msgs/Odometry or a pose topic of the robot's own estimate), never from the ground-truth
topic.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from ..atomic import atomic_directory
from ..bags import POSE_TYPES, PoseTrack, bag_topics, read_images, read_poses
from ..constants import CONFIDENCE_THRESHOLD, MAX_POSE_GAP_S, TARGET_PRECISION
from ..errors import BagError, DatasetError
from .metrics import positives_within, precision_recall, recall_at_n

log = logging.getLogger(__name__)

DEFAULT_NS = (1, 5, 10, 20)


@dataclass
class BagEvalSettings:
    image_topic: str
    pose_topic: Optional[str] = None
    poses_csv: Optional[str] = None
    radius_m: float = 25.0
    max_gap_s: float = MAX_POSE_GAP_S
    top_k: int = 20
    rerank_k: int = 0
    confidence_threshold: float = CONFIDENCE_THRESHOLD
    stream: bool = True
    stream_config: Optional[object] = None   # vpr_ros.stream.StreamConfig
    odometry_topic: Optional[str] = None     # the robot's odometry (never ground truth)
    target_precision: float = TARGET_PRECISION
    realtime: bool = False
    rate: float = 1.0
    max_frames: Optional[int] = None


# --------------------------------------------------------------------------- ground truth

def ground_truth(bag, stamps_ns: np.ndarray, settings: BagEvalSettings):
    """(positions (N, 3), valid (N,), source description) at the frame stamps."""
    stamps_ns = np.asarray(stamps_ns, dtype=np.int64)
    if settings.poses_csv:
        from ..maps import read_poses_csv

        rows = read_poses_csv(settings.poses_csv, need_names=False)
        if (rows.stamps_ns >= 0).all():
            track = PoseTrack(rows.stamps_ns, rows.positions, rows.orientations)
            pos, _, valid = track.interpolate(stamps_ns, settings.max_gap_s)
            return pos, valid, f"{settings.poses_csv} (by stamp)"
        if len(rows.positions) != len(stamps_ns):
            raise DatasetError(
                f"{settings.poses_csv} has no stamp column (stamp_ns or t_s) and "
                f"{len(rows.positions)} rows for {len(stamps_ns)} frames: add stamps or one "
                "row per frame in order")
        return rows.positions.copy(), np.ones(len(stamps_ns), bool), \
            f"{settings.poses_csv} (by order)"
    topic = settings.pose_topic
    if topic is None:
        poses = [t for t, (m, c) in bag_topics(bag).items() if m in POSE_TYPES and c > 0]
        if len(poses) != 1:
            raise BagError(
                f"no ground truth: bag {bag} has {len(poses)} pose topics "
                f"({', '.join(poses) or 'none'}); pass --pose-topic TOPIC or --poses CSV")
        topic = poses[0]
    track = read_poses(bag, topic)
    pos, _, valid = track.interpolate(stamps_ns, settings.max_gap_s)
    if not valid.any():
        raise BagError(f"pose topic {topic} of {bag} covers none of the {len(stamps_ns)} image "
                       f"stamps (poses {track.stamps_ns[0]}..{track.stamps_ns[-1]} ns, max gap "
                       f"{settings.max_gap_s} s)")
    return pos, valid, f"{topic} ({track.msgtype})"


# --------------------------------------------------------------------------- predictions

def offline_predictions(bag, place_map, describer, local_extractor, settings: BagEvalSettings,
                        progress: bool = True, on_frame: Optional[Callable] = None):
    """Run every frame through the Localizer; returns (frames list, total, bad count)."""
    from tqdm import tqdm

    from ..localizer import Localizer
    from ..stream import StreamLocalizer

    stream = (StreamLocalizer.for_map(place_map, settings.stream_config)
              if settings.stream else None)
    odometry = _odometry_track(bag, settings) if stream is not None else None
    loc = Localizer(place_map, describer, local_extractor,
                    top_k=min(settings.top_k, len(place_map)),
                    rerank_k=settings.rerank_k if local_extractor is not None else 0,
                    confidence_threshold=settings.confidence_threshold, stream=stream)
    odo_next = 0
    total = bag_topics(bag)[settings.image_topic][1]
    if settings.max_frames is not None:
        total = min(total, settings.max_frames)
    frames = []
    seen = 0
    it = read_images(bag, settings.image_topic, skip_bad=True)
    bar = tqdm(total=total, desc="localizing bag frames", unit="frame", disable=not progress)
    last_index = -1
    for frame in it:
        if settings.max_frames is not None and frame.index >= settings.max_frames:
            break
        bar.update(frame.index - last_index)
        last_index = frame.index
        seen += 1
        if odometry is not None:
            # feed the odometry recorded up to this frame, as the node's subscription would
            while odo_next < len(odometry.stamps_ns) and \
                    odometry.stamps_ns[odo_next] <= frame.stamp_ns:
                stream.add_odometry(int(odometry.stamps_ns[odo_next]),
                                    odometry.positions[odo_next])
                odo_next += 1
        r = loc.localize(frame.image, stamp_ns=frame.stamp_ns)
        rec = frame_record(r.to_dict(), frame.index)
        frames.append(rec)
        if on_frame is not None:
            on_frame(rec)
    bar.update(max(0, total - 1 - last_index))
    bar.close()
    return frames, total, total - seen


def frame_record(doc: dict, index: int, id_to_index: Optional[dict] = None) -> dict:
    """One frame's prediction from a LocalizationResult dict (offline or the node's JSON)."""
    cands = doc.get("candidates")
    if cands is None:       # an older node's JSON: parallel lists instead of candidate dicts
        cands = [{"place_id": pid, "similarity": sc, "position": doc["position"]}
                 for pid, sc in zip(doc["place_ids"], doc["scores"])]
    ids = [int(c["place_id"]) for c in cands]
    if id_to_index is None:
        indices = [int(c.get("place_index", -1)) for c in cands]
    else:
        indices = [id_to_index.get(i, -1) for i in ids]
    single = doc.get("single_frame") or {"confidence": doc["confidence"],
                                         "confident": doc["confident"]}
    rec = {"index": index, "stamp_ns": int(doc["stamp_ns"]),
           "place_indices": indices, "place_ids": ids,
           "scores": [float(c["similarity"]) for c in cands],
           "confidence": float(single["confidence"]), "confident": bool(single["confident"]),
           "position": [float(v) for v in cands[0]["position"]] if cands else doc["position"],
           "latency_ms": float(doc["timings_ms"].get("total", np.nan)),
           "timings_ms": {k: float(v) for k, v in doc["timings_ms"].items()},
           "reranked": bool(doc.get("reranked"))}
    st = doc.get("stream")
    if st:
        pid = int(doc["place_id"])
        rec["stream"] = {"place_index": (int(st["place_index"]) if id_to_index is None
                                         else id_to_index.get(pid, -1)),
                         "place_id": pid, "position": [float(v) for v in doc["position"]],
                         "raw_confidence": float(st["raw_confidence"]),
                         "prior_fit": float(st["prior_fit"]),
                         "confidence": float(st["confidence"]),
                         "confident": bool(st["confident"]), "localized": bool(st["localized"]),
                         "used_odometry": bool(st.get("used_odometry")),
                         "ms": float(doc["timings_ms"].get("stream", 0.0))}
    return rec


def _odometry_track(bag, settings: BagEvalSettings):
    if not settings.odometry_topic:
        return None
    topics = bag_topics(bag)
    if settings.odometry_topic not in topics:
        poses = ", ".join(t for t, (m, _) in topics.items() if m in POSE_TYPES) or "none"
        raise BagError(f"odometry topic {settings.odometry_topic!r} is not in bag {bag}; pose "
                       f"topics: {poses}")
    if settings.pose_topic and settings.odometry_topic == settings.pose_topic:
        raise BagError(f"--odometry-topic {settings.odometry_topic} is the ground-truth topic: "
                       "ground truth scores the results and never feeds the localizer")
    return read_poses(bag, settings.odometry_topic)


def realtime_predictions(bag, place_map, settings: BagEvalSettings, node_params: dict,
                         log_path: Optional[str] = None, on_frame: Optional[Callable] = None):
    """Replay through the live node (subprocess); returns (frames, total, bad, extra)."""
    try:
        from ..ros.replay import run_node_and_replay
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"the live node needs ROS 2 Python (rclpy) and its messages: {exc}. "
                          "Source a ROS 2 installation or `pip install -r "
                          "requirements-ros-wheels.txt`; offline evaluation (without "
                          "--realtime) needs no ROS") from None

    id_to_index = {int(pid): i for i, pid in enumerate(place_map.places.ids)}
    stamp_to_index: Dict[int, int] = {}

    def convert(doc: dict) -> dict:
        rec = frame_record(doc, stamp_to_index.get(int(doc["stamp_ns"]), -1), id_to_index)
        rec["image_name"] = doc.get("image_name")
        rec["frames_dropped"] = doc.get("frames_dropped")
        return rec

    from ..bags import read_image_stamps

    stamps = read_image_stamps(bag, settings.image_topic)
    if settings.max_frames is not None:
        stamps = stamps[:settings.max_frames]
    for i, s in enumerate(stamps):
        stamp_to_index.setdefault(int(s), i)
    params = dict(node_params)
    params.setdefault("top_k", min(max(settings.top_k, 1), 100))
    params.setdefault("confidence_threshold", float(settings.confidence_threshold))
    params.setdefault("stream", bool(settings.stream))
    if settings.odometry_topic:
        params.setdefault("odometry_topic", settings.odometry_topic)
    callback = (lambda doc: on_frame(convert(doc))) if on_frame is not None else None
    result = run_node_and_replay(bag, settings.image_topic, params, rate=settings.rate,
                                 log_path=log_path, on_match=callback,
                                 max_frames=settings.max_frames)
    frames = sorted((convert(d) for d in result.matches), key=lambda f: f["stamp_ns"])
    diag = result.diagnostics
    extra = {"frames_sent": len(result.sent), "frames_answered": len(frames),
             "frames_dropped": result.frames_dropped,
             "frames_bad": int(diag.get("frames_bad") or 0),
             "node_diagnostics": diag, "replay_seconds": round(result.duration_s, 2),
             "rate": settings.rate,
             "poses_published": len(result.poses)}
    return frames, len(stamps), extra["frames_bad"], extra


# --------------------------------------------------------------------------- scoring

def _stats(values) -> Optional[dict]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    return {"count": int(v.size), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


def score(frames: List[dict], gt_positions: np.ndarray, gt_valid: np.ndarray, place_map,
          radius_m: float, ns=DEFAULT_NS, target_precision: float = 0.99,
          stream_config=None, odometry_given: bool = False) -> dict:
    """Recall@N, confidence-gate PR and pose error of predictions against ground truth."""
    usable = [f for f in frames if 0 <= f["index"] < len(gt_valid) and gt_valid[f["index"]]]
    db_xy = place_map.places.positions[:, :2]
    report: dict = {"frames_scored": len(usable),
                    "frames_without_ground_truth": len(frames) - len(usable)}
    if not usable:
        report.update({"recall": {}, "confidence_gate": None, "localization_error_m": None})
        return report
    k = max(len(f["place_indices"]) for f in usable)
    preds = np.full((len(usable), k), -1, dtype=np.int64)
    for i, f in enumerate(usable):
        preds[i, :len(f["place_indices"])] = f["place_indices"]
    gt = np.array([gt_positions[f["index"]] for f in usable])
    positives = positives_within(gt[:, :2], db_xy, radius_m)
    report["recall"] = recall_at_n(preds, positives, ns=tuple(n for n in ns if n <= k) or (1,))
    correct = np.array([bool(np.isin(preds[i, 0], positives[i])) for i in range(len(usable))])
    conf = np.array([f["confidence"] for f in usable])
    confident = np.array([f["confident"] for f in usable])
    pr = precision_recall(conf, correct)
    report["confidence_gate"] = {
        "confident_frames": int(confident.sum()),
        "precision_of_confident": float(correct[confident].mean()) if confident.any() else None,
        "recall_of_confident": float((correct & confident).sum() / len(usable)),
        "pr_auc": pr["auc"], "recall_at_100_precision": pr["recall_at_100_precision"]}
    pred_xy = np.array([f["position"][:2] for f in usable], dtype=np.float64)
    err = np.linalg.norm(pred_xy - gt[:, :2], axis=1)
    report["localization_error_m"] = {"confident": _stats(err[confident]), "all": _stats(err)}
    report["_arrays"] = {"gt": gt, "pred_xy": pred_xy, "correct": correct, "conf": conf,
                         "confident": confident, "err": err, "pr": pr,
                         "stamps": np.array([f["stamp_ns"] for f in usable]),
                         "gt_all": gt_positions[gt_valid]}
    if all("stream" in f for f in usable):
        report["stream"] = _score_stream(usable, preds, positives, gt, target_precision,
                                         stream_config, odometry_given)
        report["_arrays"]["stream"] = report["stream"].pop("_arrays")
    return report


def _score_stream(usable, preds, positives, gt, target_precision, stream_config,
                  odometry_given) -> dict:
    from ..stream import StreamConfig
    from .stream_eval import stream_report

    run = {"answer": np.array([f["stream"]["place_index"] for f in usable], dtype=np.int64),
           "raw": np.array([f["stream"]["raw_confidence"] for f in usable]),
           "fit": np.array([f["stream"]["prior_fit"] for f in usable]),
           "ms": np.array([f["stream"]["ms"] for f in usable]),
           "used_odometry_frames": int(sum(f["stream"]["used_odometry"] for f in usable)),
           "config": stream_config or StreamConfig()}
    rep = stream_report(run, preds, positives, target_precision, odometry_given=odometry_given)
    live = np.array([f["stream"]["confident"] for f in usable], dtype=bool)
    correct = rep["_arrays"]["correct"]
    # what the localizer itself published (map's stored threshold), next to the cross-fitted
    rep["published_as_run"] = {
        "fraction": float(live.mean()),
        "precision": float(correct[live].mean()) if live.any() else None,
        "frames": int(live.sum())}
    err = np.linalg.norm(np.array([f["stream"]["position"][:2] for f in usable]) - gt[:, :2],
                         axis=1)
    rep["localization_error_m"] = {"published": _stats(err[live]), "all": _stats(err)}
    rep["_arrays"].update({"err": err, "published": live,
                           "pred_xy": np.array([f["stream"]["position"][:2] for f in usable])})
    return rep


# --------------------------------------------------------------------------- plots

def report_tracks(report: dict) -> list:
    """Plot tracks (vpr_ros.evaluation.plots): the frame answers, and the stream's."""
    a = report["_arrays"]
    tracks = [{"label": "single-frame answer", "xy": a["pred_xy"], "correct": a["correct"],
               "confident": a["confident"], "err": a["err"]}]
    st = a.get("stream")
    if st is not None:
        tracks.append({"label": "stream localizer", "xy": st["pred_xy"],
                       "correct": st["correct"], "confident": st["published"],
                       "err": st["err"]})
    return tracks


def write_bag_report(report: dict, out_dir, place_map, tracks=None) -> None:
    """report.json + trajectory.png + route_over_time.png + error_over_time.png +
    pr_curve.png (atomic folder).  ``tracks`` (one per method, see
    :mod:`vpr_ros.evaluation.compare`) replaces the single published-answer track."""
    from .plots import (plot_error_over_time, plot_pr_curves, plot_route_over_time,
                        plot_trajectory)

    arrays = report.get("_arrays")
    with atomic_directory(out_dir, overwrite=True) as tmp:
        if arrays is not None:
            title = f"{Path(report['bag']).name} ({report['mode']})"
            tracks = tracks or report_tracks(report)
            db_xy = place_map.places.positions[:, :2]
            t = (arrays["stamps"] - arrays["stamps"][0]) / 1e9
            plot_trajectory(arrays["gt_all"], tracks, db_xy, tmp / "trajectory.png", title,
                            radius_m=report["radius_m"])
            plot_route_over_time(t, arrays["gt"], tracks, db_xy, tmp / "route_over_time.png",
                                 title)
            plot_error_over_time(t, tracks, report["radius_m"], tmp / "error_over_time.png",
                                 title)
            plot_pr_curves({"confidence": arrays["pr"]}, tmp / "pr_curve.png",
                           title=f"confidence gate, {title}")
        (tmp / "report.json").write_text(json.dumps(public_report(report), indent=2) + "\n")


def public_report(report: dict) -> dict:
    from .recall_eval import public_report as clean

    return clean(report)


# --------------------------------------------------------------------------- driver

def evaluate_bag(bag, place_map, settings: BagEvalSettings, describer=None,
                 local_extractor=None, node_params: Optional[dict] = None, out_dir=None,
                 progress: bool = True, on_frame: Optional[Callable] = None,
                 node_log: Optional[str] = None) -> dict:
    """Predict (offline or realtime), score against ground truth, write the report."""
    t0 = time.perf_counter()
    bag = Path(bag)
    topics = bag_topics(bag)
    if settings.image_topic not in topics:
        images = [t for t, (m, _) in topics.items() if "Image" in m]
        raise BagError(f"image topic {settings.image_topic!r} is not in bag {bag}; image "
                       f"topics: {', '.join(images) or 'none'}")
    extra: dict = {}
    if settings.realtime:
        frames, total, bad, extra = realtime_predictions(bag, place_map, settings,
                                                         node_params or {}, node_log, on_frame)
    else:
        if describer is None:
            raise ValueError("offline evaluation needs a describer")
        frames, total, bad = offline_predictions(bag, place_map, describer, local_extractor,
                                                 settings, progress, on_frame)
    from ..bags import read_image_stamps

    stamps = read_image_stamps(bag, settings.image_topic)
    if settings.max_frames is not None:
        stamps = stamps[:settings.max_frames]
    gt_pos, gt_valid, gt_source = ground_truth(bag, stamps, settings)
    report = {"bag": str(bag), "map": str(place_map.path),
              "mode": "realtime" if settings.realtime else "offline",
              "image_topic": settings.image_topic, "ground_truth": gt_source,
              "radius_m": settings.radius_m,
              "settings": asdict(settings),      # asdict recurses into stream_config
              "model": place_map.manifest.get("model"),
              "frames": {"total": int(total), "bad": int(bad), "localized": len(frames),
                         "with_ground_truth": int(gt_valid.sum())}}
    report["frames"].update({k: v for k, v in extra.items()
                             if k.startswith("frames_") or k in ("poses_published",)})
    report.update(score(frames, gt_pos, gt_valid, place_map, settings.radius_m,
                        target_precision=settings.target_precision,
                        stream_config=settings.stream_config,
                        odometry_given=bool(settings.odometry_topic)))
    report["latency_ms"] = {"total": _stats([f["latency_ms"] for f in frames])}
    stages = sorted({k for f in frames for k in f["timings_ms"]})
    for stage in stages:
        report["latency_ms"][stage] = _stats([f["timings_ms"].get(stage) for f in frames])
    if extra:
        report["node"] = {k: v for k, v in extra.items() if not k.startswith("frames_")}
    keys = ("index", "stamp_ns", "place_ids", "confidence", "confident", "position",
            "latency_ms")
    report["per_frame"] = [{k: f[k] for k in keys}
                           | {"place_ids": f["place_ids"][:5]} for f in frames]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_bag_report(report, out_dir, place_map)
    return report
