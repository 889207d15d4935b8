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
published pose of confident matches, latency, frame counts; plots: trajectory (ground
truth vs matched places, coloured by correctness), matched place along the route over
time, error over time, PR curve (plots in :mod:`vpr_ros.evaluation.plots`).
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
    max_gap_s: float = 2.0
    top_k: int = 20
    rerank_k: int = 0
    confidence_threshold: float = 0.5
    temporal: bool = False
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
    from ..temporal import PlaceBeliefFilter

    temporal = PlaceBeliefFilter(place_map.places.positions) if settings.temporal else None
    loc = Localizer(place_map, describer, local_extractor,
                    top_k=min(settings.top_k, len(place_map)),
                    rerank_k=settings.rerank_k if local_extractor is not None else 0,
                    confidence_threshold=settings.confidence_threshold, temporal_filter=temporal)
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
        r = loc.localize(frame.image, stamp_ns=frame.stamp_ns)
        rec = {"index": frame.index, "stamp_ns": int(frame.stamp_ns),
               "place_indices": [c.place_index for c in r.candidates],
               "place_ids": [c.place_id for c in r.candidates],
               "scores": [float(c.similarity) for c in r.candidates],
               "confidence": float(r.confidence), "confident": bool(r.confident),
               "position": [float(v) for v in r.position],
               "latency_ms": float(r.timings_ms.get("total", np.nan)),
               "timings_ms": {k: float(v) for k, v in r.timings_ms.items()},
               "reranked": bool(r.reranked)}
        frames.append(rec)
        if on_frame is not None:
            on_frame(rec)
    bar.update(max(0, total - 1 - last_index))
    bar.close()
    return frames, total, total - seen


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
        return {"index": stamp_to_index.get(int(doc["stamp_ns"]), -1),
                "stamp_ns": int(doc["stamp_ns"]),
                "place_indices": [id_to_index.get(int(p), -1) for p in doc["place_ids"]],
                "place_ids": [int(p) for p in doc["place_ids"]],
                "scores": doc["scores"], "confidence": float(doc["confidence"]),
                "confident": bool(doc["confident"]),
                "position": doc["position"],
                "latency_ms": float(doc["timings_ms"].get("total", np.nan)),
                "timings_ms": doc["timings_ms"], "image_name": doc.get("image_name"),
                "reranked": bool(doc.get("reranked")),
                "frames_dropped": doc.get("frames_dropped")}

    from ..bags import read_image_stamps

    stamps = read_image_stamps(bag, settings.image_topic)
    if settings.max_frames is not None:
        stamps = stamps[:settings.max_frames]
    for i, s in enumerate(stamps):
        stamp_to_index.setdefault(int(s), i)
    params = dict(node_params)
    params.setdefault("top_k", min(max(settings.top_k, 1), 100))
    params.setdefault("confidence_threshold", float(settings.confidence_threshold))
    params.setdefault("temporal_filter", bool(settings.temporal))
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
          radius_m: float, ns=DEFAULT_NS) -> dict:
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
    return report


# --------------------------------------------------------------------------- plots

def report_tracks(report: dict) -> list:
    """The node's answers as one plot track (vpr_ros.evaluation.plots)."""
    a = report["_arrays"]
    return [{"label": "published answer", "xy": a["pred_xy"], "correct": a["correct"],
             "confident": a["confident"], "err": a["err"]}]


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
    return {k: v for k, v in report.items() if not k.startswith("_")}


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
              "settings": {k: v for k, v in asdict(settings).items()},
              "model": place_map.manifest.get("model"),
              "frames": {"total": int(total), "bad": int(bad), "localized": len(frames),
                         "with_ground_truth": int(gt_valid.sum())}}
    report["frames"].update({k: v for k, v in extra.items()
                             if k.startswith("frames_") or k in ("poses_published",)})
    report.update(score(frames, gt_pos, gt_valid, place_map, settings.radius_m))
    report["latency_ms"] = {"total": _stats([f["latency_ms"] for f in frames])}
    stages = sorted({k for f in frames for k in f["timings_ms"]})
    for stage in stages:
        report["latency_ms"][stage] = _stats([f["timings_ms"].get(stage) for f in frames])
    if extra:
        report["node"] = {k: v for k, v in extra.items() if not k.startswith("frames_")}
    report["per_frame"] = [{k: f[k] for k in ("index", "stamp_ns", "place_ids", "confidence",
                                               "confident", "position", "latency_ms")}
                           | {"place_ids": f["place_ids"][:5]} for f in frames]
    report["seconds"] = round(time.perf_counter() - t0, 2)
    if out_dir is not None:
        write_bag_report(report, out_dir, place_map)
    return report
