"""Localizer on real Nordland images with the real tiny models, real FAISS maps."""

import json

import numpy as np
import pytest

from vpr_ros.errors import ConfigError, ImageError, MapError, MapMismatchError
from vpr_ros.evaluation.metrics import positives_within, recall_at_n
from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
from vpr_ros.localizer import (Localizer, confidence_features, confidence_from_features,
                               fit_confidence)
from vpr_ros.maps import PlaceMap, build_map
from vpr_ros.temporal import PlaceBeliefFilter

CARD = "scicevpr_tiny_random"
N = 20


@pytest.fixture(scope="module")
def db(sample_database):
    return sample_database[:N]


@pytest.fixture(scope="module")
def queries(sample_queries):
    return sample_queries[:N]


@pytest.fixture(scope="module")
def place_map(tmp_path_factory, db, describer):
    out = tmp_path_factory.mktemp("loc") / "map"
    build_map(db, out, describer, progress=False)
    return PlaceMap.open_for(out, describer)


def test_database_images_find_themselves(place_map, describer, db):
    loc = Localizer(place_map, describer, top_k=5)
    for i in (0, 7, N - 1):
        r = loc.localize(db[i].load(), stamp_ns=123)
        assert r.place_index == i and r.place_id == i and r.image_name == db[i].name
        np.testing.assert_allclose(r.position, db[i].position)
        np.testing.assert_allclose(r.orientation, [0, 0, 0, 1])
        assert r.similarity == pytest.approx(1.0, abs=1e-4)
        assert len(r.candidates) == 5 and r.candidates[0].place_index == i
        assert [c.similarity for c in r.candidates] == sorted(
            (c.similarity for c in r.candidates), reverse=True)
        assert 0.0 <= r.confidence <= 1.0 and r.confident == (r.confidence >= 0.5)
        assert {"preprocess", "describe", "search", "total"} <= set(r.timings_ms)
        assert r.timings_ms["total"] >= r.timings_ms["describe"]
        d = json.loads(json.dumps(r.to_dict()))
        assert d["place_id"] == i and d["stamp_ns"] == 123 and len(d["candidates"]) == 5


def test_queries_match_a_hand_computed_search_and_recall(place_map, describer, db, queries):
    q_desc = describer.describe([q.load() for q in queries])
    db_desc = describer.describe([e.load() for e in db])
    sims = q_desc @ db_desc.T                         # exact inner products by hand
    hand_rank = np.argsort(-sims, axis=1, kind="stable")
    loc = Localizer(place_map, describer, top_k=N)
    preds = np.array([[c.place_index for c in loc.localize(q.load()).candidates]
                      for q in queries])
    np.testing.assert_array_equal(preds[:, 0], hand_rank[:, 0])
    # Nordland mini: places 20 m apart, query i is at place i; within 25 m = |i - j| <= 1.
    for n in (1, 5, 10):
        hand = np.mean([np.any(np.abs(hand_rank[i, :n] - i) <= 1) for i in range(N)])
        positives = positives_within([q.position for q in queries], [e.position for e in db])
        assert recall_at_n(preds, positives, ns=(n,))[str(n)] == pytest.approx(hand)


def test_confidence_threshold_and_features(place_map, describer, db):
    img = db[3].load()
    always = Localizer(place_map, describer, confidence_threshold=0.0).localize(img)
    never = Localizer(place_map, describer, confidence_threshold=1.0).localize(img)
    assert always.confident and (not never.confident or never.confidence == 1.0)
    pos = np.array([[0, 0, 0], [0, 10, 0], [0, 100, 0], [0, 200, 0]], float)
    s1, margin = confidence_features(np.array([0.9, 0.85, 0.6, 0.5]), pos, 25.0)
    assert (s1, margin) == pytest.approx((0.9, 0.3))        # rival = first place > 25 m away
    s1, margin = confidence_features(np.array([0.9, 0.8]), pos[:2], 25.0)
    assert margin == pytest.approx(0.1)                     # no far rival: last candidate


def test_confidence_parameters_stored_in_the_map_are_used(place_map, describer, db, tmp_path):
    import shutil

    from vpr_ros.maps import set_confidence_params

    copy = tmp_path / "calibrated"
    shutil.copytree(place_map.path, copy)
    params = {"model": "logistic", "bias": 30.0, "w_similarity": 0.0, "w_margin": 0.0,
              "radius_m": 25.0, "fitted": True}
    set_confidence_params(copy, params)
    pm = PlaceMap.open_for(copy, describer)                # checksums still valid
    r = Localizer(pm, describer).localize(db[1].load())
    assert r.confidence == pytest.approx(1.0) and r.confident


def test_fitted_confidence_grows_with_the_margin():
    rng = np.random.default_rng(0)
    margin = rng.uniform(0, 0.3, 200)
    s1 = rng.uniform(0.5, 0.9, 200)
    correct = margin + rng.normal(0, 0.03, 200) > 0.1
    params = fit_confidence(s1, margin, correct)
    assert params["fitted"] and params["w_margin"] > 0
    low, high = confidence_from_features(0.7, np.array([0.02, 0.25]), params)
    assert low < 0.3 < 0.7 < high


