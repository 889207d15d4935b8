"""The stream localizer on real descriptors: the shipped demo model on the shipped Nordland
sample (never seen in training), replayed as synthetic drives with stops, crawling,
speed-ups, reversing, a kidnap and shuffled order; odometry input and its bad messages;
degenerate frames; calibration; cost independent of the map size."""

import numpy as np
import pytest

from vpr_ros.errors import ConfigError
from vpr_ros.datasets import read_split
from vpr_ros.evaluation.drives import make_drive, simulated_odometry
from vpr_ros.evaluation.metrics import positives_within
from vpr_ros.image_quality import assess_frame
from vpr_ros.preprocess import load_image
from vpr_ros.route import RouteGraph
from vpr_ros.stream import (StreamConfig, StreamLocalizer, calibrated_confidence,
                            fit_calibration, threshold_for_precision)

K = 50


@pytest.fixture(scope="module")
def sample(sample_dir):
    """Descriptors of the sample's database and queries (driving order), demo model."""
    from vpr_ros.inference import GlobalDescriber

    describer = GlobalDescriber(None, device="cpu", batch_size=32)
    db = read_split(sample_dir, "database")
    q = read_split(sample_dir, "queries")

    def describe(paths):
        return np.concatenate([describer.describe([load_image(p) for p in paths[i:i + 64]])
                               for i in range(0, len(paths), 64)]).astype(np.float32)

    return {"db": describe(db.paths), "db_pos": db.positions, "q": describe(q.paths),
            "q_pos": q.positions, "describer": describer}


def run(sample, order, odometry=None, config=None, stamps=None):
    """Stream over the queries in ``order``; (stream R@1, single-frame R@1, estimates)."""
    db, q = sample["db"], sample["q"][order]
    q_pos = sample["q_pos"][order]
    stream = StreamLocalizer(sample["db_pos"], descriptors=db, config=config)
    sims = q @ db.T
    top = np.argsort(-sims, axis=1)[:, :K]
    positives = positives_within(q_pos[:, :2], sample["db_pos"][:, :2], 25.0)
    ests = []
    for i in range(len(q)):
        stamp = int(i * 1e9) if stamps is None else int(stamps[i])
        if odometry is not None:
            stream.add_odometry(stamp, odometry[i])
        ests.append(stream.observe(top[i], sims[i, top[i]], descriptor=q[i], stamp_ns=stamp))
    ok = np.array([e.place_index in set(p.tolist()) for e, p in zip(ests, positives)])
    single = np.array([top[i, 0] in set(p.tolist()) for i, p in enumerate(positives)])
    return ok, single, ests, stream


def test_steady_drive_near_perfect_while_single_frames_are_not(sample):
    ok, single, ests, _ = run(sample, make_drive(200, "normal"))
    assert single.mean() < 0.5
    assert ok.mean() >= 0.95
    # confidence ranks right before wrong: at least half the frames before the first error
    raw = np.array([e.raw_confidence for e in ests])
    first_wrong = np.flatnonzero(~ok[np.argsort(-raw, kind="stable")])
    assert (first_wrong[0] if len(first_wrong) else len(ok)) >= 0.5 * len(ok)


@pytest.mark.parametrize("kind, floor", [("stops", 0.85), ("crawl", 0.8), ("speedup", 0.75),
                                         ("reverse", 0.75)])
def test_speed_changes_without_odometry(sample, kind, floor):
    ok, single, _, _ = run(sample, make_drive(200, kind, seed=3))
    assert ok.mean() >= floor, (kind, ok.mean(), single.mean())
    assert ok.mean() >= single.mean() + 0.25


def test_odometry_makes_speed_changes_harmless(sample):
    order = make_drive(200, "variable", seed=5)
    odometry = simulated_odometry(sample["q_pos"][order], relative_error=0.05)
    with_odo, single, ests, _ = run(sample, order, odometry=odometry)
    without, _, _, _ = run(sample, order)
    assert all(e.used_odometry for e in ests[1:])
    assert with_odo.mean() >= 0.85
    assert with_odo.mean() >= without.mean() + 0.1 and with_odo.mean() >= single.mean() + 0.3


def test_kidnap_is_recovered(sample):
    order = make_drive(200, "kidnap")
    ok, _, ests, _ = run(sample, order)
    jump = 200 // 3
    assert ok[:jump].mean() >= 0.9
    # lost for a few frames at most, then right again
    assert ok[jump + 15:].mean() >= 0.9
    # and not confidently wrong for long while it relocalizes
    assert sum(e.raw_confidence > 0.9 and not k for e, k in zip(ests[jump:], ok[jump:])) <= 5


