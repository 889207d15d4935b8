"""SelaVPR (with and without registers) and the re-ranking scorer reproduce the official outputs."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch

from vpr_ros.models.cards import card_from_reference_config
from vpr_ros.models.checkpoint import load_weights
from vpr_ros.models.factory import build_model
from vpr_ros.models.rerank import (mutual_nn_counts, official_scores, rerank_order,
                                   train_similarity)

DESC_ATOL = 1e-4
LOCAL_ATOL = 5e-5
POS_ATOL = 5e-5
COUNT_SLACK = 5  # own features vs stored ones: near-ties may flip a few matches

VARIANTS = ["selavpr_tiny", "selavpr_reg4_tiny"]


@pytest.fixture(scope="module")
def images(reference):
    return torch.from_numpy(np.load(reference / "inputs" / "preprocessed_224.npz")["images"])


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request, reference, images):
    stem = request.param
    config = json.loads((reference / f"{stem}.config.json").read_text())
    card = card_from_reference_config(config, stem)
    assert card.architecture == "selavpr"
    model = build_model(card, seed=0)
    assert load_weights(model, card, reference / config["checkpoint"]) == "selavpr_official"
    model.eval()
    with torch.no_grad():
        glob, local = model(images)
        patch = model.backbone.forward_features(images[:1])["x_norm_patchtokens"][0]
        pos = model.backbone.position_embedding((16, 16))[0]
    out = np.load(reference / config["expected_outputs"])
    return dict(card=card, model=model, out=out, glob=glob.numpy(), local=local.numpy(),
                patch=patch.numpy(), pos=pos.numpy())


def test_global_local_and_tokens(variant):
    out = variant["out"]
    np.testing.assert_allclose(variant["glob"], out["global_desc"], atol=DESC_ATOL, rtol=0)
    assert variant["local"].shape == out["local_feats"].shape
    assert variant["local"].shape[1:] == variant["card"].local_shape
    np.testing.assert_allclose(variant["local"], out["local_feats"], atol=LOCAL_ATOL, rtol=0)
    scale = max(1.0, float(np.abs(out["img0_patch_tokens"]).max()))
    assert np.abs(variant["patch"] - out["img0_patch_tokens"]).max() <= 1e-5 * scale
    np.testing.assert_allclose(variant["pos"], out["pos_embed_224"], atol=POS_ATOL, rtol=0)
    np.testing.assert_array_equal(variant["model"].gem.p.detach().numpy(), out["gem_p"])


def test_batch_one_equals_batch_five(variant, images):
    model = variant["model"]
    with torch.no_grad():
        g, loc = model(images[2:3])
    assert np.abs(g.numpy()[0] - variant["glob"][2]).max() < 1e-6
    assert np.abs(loc.numpy()[0] - variant["local"][2]).max() < 1e-5


def test_scorer_exact_on_stored_features(variant):
    out = variant["out"]
    stored = out["local_feats"]
    counts = np.stack([mutual_nn_counts(stored[i], stored).numpy() for i in range(len(stored))])
    np.testing.assert_array_equal(counts, out["mutual_nn_counts"])
    for q in range(len(stored)):
        db = out["database_indices"][q]
        first = out["faiss_predictions"][q]
        scores = official_scores(torch.from_numpy(counts[q, db[first]]))
        np.testing.assert_array_equal(scores.numpy(), out["candidate_scores"][q])
        np.testing.assert_array_equal(first[rerank_order(scores)], out["reranked_predictions"][q])
    synthetic = official_scores(mutual_nn_counts(out["synthetic_query"],
                                                 out["synthetic_candidates"]))
    np.testing.assert_array_equal(synthetic.numpy(), out["synthetic_scores"])


def test_train_similarity_on_stored_features(variant):
    out = variant["out"]
    stored = torch.from_numpy(out["local_feats"])
    n = stored.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)] + [(0, 0)]
    a = torch.tensor([i for i, _ in pairs])
    b = torch.tensor([j for _, j in pairs])
    sims = train_similarity(stored[a], stored[b]).numpy()
    expected = out["train_similarity"]
    # Mutual matching is symmetric, so the official matrix is too; check both halves.
    np.testing.assert_allclose(sims, expected[a.numpy(), b.numpy()], atol=1e-5, rtol=0)
    np.testing.assert_allclose(sims, expected[b.numpy(), a.numpy()], atol=1e-5, rtol=0)


def test_full_retrieval_from_own_features(variant):
    """First stage with real FAISS on our global descriptors, then re-ranking with our local
    features."""
    out = variant["out"]
    glob, local = variant["glob"], variant["local"]
    n = len(glob)
    own = np.zeros((n, n), dtype=np.int64)
    for i in range(n):  # counts are symmetric: compute the upper triangle only
        own[i, i + 1:] = mutual_nn_counts(local[i], local[i + 1:]).numpy()
    own = own + own.T
    assert np.abs(own - out["mutual_nn_counts"])[~np.eye(n, dtype=bool)].max() <= COUNT_SLACK
    for q in range(n):
        db = out["database_indices"][q]
        index = faiss.IndexFlatL2(glob.shape[1])
        index.add(np.ascontiguousarray(glob[db]))
        dist, pred = index.search(glob[q:q + 1], len(db))
        np.testing.assert_array_equal(pred[0], out["faiss_predictions"][q])
        np.testing.assert_allclose(dist[0], out["faiss_l2_distances"][q], atol=1e-4, rtol=0)
        scores = official_scores(torch.from_numpy(own[q, db[pred[0]]])).numpy()
        assert np.abs(scores - out["candidate_scores"][q]).max() <= COUNT_SLACK
        np.testing.assert_array_equal(pred[0][rerank_order(scores)], out["reranked_predictions"][q])