def test_bad_input_and_mismatched_model_are_refused(place_map, describer):
    loc = Localizer(place_map, describer)
    with pytest.raises(ImageError):
        loc.localize(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ImageError, match="dtype"):
        loc.localize(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(MapMismatchError):
        Localizer(place_map, GlobalDescriber("selavpr_tiny_random", device="cpu"))
    with pytest.raises(ConfigError):
        Localizer(place_map, describer, rerank_k=5)
    with pytest.raises(MapError, match="no local features"):
        Localizer(place_map, describer, LocalFeatureExtractor(device="cpu"), rerank_k=3)


@pytest.fixture(scope="module")
def local():
    return LocalFeatureExtractor("selavpr_tiny_random", device="cpu")


@pytest.fixture(scope="module")
def rerank_map(tmp_path_factory, describer, local, db):
    out = tmp_path_factory.mktemp("rr") / "map"
    build_map(db[:8], out, describer, local_extractor=local, progress=False)
    return out


def test_selavpr_reranking_keeps_exact_self_match_first(rerank_map, describer, local, db):
    pm = PlaceMap.open_for(rerank_map, describer, local_extractor=local)
    assert pm.local_features.shape == (8, 61, 61, 16) and pm.local_features.dtype == np.float16
    loc = Localizer(pm, describer, local_extractor=local, top_k=4, rerank_k=3)
    for i in (2, 5):
        r = loc.localize(db[i].load())
        assert r.reranked and r.place_index == i
        assert "rerank" in r.timings_ms
        # the query's local features travel with the result (debug view reuses them)
        assert r.query_local is not None and r.query_local.shape == (61, 61, 16)
        assert "query_local" not in r.to_dict()
        scores = [c.rerank_score for c in r.candidates[:3]]
        assert all(s is not None for s in scores) and scores[0] == max(scores)
        assert r.candidates[3].rerank_score is None          # beyond rerank_k


def test_warm_up_runs_every_stage_and_leaves_the_beliefs_alone(
        rerank_map, describer, local, db):
    """Localizer.warm_up (the node runs it at configure): the once-per-process costs (the
    BLAS check of the re-ranking kernels for the map's shape) are paid, and a warmed-up
    localizer answers a frame sequence exactly as a cold one: no belief was touched."""
    from vpr_ros.accel.int8_kernels import native_kernels
    from vpr_ros.models import rerank as R
    from vpr_ros.stream import StreamConfig, StreamLocalizer

    pm = PlaceMap.open_for(rerank_map, describer, local_extractor=local)

    def make():
        return Localizer(pm, describer, local_extractor=local, top_k=4, rerank_k=3,
                         stream=StreamLocalizer.for_map(pm, StreamConfig()))

    R._FMA_CHECK.clear()
    warm, cold = make(), make()
    assert warm.warm_up() > 0
    if native_kernels() is not None:
        assert R._FMA_CHECK, "the re-ranking kernels' BLAS check ran in the warm-up"
    for i in (1, 2, 3, 5):
        a, b = warm.localize(db[i].load(), stamp_ns=i), cold.localize(db[i].load(), stamp_ns=i)
        assert a.place_index == b.place_index and a.confidence == b.confidence
        a.stream.timings_ms = b.stream.timings_ms = {}
        assert a.stream == b.stream


def test_temporal_filter_in_the_localizer(place_map, describer, queries):
    filt = PlaceBeliefFilter(place_map.places.positions, sigma_m=30.0)
    loc = Localizer(place_map, describer, top_k=10, temporal_filter=filt)
    for q in queries[:5]:
        r = loc.localize(q.load())
        assert r.temporal and 0 <= r.place_index < N and "temporal" in r.timings_ms
        assert r.raw_place_index is not None and 0.0 <= r.confidence <= 1.0
    assert filt.belief is not None and filt.belief.sum() == pytest.approx(1.0)


def test_cli_localize_json(place_map, db, capsys):
    from vpr_ros.cli.main import main

    rc = main(["localize", "--map", str(place_map.path), str(db[4].path), str(db[9].path),
               "--device", "cpu", "--json", "--top-k", "3"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["place_id"] for r in out["results"]] == [4, 9]
    assert len(out["results"][0]["candidates"]) == 3
    rc = main(["localize", "--map", str(place_map.path), str(db[4].path), "--device", "cpu"])
    assert rc == 0 and "place 4" in capsys.readouterr().out
    rc = main(["localize", "--map", str(place_map.path), str(db[4].path), "--device", "cpu",
               "--model", "selavpr_tiny_random"])
    assert rc == 2


def test_cli_localize_reranks_with_the_maps_own_card(rerank_map, db, capsys):
    from vpr_ros.cli.main import main

    assert main(["localize", "--map", str(rerank_map), str(db[6].path), "--device", "cpu",
                 "--rerank-k", "3", "--top-k", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert r["reranked"] and r["place_id"] == 6 and "rerank_score" in r["candidates"][0]
    assert main(["localize", "--map", str(rerank_map), str(db[6].path), "--device", "cpu",
                 "--rerank-k", "0", "--json"]) == 0
    assert not json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0][
        "reranked"]
