"""SciceVPR student and Super-CricaVPR teacher reproduce the official reference outputs.

Models are built from the fixture's own ``*_tiny.config.json`` and loaded from its
official-format ``.pth`` files (DataParallel prefix, numpy-1.x metadata, cuda:0
storages); inputs are the stored preprocessed tensors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vpr_ros.models.cards import card_from_reference_config
from vpr_ros.models.checkpoint import load_weights
from vpr_ros.models.factory import build_model

DESC_ATOL = 1e-4
INTERMEDIATE_RTOL = 1e-5
POS_ATOL = 5e-5


def _load(reference, stem):
    config = json.loads((reference / f"{stem}.config.json").read_text())
    card = card_from_reference_config(config, stem)
    model = build_model(card, seed=0)
    kind = load_weights(model, card, reference / config["checkpoint"])
    assert kind == "scicevpr_official"
    model.eval()
    return card, model, np.load(reference / config["expected_outputs"])


def _close_rel(ours: np.ndarray, expected: np.ndarray, rtol=INTERMEDIATE_RTOL):
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(ours - expected).max())
    assert diff <= rtol * scale, f"max abs diff {diff} (scale {scale})"


@pytest.fixture(scope="module")
def images(reference):
    return torch.from_numpy(np.load(reference / "inputs" / "preprocessed_224.npz")["images"])


@pytest.fixture(scope="module")
def student(reference):
    return _load(reference, "scicevpr_student_tiny")


@pytest.fixture(scope="module")
def teacher(reference):
    return _load(reference, "super_cricavpr_teacher_tiny")


def test_student_descriptors(student, images):
    card, model, out = student
    with torch.no_grad():
        batch = model(images).numpy()
        single = torch.cat([model(images[i:i + 1]) for i in range(len(images))]).numpy()
    assert batch.shape == out["desc_batch"].shape == (len(images), card.descriptor_dim)
    np.testing.assert_allclose(batch, out["desc_batch"], atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(single, out["desc_single"], atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_student_intermediates(student, images):
    _, model, out = student
    with torch.no_grad():
        one = model.forward_intermediates(images[:1])
        allb = model.forward_intermediates(images)
    for name in ("backbone_features", "fused", "tokenmixed"):
        _close_rel(one[name][0].numpy(), out[f"img0_{name}"])
    np.testing.assert_allclose(allb["regions"].numpy(), out["regions"], atol=DESC_ATOL, rtol=0)
    _close_rel(allb["encoder_out"].numpy(), out["encoder_out"])
    np.testing.assert_allclose(model.gem.p.detach().numpy(), out["gem_p"], rtol=0, atol=0)


def test_position_embedding_resampling(student):
    _, model, out = student
    model.eval()
    with torch.no_grad():
        pe = model.backbone.position_embedding((16, 16))[0].numpy()
    np.testing.assert_allclose(pe, out["pos_embed_224"], atol=POS_ATOL, rtol=0)
    # A plain resize to size=16 would be far off (the offset matters).
    table = model.backbone.pos_embed.detach()
    g = model.backbone.pos_embed_grid
    plain = torch.nn.functional.interpolate(
        table[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).reshape(256, -1).numpy()
    assert np.abs(plain - out["pos_embed_224"][1:]).max() > 100 * POS_ATOL


def test_student_is_batch_invariant(student, images):
    _, model, _ = student
    with torch.no_grad():
        alone = torch.cat([model(images[i:i + 1]) for i in range(5)])
        five = model(images)
        mixed_idx = [3, 0, 4, 0, 1]
        mixed = model(images[mixed_idx])
        pair = model(images[[2, 4]])
    assert (alone - five).abs().max() < 1e-6
    assert (mixed - alone[mixed_idx]).abs().max() < 1e-6
    assert (pair - alone[[2, 4]]).abs().max() < 1e-6


@pytest.mark.parametrize("group", ["all", "perm", "pair", "trio"])
def test_teacher_batch_groupings(teacher, images, group):
    _, model, out = teacher
    idx = torch.from_numpy(out[f"batch_{group}_indices"])
    with torch.no_grad():
        desc = model(images[idx]).numpy()
    np.testing.assert_allclose(desc, out[f"desc_batch_{group}"], atol=DESC_ATOL, rtol=0)


def test_teacher_single_and_intermediates(teacher, images):
    _, model, out = teacher
    with torch.no_grad():
        single = torch.cat([model(images[i:i + 1]) for i in range(5)]).numpy()
        allb = model.forward_intermediates(images[torch.from_numpy(out["batch_all_indices"])])
        one = model.forward_intermediates(images[:1])
    np.testing.assert_allclose(single, out["desc_single"], atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(allb["regions"].numpy(), out["regions"], atol=DESC_ATOL, rtol=0)
    _close_rel(allb["encoder_out"].numpy(), out["encoder_out_batch_all"])
    _close_rel(one["tokenmixed"][0].numpy(), out["img0_tokenmixed"])
    np.testing.assert_allclose(model.gem.p.detach().numpy(), out["gem_p"], rtol=0, atol=0)


def test_teacher_depends_on_batch_student_does_not(teacher, student, images):
    _, tmodel, _ = teacher
    _, smodel, _ = student
    with torch.no_grad():
        t_all = tmodel(images)[0]
        t_pair = tmodel(images[:2])[0]
        s_all = smodel(images)[0]
        s_pair = smodel(images[:2])[0]
    assert (t_all - t_pair).abs().max() > 1e-3
    assert (s_all - s_pair).abs().max() < 1e-6


def test_student_training_mode_path_equals_eval_path(student, images):
    """The per-token encoder used at eval equals the official (1, B*14, C) encoder call."""
    _, model, _ = student
    with torch.no_grad():
        regions = model.region_vectors(images[:3])
        fast = model.encode(regions)
        b, r, c = regions.shape
        official = model.encoder(regions.reshape(1, b * r, c)).reshape(b, r, c)
    assert (fast - official).abs().max() < 1e-5
