"""The shipped demo re-ranker (models/demo_tiny_selavpr): loads, matches its map, and
re-ranks the held-out sample exactly as the evaluation reported in its card did."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vpr_ros.cli.main import main
from vpr_ros.errors import MapMismatchError
from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
from vpr_ros.maps import PlaceMap, benchmark_source, build_map
from vpr_ros.models.cards import DEMO_RERANK_CARD_NAME, default_rerank_card_name, load_card

# `vpr eval recall --dataset samples/nordland_mini --model demo_tiny --rerank --rerank-k 20`
# as reported in models/demo_tiny_selavpr.yaml, README.md and docs/evaluation.md.
REPORTED_GLOBAL = {"1": 0.36, "5": 0.68, "10": 0.83}
REPORTED_RERANKED_K20 = {"1": 0.435, "5": 0.77, "10": 0.86}


@pytest.fixture(scope="module")
def demo_map(tmp_path_factory, sample_dir):
    describer = GlobalDescriber("demo_tiny", device="cpu")
    local = LocalFeatureExtractor(DEMO_RERANK_CARD_NAME, device="cpu")
    out = tmp_path_factory.mktemp("demo_rerank") / "map"
    build_map(benchmark_source(sample_dir, "database"), out, describer, local_extractor=local,
              index="Flat", progress=False)
    return out, describer, local


def test_shipped_reranker_is_the_default_and_loads_its_trained_weights():
    card = load_card(DEMO_RERANK_CARD_NAME)
    assert card.architecture == "selavpr" and card.has_weights
    assert card.weights_path.stat().st_size < 5 * 2**20          # a few MB at most
    assert default_rerank_card_name() == DEMO_RERANK_CARD_NAME
    local = LocalFeatureExtractor(DEMO_RERANK_CARD_NAME, device="cpu")
    assert local.fingerprint.startswith("sha256:")                # the file, not a random init
    assert local.local_shape == (16, 16, 32)                    # the 16x16 token grid


def test_map_records_the_reranker_and_refuses_another(demo_map):
    out, describer, local = demo_map
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["local_features"]["model"]["card"] == DEMO_RERANK_CARD_NAME
    PlaceMap.open_for(out, describer, local_extractor=local, verify="size")
    with pytest.raises(MapMismatchError, match="local features come from card"):
        PlaceMap.open_for(out, describer, verify="size",
                          local_extractor=LocalFeatureExtractor("selavpr_tiny_random",
                                                                device="cpu"))


def test_rerank_without_a_model_uses_the_maps_reranker_and_matches_the_report(
        demo_map, sample_dir, capsys):
    out, _, _ = demo_map
    assert main(["eval", "recall", "--dataset", str(sample_dir), "--map", str(out),
                 "--rerank", "--rerank-k", "20", "--device", "cpu", "--no-temporal",
                 "--latency-queries", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["num_queries"] == 200
    for n in ("1", "5", "10"):
        assert res["recall"][n] == pytest.approx(REPORTED_GLOBAL[n], abs=1e-9)
        assert res["recall_reranked"][n] == pytest.approx(REPORTED_RERANKED_K20[n], abs=1e-9)
    # re-ranking only reorders the first 20 candidates
    assert res["recall_reranked"]["20"] == res["recall"]["20"]
    # the map's re-ranker refuses a different one given explicitly
    assert main(["eval", "recall", "--dataset", str(sample_dir), "--map", str(out),
                 "--rerank-model", "selavpr_tiny_random", "--device", "cpu",
                 "--latency-queries", "0"]) == 2
    assert "local features come from card" in capsys.readouterr().err


@pytest.mark.parametrize("query, first_stage_top1, reranked_top1, count", [
    (2, 101, 2, 120.0),   # re-ranking replaces the wrong place 101 by the correct place 2
    (21, 21, 21, 138.0),  # ... and keeps the correct place 21 (next best count 99)
])
def test_held_out_queries_are_reranked_as_in_the_eval(demo_map, sample_dir, query,
                                                      first_stage_top1, reranked_top1, count):
    """Held-out queries through the Localizer (the node's code path): the first stage's
    candidates, reordered by mutual-nearest-neighbour counts, as the reported eval did."""
    from vpr_ros.localizer import Localizer

    out, describer, local = demo_map
    place_map = PlaceMap.open_for(out, describer, local_extractor=local, verify="size")
    q = benchmark_source(sample_dir, "queries")[query]
    r = Localizer(place_map, describer, local, top_k=20, rerank_k=20).localize(q.load())
    assert r.reranked and len(r.candidates) == 20
    ids = [c.place_id for c in r.candidates]
    sims = np.array([c.similarity for c in r.candidates])
    assert ids[int(np.argmax(sims))] == first_stage_top1
    assert ids[0] == reranked_top1 and r.candidates[0].rerank_score == count
    counts = [c.rerank_score for c in r.candidates]
    assert counts == sorted(counts, reverse=True)
    assert counts[0] - counts[1] >= 10           # a clear winner, not a tie broken by order


def test_default_reranker_falls_back_without_its_weights(tmp_path, monkeypatch, repo_root):
    import shutil

    for f in (repo_root / "models").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)                  # cards only, no weights files
    monkeypatch.setenv("VPR_MODELS_DIR", str(tmp_path))
    assert default_rerank_card_name() == "selavpr_tiny_random"
