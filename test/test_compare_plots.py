"""Side-by-side method scoring (evaluation/compare.py) and the route/error/trajectory plots."""

from __future__ import annotations

import numpy as np

from vpr_ros.evaluation.compare import (SINGLE_FRAME, TWO_STAGE, MethodAnswers,
                                        answers_from_frames, compare_methods, format_table,
                                        method_tracks)
from vpr_ros.evaluation.plots import (along_route, plot_error_over_time, plot_route_over_time,
                                      plot_trajectory, route_coordinates)

PNG = b"\x89PNG\r\n\x1a\n"


def _record(place_indices, sims, reranked=True, confident=True):
    """A per-frame record as bag_eval builds it from the node's published match."""
    return {"index": 0, "stamp_ns": 0, "place_indices": list(place_indices),
            "scores": list(sims), "reranked": reranked, "confident": confident,
            "latency_ms": 50.0,
            "timings_ms": {"describe": 10.0, "search": 1.0, "rerank_extract": 5.0,
                           "rerank": 30.0, "total": 50.0}}


def test_single_frame_answer_is_the_global_order_of_the_published_candidates():
    # The node published the re-ranked order 7, 3, 9 with global similarities 0.5, 0.9, 0.7:
    # without re-ranking FAISS would have answered 3, 9, 7.
    rec = _record([7, 3, 9], [0.5, 0.9, 0.7])
    single, two = answers_from_frames([rec])
    assert single.name == SINGLE_FRAME and single.ranked == [[3, 9, 7]]
    assert two.name == TWO_STAGE and two.ranked == [[7, 3, 9]]
    # first-stage latency = the node's total without the re-ranking stages
    assert single.latency_ms == [15.0] and two.latency_ms == [50.0]
    # without re-ranking in the records there is no two-stage row
    assert [m.name for m in answers_from_frames([_record([3, 9], [0.9, 0.7], reranked=False)])] \
        == [SINGLE_FRAME]


def test_compare_methods_scores_every_method_on_the_same_frames():
    db = np.c_[np.zeros(10), np.arange(10) * 20.0]           # places every 20 m
    gt = db[[2, 5, 8]] + [0.0, 1.0]
    methods = [MethodAnswers("a", [[2, 0, 1, 3, 4], [9, 0, 1, 5, 4], [8, 1, 0, 3, 4]],
                             [1.0, 2.0, 3.0]),
               MethodAnswers("b", [[2], [5], [0]], [5.0, 5.0, 5.0], [True, True, False])]
    rows = compare_methods(methods, gt, db, radius_m=5.0)
    assert [r["method"] for r in rows] == ["a", "b"]
    assert rows[0]["recall"]["1"] == 2 / 3 and rows[0]["recall"]["5"] == 1.0
    assert rows[1]["recall"] == {"1": 2 / 3}       # one answer per frame: no R@5 / R@10
    assert rows[0]["error_m"]["max"] == 180.0 - 101.0     # frame 2 answered place 9
    assert rows[1]["confident_frames"] == 2
    table = format_table(rows).splitlines()
    assert table[0].split()[:4] == ["method", "R@1", "R@5", "R@10"] and len(table) == 4
    assert table[2].split()[1:4] == ["66.7", "100.0", "-"]
    assert table[3].split()[1:4] == ["66.7", "-", "-"]
    tracks = method_tracks(rows, db)
    assert tracks[1]["correct"].tolist() == [True, True, False]


def test_route_coordinates_follow_the_map_order():
    route = np.array([[0, 0], [3, 4], [3, 14]], dtype=float)
    assert route_coordinates(route).tolist() == [0.0, 5.0, 15.0]
    assert along_route(np.array([[3.0, 13.0], [np.nan, np.nan]]), route,
                       route_coordinates(route))[0] == 15.0


def test_plots_of_a_straight_route(tmp_path):
    db = np.c_[np.zeros(300), np.arange(300) * 20.0]         # 6 km straight north (Nordland)
    gt = db[50:150] + [0.0, 2.0]
    rng = np.random.default_rng(0)
    wrong = rng.random(100) < 0.3
    single = np.arange(50, 150)
    single[wrong] = rng.integers(0, 300, wrong.sum())
    rows = compare_methods([MethodAnswers(SINGLE_FRAME, single[:, None].tolist()),
                            MethodAnswers(TWO_STAGE, np.arange(50, 150)[:, None].tolist())],
                           gt, db, radius_m=25.0)
    tracks = method_tracks(rows, db)
    t = np.arange(100) * 0.25

    err = plot_error_over_time(t, tracks, 25.0, tmp_path / "err.png")
    assert err["ylim"][0] == 0.0                      # no negative error axis
    assert err["ylim"][1] <= 10 * 25.0 * 1.05         # a 5 km mistake does not set the scale
    assert err["off_scale"][SINGLE_FRAME] == int(np.sum(rows[0]["_err"] > 250.0)) > 0

    view = plot_trajectory(gt, tracks, db, tmp_path / "traj.png", radius_m=25.0)
    assert view["route_aligned"]                      # the 2 km line runs across the figure
    assert view["xlim"][1] - view["xlim"][0] < 2500   # zoomed on the drive, not the 6 km map

    gt_s = plot_route_over_time(t, gt, tracks, db, tmp_path / "route.png")
    assert np.allclose(gt_s, np.arange(50, 150) * 20.0)
    for name in ("err.png", "traj.png", "route.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
