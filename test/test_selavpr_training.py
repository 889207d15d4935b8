"""Re-ranker training options: LocalAdapt resolution (card ``head.local_upsample``),
first-stage mining (``mining.model``, ``mining.neighbour_places``), the dual-softmax
local loss and validation by re-ranking the first stage (``eval.rerank_k``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from vpr_ros.errors import ConfigError, ModelCardError
from vpr_ros.models.cards import card_from_dict, load_card
from vpr_ros.models.factory import build_model
from vpr_ros.models.rerank import mutual_nn_counts
from vpr_ros.training.first_stage import NeighbourBatchSampler
from vpr_ros.training.losses import selavpr_losses, soft_mutual_nn_count, triplet_indices

from test_training import base_cfg, fixed_batch, sample_csv, write_card

torch.set_num_threads(1)


def sela_card(tmp_path, upsample=None, size=56, name="sela_u"):
    path = write_card(tmp_path, name, "selavpr")
    data = yaml.safe_load(path.read_text())
    data["input_size"] = [size, size]
    if upsample is not None:
        data["head"]["local_upsample"] = upsample
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("upsample, side", [(None, 29), (2, 29), (1, 15), (0, 8)])
def test_local_upsample_sets_the_local_map_size(tmp_path, upsample, side):
    card = load_card(sela_card(tmp_path, upsample))
    assert card.local_shape == (side, side, 8)
    model = build_model(card, seed=0).eval()
    with torch.no_grad():
        g, loc = model(torch.zeros(2, 3, 56, 56))
    assert tuple(loc.shape) == (2, side, side, 8) and tuple(g.shape) == (2, 32)


def test_official_cards_keep_two_upsampling_stages():
    card = load_card("selavpr_tiny_random")
    assert "local_upsample" not in card.head
    gh, gw = card.grid
    assert card.local_shape[:2] == (4 * gh - 3, 4 * gw - 3)


@pytest.mark.parametrize("bad", [3, -1, "two", True])
def test_bad_local_upsample_is_a_card_error(tmp_path, bad):
    data = yaml.safe_load(sela_card(tmp_path).read_text())
    data["head"]["local_upsample"] = bad
    with pytest.raises(ModelCardError, match="local_upsample must be 0, 1 or 2"):
        card_from_dict(data)
    data["architecture"] = "scicevpr"
    with pytest.raises(ModelCardError):
        card_from_dict(data)


def test_soft_count_tends_to_the_mutual_nn_count():
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        a = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=1)
        b = torch.nn.functional.normalize(a[torch.randperm(64, generator=g)]
                                          + 0.8 * torch.randn(64, 16, generator=g), dim=1)
        count = int(mutual_nn_counts(a.numpy(), b.numpy()[None])[0])
        soft = float(soft_mutual_nn_count(a[None], b[None], temperature=1e-4)[0]) * 64
        assert 0 < count < 64
        assert soft == pytest.approx(count, abs=1.0)
    # a warmer temperature is smooth and below the hard count of identical maps
    same = float(soft_mutual_nn_count(a[None], a[None], temperature=0.05)[0])
    assert 0.0 < same < 1.0


def test_dual_softmax_local_loss_has_a_margin_and_gradients():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(3, 6, 6, 8), dim=-1).requires_grad_()
    glob = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    trip = torch.tensor([[0, 1, 2]])
    _, flat = selavpr_losses(glob, feats, trip, local="dual_softmax", local_margin=0.0)
    _, hinge = selavpr_losses(glob, feats, trip, local="dual_softmax", local_margin=0.5)
    assert float(hinge.detach()) >= float(flat.detach()) and float(hinge.detach()) > 0
    hinge.backward()
    assert feats.grad is not None and float(feats.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="unknown local loss"):
        selavpr_losses(glob, feats, trip, local="nope")


def test_mining_options_are_checked(tmp_path, sample_dir):
    card = sela_card(tmp_path)
    with pytest.raises(ConfigError, match="need mining.model"):
        base_cfg(tmp_path, sample_dir, "selavpr", card, mining__neighbour_places=3)
    with pytest.raises(ConfigError, match="need mining.model"):
        base_cfg(tmp_path, sample_dir, "selavpr", card, eval__rerank_k=10)
    with pytest.raises(ConfigError, match="must include 1"):
        base_cfg(tmp_path, sample_dir, "selavpr", card, mining__model="demo_tiny",
                 eval__rerank_k=10, eval__recall_ns=[5, 10])
    with pytest.raises(ConfigError, match="local_loss must be one of"):
        base_cfg(tmp_path, sample_dir, "selavpr", card, loss__local_loss="soft")
    with pytest.raises(ConfigError, match="setting of stage selavpr"):
        base_cfg(tmp_path, sample_dir, "teacher", write_card(tmp_path, "t", "super_cricavpr"),
                 mining__model="demo_tiny")
    cfg = base_cfg(tmp_path, sample_dir, "selavpr", card)
    assert cfg.mining.model is None and cfg.loss.local_loss == "mutual_nn"   # official
    assert cfg.loss.local_margin == 0.0 and cfg.eval.rerank_k == 0


def test_neighbour_batches_hold_first_stage_neighbours_far_apart():
    rng = np.random.default_rng(0)
    n = 40
    desc = rng.normal(size=(n, 8)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    positions = np.stack([np.arange(n) * 20.0, np.zeros(n)], axis=1)
    s = NeighbourBatchSampler(desc, 3, n, 8, 0, None, 0, 1, positions, 30.0)
    assert s.batches_per_epoch == n // 2              # every place seeds once: 2 seeds/batch
    batches = s.global_batches()
    assert batches == s.global_batches()              # deterministic in (seed, epoch)
    sims = desc @ desc.T
    np.fill_diagonal(sims, -np.inf)
    for batch in batches:
        ids = [i for i, _ in batch]
        assert len(ids) == len(set(ids)) == 8
        d = np.abs(positions[ids, 0][:, None] - positions[ids, 0][None])
        assert d[~np.eye(8, dtype=bool)].min() >= 30.0
        # each seed brought places ranked among its nearest by the first stage
        seed = ids[0]
        ranks = np.argsort(-sims[seed]).tolist()
        assert all(ranks.index(j) < 12 for j in ids[1:4])
    s.set_epoch(1)
    assert s.global_batches() != batches


def test_triplets_are_mined_on_the_first_stage_descriptors(tmp_path, sample_dir):
    from vpr_ros.training.data import load_train_places
    from vpr_ros.training.selavpr import SelaVPRStage

    cfg = base_cfg(tmp_path, sample_dir, "selavpr", sela_card(tmp_path),
                   loss__negatives_per_anchor=1, loss__local_loss="dual_softmax",
                   loss__local_margin=0.1)
    stage = SelaVPRStage(cfg, torch.device("cpu"))
    places = load_train_places([{"type": "csv", "path": str(sample_csv(sample_dir, tmp_path))}],
                               tmp_path, 2)
    images, labels = fixed_batch(places, 2, (56, 56), 4)       # places 0..3, 2 images each
    # first-stage descriptors: image 7 (place 3) is the hardest negative of every anchor
    mining = torch.eye(8)
    mining[7] = mining[0] + mining[2] + mining[4] + mining[7]
    mining = torch.nn.functional.normalize(mining, dim=1)
    stage.mining_descriptors = mining
    stage.batch_image_ids = torch.arange(8)
    expected = triplet_indices(mining[:8], labels, 1)
    assert [7] == sorted(set(expected[expected[:, 0] != 6][:, 2].tolist()))
    stage.model.eval()
    with torch.no_grad():
        outputs = stage.model(images)
        loss, metrics = stage.compute_loss(outputs, labels)
        g, loc = selavpr_losses(*outputs, expected, 0.1, "dual_softmax", 0.1, 0.05)
        own = triplet_indices(outputs[0], labels, 1)
    assert float(loss) == pytest.approx(float(g + loc), rel=1e-6)
    assert metrics["local_loss"] == pytest.approx(float(loc), rel=1e-6)
    assert not torch.equal(own, expected)         # the re-ranker's own descriptor mines others


def test_selavpr_trains_with_the_first_stage_and_validates_by_reranking(tmp_path, sample_dir):
    """Through the trainer: the shipped demo_tiny mines, batches are its neighbours, the
    epoch is picked by the re-ranked R@1 of its top 3 on the validation split."""
    from vpr_ros.training.trainer import train

    val = {"type": "benchmark", "path": str(sample_dir), "seq_range": [1293, 1303]}
    cfg = base_cfg(tmp_path, sample_dir, "selavpr", sela_card(tmp_path, 0), data__val=val,
                   data__batches_per_epoch=2, mining__model="demo_tiny",
                   mining__neighbour_places=1, eval__rerank_k=3,
                   loss__local_loss="dual_softmax", loss__local_margin=0.1,
                   optim__epochs=2)
    out = train(cfg, tmp_path / "run", progress=False)
    assert out["finished"] and out["steps"] == 4
    hist = out["history"]
    assert all(h["triplets"] > 0 and 0.0 <= h["R@1"] <= 1.0 for h in hist)
    best = max(range(2), key=lambda e: (hist[e]["R@1"], -e))
    assert out["best_epoch"] == best and out["best_val_metric"].startswith("re-ranked R@1")
    card = load_card(tmp_path / "run" / "model" / "run.yaml")
    assert card.head["local_upsample"] == 0 and card.local_shape == (8, 8, 8)
    with pytest.raises(ConfigError, match="mining.model 'nope'"):
        train(base_cfg(tmp_path, sample_dir, "selavpr", sela_card(tmp_path),
                       mining__model="nope"), tmp_path / "bad", progress=False)
