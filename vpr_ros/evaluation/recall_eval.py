"""Recall@N evaluation of a model (and map) on a benchmark-layout dataset.

Steps: build a map from the database split (or open the given one), describe the
queries, search, score Recall@1/5/10/20 against positives within ``radius_m``;
optionally re-rank with SelaVPR local features; fit and score the confidence gate
(precision/recall curve, recall at 100 % precision); run the stream localizer over the
queries in driving order (optionally with an odometry file) and score it
(:mod:`vpr_ros.evaluation.stream_eval`); time the single-image Localizer stage by stage;
write report.json and PNG plots atomically.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..atomic import atomic_directory
from ..constants import TARGET_PRECISION
from ..maps.format import usual_permissions
from ..errors import DatasetError
from ..localizer import (DEFAULT_CONFIDENCE, Localizer, confidence_features,
                         confidence_from_features, fit_confidence)
from ..preprocess import load_image
from ..datasets import read_split
from .metrics import DEFAULT_NS, correct_at_n, positives_within, precision_recall, recall_at_n

log = logging.getLogger(__name__)


@dataclass
class RecallSettings:
    radius_m: float = 25.0
    rerank_k: int = 20
    rerank_compute: str = "fp32"          # fp32 (exact) | bf16 (faster similarity matmul)
    max_queries: Optional[int] = None
    index: str = "Flat"
    latency_queries: int = 20
    stream: bool = True
    stream_config: Optional[object] = None   # vpr_ros.stream.StreamConfig (default settings)
    odometry_csv: Optional[str] = None       # the robot's odometry at the queries (never GT)
    target_precision: float = TARGET_PRECISION
    examples: int = 6
    chunk: int = 64


def _stats(values: List[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)),
            "p95": float(np.percentile(a, 95)), "n": int(len(a))}


def _cross_fitted_confidence(s1, margin, correct, radius_m):
    """Confidence of each query from a calibration fitted on the *other* half (even/odd),
    so the PR curve is not measured on the data the calibration was fitted on."""
    conf = np.empty(len(s1))
    folds = np.arange(len(s1)) % 2
    for f in (0, 1):
        train, test = folds != f, folds == f
        params = fit_confidence(s1[train], margin[train], correct[train], radius_m)
        conf[test] = confidence_from_features(s1[test], margin[test], params)
    return conf


def evaluate_recall(dataset_dir, describer, local_extractor=None, place_map=None,
                    settings: Optional[RecallSettings] = None, out_dir=None,
                    progress: bool = True, map_out=None, command: Optional[str] = None) -> dict:
    """Run the evaluation; returns the report dict (also written to out_dir/report.json)."""
    from ..maps import PlaceMap, benchmark_source, build_map

    s = settings or RecallSettings()
    t_start = time.perf_counter()
    queries = read_split(dataset_dir, "queries")
    q_paths = list(queries.paths)
    q_pos = queries.positions
    if s.max_queries is not None:
        if s.max_queries < 1:
            raise DatasetError(f"--max-queries must be >= 1, got {s.max_queries}")
        q_paths, q_pos = q_paths[:s.max_queries], q_pos[:s.max_queries]
    rerank_k = s.rerank_k if local_extractor is not None else 0

    tmp_ctx = None
    if place_map is None:
        entries = benchmark_source(dataset_dir, "database")
        if map_out is None:
            tmp_ctx = tempfile.TemporaryDirectory(prefix="vpr-eval-map-")
            map_dir = Path(tmp_ctx.name) / "map"
        else:
            map_dir = Path(map_out)
        build_map(entries, map_dir, describer,
                  local_extractor=local_extractor if rerank_k else None, index=s.index,
                  overwrite=True, batch_size=getattr(describer, "batch_size", 16),
                  progress=progress, command=command)
        place_map = PlaceMap.open_for(map_dir, describer,
                                      local_extractor=local_extractor if rerank_k else None,
                                      verify="size")
    elif rerank_k:
        place_map.check_local_extractor(local_extractor)
    try:
        odometry = None
        if s.odometry_csv:
            from .odometry_csv import align_odometry, read_odometry_csv

            table = read_odometry_csv(s.odometry_csv)
            odometry = align_odometry(table, [p.name for p in q_paths],
                                      queries.stamps_ns[:len(q_paths)])
        report = _evaluate(place_map, describer, local_extractor, rerank_k, q_paths, q_pos, s,
                           progress, from_csv=queries.from_csv,
                           stamps_ns=queries.stamps_ns[:len(q_paths)], odometry=odometry)
        report["dataset"] = str(dataset_dir)
        report["map"] = str(map_out) if map_out else (None if tmp_ctx else str(place_map.path))
        report["seconds"] = round(time.perf_counter() - t_start, 2)
        if out_dir is not None:
            write_report(report, out_dir, place_map, q_paths)
        if map_out is not None:
            from ..maps import set_confidence_params, set_stream_calibration

            set_confidence_params(map_out, report["confidence_calibration"])
            if "stream" in report:
                set_stream_calibration(map_out, report["stream"]["calibration"])
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return report


def _evaluate(place_map, describer, local_extractor, rerank_k, q_paths, q_pos, s, progress,
              from_csv, stamps_ns=None, odometry=None):
    from tqdm import tqdm

    from ..image_quality import assess_frame
    from ..stream import StreamConfig

    nq = len(q_paths)
    stream_cfg = (s.stream_config or StreamConfig()).validate() if s.stream else None
    k_single = min(max(max(DEFAULT_NS), rerank_k), len(place_map))
    k = min(max(k_single, stream_cfg.candidates if stream_cfg else 0), len(place_map))
    sims = np.zeros((nq, k), dtype=np.float32)
    preds = np.zeros((nq, k), dtype=np.int64)
    preds_rr = preds.copy() if rerank_k else None
    sims_rr = sims.copy() if rerank_k else None
    scores_rr = np.full((nq, k), np.nan) if rerank_k else None
    q_desc = None
    degenerate = np.zeros(nq, dtype=bool)
    loc = Localizer(place_map, describer, local_extractor=local_extractor,
                    top_k=k, rerank_k=rerank_k, check_map=False,
                    rerank_compute=s.rerank_compute)
    bar = tqdm(total=nq, desc="evaluating queries", unit="img", disable=not progress)
    for start in range(0, nq, s.chunk):
        images = [load_image(p) for p in q_paths[start:start + s.chunk]]
        desc = describer.describe(images)
        if stream_cfg is not None:
            if q_desc is None:
                q_desc = np.zeros((nq, desc.shape[1]), dtype=np.float32)
            q_desc[start:start + len(images)] = desc
            degenerate[start:start + len(images)] = [assess_frame(im).degenerate for im in images]
        sm, ix = place_map.search(desc, k)
        sims[start:start + len(images)] = sm
        preds[start:start + len(images)] = ix
        if rerank_k:
            _, local = local_extractor.extract(images)
            for j in range(len(images)):
                order, rr = loc.rerank(local[j], ix[j, :rerank_k])
                head = np.arange(len(order))[order]
                perm = np.r_[head, np.arange(len(head), k)]
                preds_rr[start + j] = ix[j][perm]
                sims_rr[start + j] = sm[j][perm]
                scores_rr[start + j, :len(order)] = np.asarray(rr)[order]
        bar.update(len(images))
    bar.close()

    positives = positives_within(q_pos, place_map.places.positions, s.radius_m)
    no_positive = int(sum(len(p) == 0 for p in positives))
    report: Dict = {
        "num_queries": nq, "num_database": len(place_map), "radius_m": s.radius_m,
        "queries_without_positive": no_positive,
        "model": place_map.manifest.get("model"),
        "index": place_map.manifest.get("index"),
        "recall": recall_at_n(preds[:, :k_single], positives),
    }
    final_preds, final_sims = preds, sims
    if rerank_k:
        report["recall_reranked"] = recall_at_n(preds_rr[:, :k_single], positives)
        report["rerank"] = {"k": rerank_k, "compute": loc.rerank_compute,
                            "model": (place_map.manifest.get("local_features") or {}).get("model")}
        final_preds, final_sims = preds_rr, sims_rr

    # Confidence gate.
    hits = correct_at_n(final_preds, positives)
    correct = hits[:, 0]
    feats = np.array([confidence_features(final_sims[i, :k_single],
                                          place_map.places.positions[final_preds[i, :k_single]],
                                          s.radius_m) for i in range(nq)]).reshape(nq, 2)
    s1, margin = feats[:, 0], feats[:, 1]
    calibration = fit_confidence(s1, margin, correct, s.radius_m)
    conf_cv = _cross_fitted_confidence(s1, margin, correct, s.radius_m)
    conf_default = confidence_from_features(s1, margin, dict(DEFAULT_CONFIDENCE))
    pr = precision_recall(conf_cv, correct)
    pr_default = precision_recall(conf_default, correct)
    pr_sim = precision_recall(s1, correct)
    report["confidence_calibration"] = calibration
    report["precision_recall"] = {
        "calibrated (cross-fitted)": _pr_json(pr),
        "default parameters": _pr_json(pr_default),
        "top-1 similarity": _pr_json(pr_sim),
    }
    report["recall_at_100_precision"] = pr["recall_at_100_precision"]
    report["pr_auc"] = pr["auc"]

    # Stream localizer over the queries in their order (driving order with a poses CSV).
    steps = np.linalg.norm(np.diff(np.asarray(q_pos)[:, :2], axis=0), axis=1)
    median_step = float(np.median(steps)) if len(steps) else 0.0
    from ..route import place_spacing

    spacing = place_spacing(place_map.places.positions)
    # A continuous drive moves a few place spacings per frame at most; a set of separate
    # places (e.g. GRIEF) does not (scored from ground truth, for the report only).
    jumps = float(np.mean(steps > 3 * spacing)) if len(steps) else 0.0
    prior_fits = bool(from_csv) and median_step <= 4 * spacing + 1e-6 and jumps <= 0.05
    stream_rep = None
    if stream_cfg is not None:
        from .stream_eval import run_stream, stream_report

        if from_csv:
            run = run_stream(place_map.places.positions, final_preds, final_sims,
                             map_descriptors=place_map.descriptors, query_descriptors=q_desc,
                             stamps_ns=stamps_ns, odometry=odometry,
                             rerank_scores=scores_rr, degenerate=degenerate, config=stream_cfg,
                             progress=progress)
        else:
            # Without a poses CSV the queries have no driving order (name order): there is no
            # stream to follow, so the stream's answers are the single-frame ones.
            run = {"answer": final_preds[:, 0].copy(), "raw": np.clip(conf_cv, 0, 1),
                   "fit": np.zeros(nq), "ms": np.zeros(nq), "config": stream_cfg,
                   "method": "single-frame (queries have no driving order)"}
        stream_rep = stream_report(run, final_preds[:, :k_single], positives, s.target_precision,
                                   motion_prior_fits=prior_fits,
                                   odometry_given=odometry is not None)
        stream_rep["queries_in_driving_order"] = bool(from_csv)
        stream_rep["median_query_step_m"] = median_step
        stream_rep["query_jumps_fraction"] = jumps
        stream_rep["map_spacing_m"] = spacing
        stream_rep["degenerate_frames"] = int(degenerate.sum())
        stream_rep["settings"] = {k: v for k, v in vars(stream_cfg).items()}
        stream_rep["settings"]["speeds"] = list(stream_cfg.speeds)
        report["stream"] = stream_rep

    # Single-image latency of the Localizer, stage by stage.
    timings: Dict[str, List[float]] = {}
    for p in q_paths[:max(0, s.latency_queries)]:
        r = loc.localize(load_image(p))
        for key, v in r.timings_ms.items():
            timings.setdefault(key, []).append(v)
    report["latency_ms"] = {key: _stats(v) for key, v in timings.items()}
    report["device"] = str(getattr(describer, "device", "cpu"))
    report["_arrays"] = {"preds": final_preds, "preds_global": preds, "hits": hits, "pr": pr,
                         "pr_default": pr_default, "pr_sim": pr_sim, "examples": s.examples,
                         "stream": stream_rep["_arrays"] if stream_rep else None,
                         "positions": np.asarray(q_pos), "reranked": bool(rerank_k),
                         "from_csv": bool(from_csv)}
    return report


def _pr_json(pr: dict) -> dict:
    return {"recall_at_100_precision": pr["recall_at_100_precision"], "auc": pr["auc"],
            "precision": [round(float(v), 5) for v in pr["precision"]],
            "recall": [round(float(v), 5) for v in pr["recall"]],
            "thresholds": [round(float(v), 6) for v in pr["thresholds"]]}


def public_report(report: dict) -> dict:
    """The report without private arrays (also inside nested objects such as ``stream``)."""
    def clean(v):
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items() if not str(k).startswith("_")}
        return v
    return clean(report)


def write_report(report: dict, out_dir, place_map, q_paths) -> None:
    """report.json + recall_at_n.png + pr_curve.png + examples.png (+ route_over_time.png and
    error_over_time.png when the queries are a drive), written atomically."""
    import json

    from .plots import plot_examples, plot_pr_curves, plot_recall_curves

    arrays = report["_arrays"]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        curves = {"global descriptor": report["recall"]}
        if "recall_reranked" in report:
            curves["re-ranked (SelaVPR MNN)"] = report["recall_reranked"]
        if "stream" in report:
            curves["stream localizer"] = report["stream"]["recall"]
        model = (report.get("model") or {}).get("card", "?")
        title = f"{Path(report['dataset']).name}: {model}, {report['num_queries']} queries"
        plot_recall_curves(curves, tmp / "recall_at_n.png", title=title)
        pr_curves = {"calibrated": arrays["pr"], "default": arrays["pr_default"],
                     "top-1 similarity": arrays["pr_sim"]}
        if arrays.get("stream") is not None:
            pr_curves["stream (calibrated, cross-fitted)"] = arrays["stream"]["pr"]
        plot_pr_curves(pr_curves, tmp / "pr_curve.png")
        if arrays.get("from_csv"):      # queries in driving order: answers along the route
            _plot_answers_along_route(report, arrays, place_map, tmp, title)
        nq = len(q_paths)
        count = min(arrays.get("examples", 6), nq)
        picks = np.unique(np.linspace(0, nq - 1, num=count).astype(int))
        names = place_map.places.names
        root = Path(report["dataset"]) / "images" / "test" / "database"
        match_paths, match_ok = [], []
        for q in picks:
            top = [int(i) for i in arrays["preds"][q, :3] if i >= 0]
            match_paths.append([_db_image(place_map, root, names[i]) for i in top])
            match_ok.append([bool(v) for v in arrays["hits"][q, :len(top)]])
        if all(all(p is not None for p in row) for row in match_paths):
            plot_examples([q_paths[q] for q in picks], match_paths, match_ok, tmp / "examples.png",
                          captions=[f"query {q}" for q in picks])
        (tmp / "report.json").write_text(json.dumps(public_report(report), indent=2) + "\n")
        usual_permissions(tmp)


def _plot_answers_along_route(report, arrays, place_map, tmp: Path, title: str) -> None:
    """route_over_time.png + error_over_time.png: each query's top-1 place, in query order
    (single-frame, re-ranked, stream)."""
    from .compare import (STREAM, MethodAnswers, SINGLE_FRAME, TWO_STAGE, compare_methods,
                          method_tracks)
    from .plots import plot_error_over_time, plot_route_over_time

    methods = [MethodAnswers(SINGLE_FRAME, arrays["preds_global"].tolist())]
    if arrays["reranked"]:
        methods.append(MethodAnswers(TWO_STAGE, arrays["preds"].tolist()))
    stream = arrays.get("stream")
    if stream is not None:
        methods.append(MethodAnswers(STREAM, [[int(a)] for a in stream["answer"]],
                                     confident=[bool(v) for v in stream["accepted"]]))
    db_xy = place_map.places.positions[:, :2]
    q_pos = arrays["positions"]
    rows = compare_methods(methods, q_pos, db_xy, report["radius_m"])
    tracks = method_tracks(rows, db_xy)
    t = np.arange(len(q_pos), dtype=np.float64)
    plot_route_over_time(t, q_pos, tracks, db_xy, tmp / "route_over_time.png", title,
                         xlabel="query (driving order)")
    plot_error_over_time(t, tracks, report["radius_m"], tmp / "error_over_time.png", title,
                         xlabel="query (driving order)")


def _db_image(place_map, root: Path, name: str):
    p = root / name
    return p if p.is_file() else None