def test_unordered_places_fall_back_to_single_frame(sample, grief_dir):
    """GRIEF: five separate places visited in turn over twelve sessions."""
    describer = sample["describer"]
    db, q = read_split(grief_dir, "database"), read_split(grief_dir, "queries")
    grief = {"db": describer.describe([load_image(p) for p in db.paths]), "db_pos": db.positions,
             "q": describer.describe([load_image(p) for p in q.paths]), "q_pos": q.positions}
    ok, single, ests, _ = run(grief, np.arange(len(q)))
    assert ok.mean() >= single.mean()
    assert np.median([e.prior_fit for e in ests]) < StreamConfig().fit_margin


def test_bad_odometry_is_rejected_and_counted(sample):
    stream = StreamLocalizer(sample["db_pos"], descriptors=sample["db"])
    assert stream.add_odometry(1_000_000_000, [0.0, 0.0, 0.0])
    assert not stream.add_odometry(2_000_000_000, [np.nan, 0.0, 0.0])
    assert "non-finite" in stream.last_odometry_rejection
    assert not stream.add_odometry(500_000_000, [1.0, 0.0, 0.0])      # stale: goes backwards
    assert "not after" in stream.last_odometry_rejection
    assert not stream.add_odometry(3_000_000_000, [5000.0, 0.0, 0.0])  # 5 km in 2 s
    assert "jumped" in stream.last_odometry_rejection
    assert stream.odometry_rejected == 3
    # a frame whose interval the odometry does not cover runs on images alone
    top = np.arange(K)
    e = stream.observe(top, np.linspace(0.9, 0.5, K), stamp_ns=3_000_000_000)
    e = stream.observe(top, np.linspace(0.9, 0.5, K), stamp_ns=60_000_000_000)
    assert not e.used_odometry


def test_degenerate_frames_are_never_confident(sample, sample_dir, tmp_path):
    from vpr_ros.localizer import Localizer
    from vpr_ros.maps import PlaceMap, benchmark_source, build_map, set_stream_calibration

    describer = sample["describer"]
    build_map(benchmark_source(sample_dir, "database"), tmp_path / "m", describer,
              progress=False)
    # a permissive calibration: any frame with a little belief would be confident
    set_stream_calibration(tmp_path / "m", {"model": "logistic", "bias": 0.0, "w_mass": 1.0,
                                            "w_fit": 0.0, "threshold": 0.01})
    pm = PlaceMap.open_for(tmp_path / "m", describer)
    loc = Localizer(pm, describer, confidence_threshold=0.0,
                    stream=StreamLocalizer.for_map(pm))
    rng = np.random.default_rng(0)
    good = load_image(read_split(sample_dir, "queries").paths[0])
    from PIL import Image, ImageFilter

    big = np.asarray(Image.fromarray(good).resize((640, 320)))
    blurred = np.asarray(Image.fromarray(big).filter(ImageFilter.GaussianBlur(12)))
    frames = {"tiny": np.zeros((1, 1, 3), np.uint8),
              "dark": np.zeros((480, 640, 3), np.uint8),
              "lens cap": rng.normal(3, 2, (480, 640, 3)).clip(0, 255).astype(np.uint8),
              "uniform": np.full((480, 640, 3), 128, np.uint8),
              "blurred": blurred}
    for name, frame in frames.items():
        r = loc.localize(frame, stamp_ns=None)
        assert r.quality.degenerate, name
        assert not r.confident and r.confidence == 0.0, name
        assert r.stream.degenerate and not r.stream.confident, name
        d = r.to_dict()
        assert d["degenerate"] and d["degenerate_reason"] in ("tiny", "dark", "uniform",
                                                              "blurred"), name
    # real frames of the dev sets are never flagged
    for p in list(read_split(sample_dir, "queries").paths[:50]) + [sample_dir / "README.md"][:0]:
        assert not assess_frame(load_image(p)).degenerate


def test_calibration_threshold_reaches_the_target_precision():
    rng = np.random.default_rng(0)
    raw = rng.random(400)
    correct = rng.random(400) < raw ** 0.5
    fits = np.full(400, 5.0)                  # the stream prior fits on every frame
    params = fit_calibration(raw, fits, correct, target_precision=0.95)
    conf = calibrated_confidence(raw, fits, params)
    accepted = conf >= params["threshold"]
    assert params["fitted"] and accepted.any()
    assert correct[accepted].mean() >= 0.95
    # confidence is monotone in the raw mass
    order = np.argsort(raw)
    assert np.all(np.diff(conf[order]) >= -1e-12)
    assert threshold_for_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]),
                                   0.99) == pytest.approx(0.9)
    # nothing reaches the target: the threshold is above every confidence
    assert threshold_for_precision(np.array([0.9]), np.array([False]), 0.99) > 0.9
    # where the stream prior does not fit, the frame's own answer is never trusted
    assert calibrated_confidence(np.array([0.999]), np.array([0.5]), params)[0] == 0.0
    unfit = fit_calibration(raw, np.zeros(400), correct, target_precision=0.95)
    assert unfit["threshold"] > 0.0


def test_reset_forgets_and_localizes_globally_again(sample):
    ok, _, ests, stream = run(sample, make_drive(60, "normal"))
    assert stream.localized or ests[-1].raw_confidence > 0.5
    stream.reset()
    assert not stream.localized and ests[-1].hypotheses > 0
    e = stream.observe(np.arange(K), np.linspace(0.9, 0.5, K))
    assert e.prior_fit == 0.0


def test_route_graph_bridges_gaps_and_cuts_breaks():
    pos = np.zeros((8, 3))
    pos[:, 1] = [0, 20, 40, 100, 120, 140, 5000, 5020]    # a 60 m gap, then a separate drive
    g = RouteGraph.from_positions(pos)
    assert g.directed and g.spacing_m == pytest.approx(20.0)
    u = g.coordinate
    assert u[3] - u[2] == pytest.approx(20.0)             # the gap counts as one spacing
    assert u[6] - u[5] > 1e6                               # no motion between drives
    src, dst, off = g.along_route(np.array([2]), np.array([1], np.int8),
                                  np.array([10.0]), np.array([30.0]))
    assert dst.tolist() == [3] and off.tolist() == [20.0]
    shuffled = RouteGraph.from_positions(pos[[0, 6, 2, 7, 4]])
    assert not shuffled.directed


def test_cost_does_not_grow_with_the_map():
    """Hypotheses are capped and new ones come only from the candidates (no timing)."""
    n = 200_000
    pos = np.zeros((n, 3))
    pos[:, 0] = np.arange(n) * 2.0
    cfg = StreamConfig(max_hypotheses=300)
    stream = StreamLocalizer(pos, config=cfg)
    rng = np.random.default_rng(0)
    for t in range(30):
        cands = np.r_[1000 + t, rng.integers(0, n, K - 1)]
        sims = np.r_[0.9, rng.uniform(0.2, 0.5, K - 1)]
        e = stream.observe(cands, sims)
        assert e.hypotheses <= 300
    assert abs(e.place_index - (1000 + 29)) <= 2


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="kidnap_prob"):
        StreamConfig(kidnap_prob=0.0).validate()
    with pytest.raises(ConfigError, match="speeds"):
        StreamConfig(speeds=(1.0, 0.5)).validate()
    with pytest.raises(ConfigError, match="candidates"):
        StreamLocalizer(np.zeros((3, 3)), config=StreamConfig(candidates=0))


def test_leaving_the_mapped_route_and_coming_back(sample, nordland_dir):
    """60 frames on the route, 40 frames of a stretch the map does not hold (earlier Nordland
    places), then back on the route further on: recovered, and rarely sure while away."""
    describer = sample["describer"]
    away = read_split(nordland_dir, "queries")
    away_desc = describer.describe([load_image(p) for p in away.paths[200:240]])
    q = np.concatenate([sample["q"][:60], away_desc, sample["q"][120:200]])
    q_pos = np.concatenate([sample["q_pos"][:60], away.positions[200:240],
                            sample["q_pos"][120:200]])
    data = {"db": sample["db"], "db_pos": sample["db_pos"], "q": q, "q_pos": q_pos}
    ok, single, ests, _ = run(data, np.arange(len(q)))
    assert ok[:60].mean() >= 0.95
    assert ok[100 + 8:].mean() >= 0.95          # back on the route within a few frames
    assert sum(e.raw_confidence > 0.99 for e in ests[60:100]) <= 2   # never sure while away


def test_reranking_scores_are_evidence():
    """Equal global similarities, re-ranking prefers one place: the stream follows it."""
    pos = np.zeros((40, 3))
    pos[:, 0] = np.arange(40) * 20.0
    cands = np.array([5, 30, 12, 20])
    sims = np.array([0.8, 0.8, 0.5, 0.5])
    plain = StreamLocalizer(pos).observe(cands, sims)
    reranked = StreamLocalizer(pos).observe(cands, sims,
                                            rerank_scores=np.array([0.1, 0.9, 0.1, 0.1]))
    assert plain.place_index == 5 and reranked.place_index == 30
