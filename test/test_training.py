"""Training: config checking, data sources and sampler, losses, one step of every stage,
resume, errors.  Real images (samples/nordland_mini), tiny models (width 32, 112 px input
with patch 7 -> the 16x16 grid SciceVPR needs), a few steps each."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vpr_ros.errors import CheckpointError, ConfigError, DatasetError
from vpr_ros.models.checkpoint import save_weights
from vpr_ros.models.factory import build_model
from vpr_ros.models.cards import load_card
from vpr_ros.training.config import build_config, dump_config, load_config
from vpr_ros.training.data import (PlaceBatchSampler, PlaceImagesDataset, collate_places,
                                   load_train_places, load_validation_set, places_from_csv)
from vpr_ros.training.losses import (MultiSimilarity, distillation_loss, multi_similarity_loss,
                                     multi_similarity_mine, mutual_nn_similarity)

torch.set_num_threads(1)

BACKBONE = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 7, "mlp_ratio": 2.0,
            "num_register_tokens": 0, "pos_embed_grid": 16, "interpolate_offset": 0.1}


def write_card(folder: Path, name: str, arch: str, **backbone) -> Path:
    bb = dict(BACKBONE, **backbone)
    if arch == "selavpr":
        head = {"adapter_dim": 8, "adapter_scale": 0.2, "local_hidden_dim": 8, "local_dim": 8}
        size = [56, 56]   # 8x8 grid -> 29x29 local maps: keeps the local loss cheap
    else:
        head = {"out_indices": [1, 2], "mix_in_dim": 16, "token_num": 1, "token_ratio": 1,
                "encoder_layers": 2 if arch == "super_cricavpr" else 1, "encoder_heads": 4,
                "encoder_ffn": 32}
        size = [112, 112]
    card = {"name": name, "architecture": arch, "input_size": size, "backbone": bb,
            "head": head, "weights": None, "random_init_seed": 7}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


def sample_csv(sample_dir: Path, folder: Path, n_places: int = 6, start: int = 0) -> Path:
    """Training CSV: database (summer) + query (winter) image of the same place_key."""
    rows = []
    for part in ("database", "queries"):
        with open(sample_dir / f"poses_{part}.csv", newline="") as fh:
            for r in list(csv.DictReader(fh))[start:start + n_places]:
                rows.append((r["place_key"], str(sample_dir / "images/test" / part / r["filename"]),
                             r["east_m"], r["north_m"]))
    path = folder / "places.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["place_id", "image", "x", "y"])
        w.writerows(rows)
    return path


def fixed_batch(places, k: int, size, n: int):
    ds = PlaceImagesDataset(places, k, size, augment=None)
    return collate_places([ds[(i, 1000 + i)] for i in range(n)])[:2]


def base_cfg(tmp_path, sample_dir, stage, model, **extra):
    cfg = {"stage": stage, "model": str(model), "seed": 0, "device": "cpu",
           "data": {"train": {"type": "csv", "path": str(sample_csv(sample_dir, tmp_path))},
                    "places_per_batch": 4, "images_per_place": 2, "num_workers": 0},
           "freeze": {"backbone_blocks": "all"},
           "optim": {"lr": 1e-3, "epochs": 1, "schedule": "constant"},
           "log": {"every_steps": 1}}
    for key, value in extra.items():
        node = cfg
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return build_config(cfg)


def run_steps(stage, images, labels, steps: int, lr: float = 1e-3):
    params = stage.trainable_parameters()
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    stage.train_module.train()
    for i in range(steps):
        torch.manual_seed(i)
        loss, metrics = stage.compute_loss(stage.train_module(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((float(loss.detach()), metrics))
    return losses


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- config

def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
        build_config({"model": "x", "data": {"train": []}, "optim": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): modle"):
        build_config({"modle": "x"})


def test_config_file_overrides_and_bad_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: teacher\nmodel: m\ndata: {train: {type: csv, path: x.csv}}\n"
                    "optim: {lr: 1e-4}\n")
    cfg = load_config(path, ["optim.lr=5e-5", "data.places_per_batch=8",
                             "freeze.backbone_blocks=3"])
    assert cfg.optim.lr == pytest.approx(5e-5)
    assert cfg.data.places_per_batch == 8 and cfg.freeze.backbone_blocks == 3
    assert cfg.loss.ms_beta == 50.0 and cfg.loss.miner_epsilon == 0.1
    with pytest.raises(ConfigError, match="optim.epochs"):
        load_config(path, ["optim.epochs=ten"])
    with pytest.raises(ConfigError, match="data.nope"):
        load_config(path, ["data.nope=1"])
    with pytest.raises(ConfigError, match="freeze.backbone_blocks"):
        load_config(path, ["freeze.backbone_blocks=some"])
    with pytest.raises(ConfigError, match="teacher.weights"):
        load_config(path, ["stage=student"])


def test_shipped_recipes_parse(repo_root):
    for path in sorted((repo_root / "config" / "train").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.stage in ("teacher", "student", "selavpr"), path


def test_shipped_configs_carry_no_machine_paths_and_find_the_shared_data(
        repo_root, tmp_path, monkeypatch):
    from conftest import shared_dir
    from vpr_ros.training.config import resolve_sources

    for path in sorted((repo_root / "config" / "train").glob("*.yaml")):
        cfg = load_config(path)
        for src in [cfg.data.train, cfg.data.val]:
            for s in (src if isinstance(src, list) else [src]):
                if s:
                    assert not Path(s["path"]).is_absolute(), f"{path.name}: {s['path']}"
    demo = repo_root / "config" / "train" / "demo_teacher.yaml"
    shared = shared_dir()
    monkeypatch.delenv("VPR_SHARED_DIR", raising=False)
    # the option wins over the environment, which wins over ../shared beside the repo
    cfg = load_config(demo, shared_dir=shared)
    train = Path(resolve_sources(cfg, cfg.data.train)["path"])
    assert train == shared / "data" / "nordland64_summer_winter_part1" and train.is_dir()
    monkeypatch.setenv("VPR_SHARED_DIR", str(tmp_path))
    assert resolve_sources(load_config(demo), cfg.data.val)["path"].startswith(str(tmp_path))
    (tmp_path / "x").mkdir()
    other = load_config(demo, shared_dir=tmp_path / "x")
    assert resolve_sources(other, other.data.val)["path"].startswith(str(tmp_path / "x"))
    with pytest.raises(ConfigError, match=r"shared data folder .*/nowhere does not exist; "
                                          r"pass vpr train --shared-dir DIR or set VPR_SHARED_DIR"):
        resolve_sources(load_config(demo, shared_dir=tmp_path / "nowhere"), cfg.data.val)
    monkeypatch.delenv("VPR_SHARED_DIR")
    beside = repo_root.parent / "shared"
    if beside.is_dir():
        assert resolve_sources(load_config(demo), cfg.data.val)["path"].startswith(str(beside))


def test_selection_metric_names_the_recall_it_reads():
    from vpr_ros.training.trainer import selection_metric

    cfg = build_config({"model": "m", "data": {"train": {"type": "csv", "path": "x.csv"}}})
    assert selection_metric(cfg.with_overrides("eval.recall_ns=[1, 5, 10]")) == ("5", "R@5")
    assert selection_metric(cfg.with_overrides("eval.recall_ns=[1, 3]")) == ("3", "R@3")
    assert selection_metric(cfg.with_overrides("eval.recall_ns=[1]")) == ("1", "R@1")


def test_config_is_frozen_and_overrides_are_checked():
    import dataclasses

    cfg = build_config({"model": "m", "data": {"train": {"type": "csv", "path": "x.csv"}}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0
    again = cfg.with_overrides("optim.lr=0.5", "eval.recall_ns=[1, 3]")
    assert (again.optim.lr, again.eval.recall_ns, cfg.optim.lr) == (0.5, (1, 3), 1e-4)
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_scale.*\[min, max\]"):
        cfg.with_overrides("data.augment.crop_scale=[0.5]")
    with pytest.raises(ConfigError, match="optim.clip_grad_norm: expected float"):
        cfg.with_overrides("optim.clip_grad_norm=yes")
    assert yaml.safe_load(dump_config(again))["eval"]["recall_ns"] == [1, 3]


# --------------------------------------------------------------------------- data

def test_places_with_fewer_than_k_images_are_named(tmp_path, sample_dir):
    places_csv = sample_csv(sample_dir, tmp_path, n_places=3)
    with open(places_csv, "a", newline="") as fh:   # a place seen once
        img = next((sample_dir / "images/test/database").iterdir())
        csv.writer(fh).writerow(["lonely", str(img), 0, 0])
    with pytest.raises(DatasetError, match=r"1 of 4 places .*images_per_place=2.*lonely \(1\)"):
        load_train_places({"type": "csv", "path": str(places_csv)}, tmp_path, 2)
    with pytest.raises(DatasetError, match=r"4 of 4 places"):
        load_train_places({"type": "csv", "path": str(places_csv)}, tmp_path, 3)
    kept = load_train_places({"type": "csv", "path": str(places_csv), "min_images": "drop"},
                             tmp_path, 2)
    assert len(kept) == 3 and all(len(p.images) == 2 for p in kept.places)


def test_benchmark_source_pairs_seasons_and_respects_seq_range(nordland_dir):
    places = load_train_places({"type": "benchmark", "path": str(nordland_dir),
                                "seq_range": [0, 50]}, Path("."), 2)
    assert len(places) == 50
    for p in places.places:
        names = sorted(i.parent.name for i in p.images)
        assert names == ["database", "queries"]
        assert p.images[0].name.split("@")[2] == p.images[1].name.split("@")[2]
    val = load_validation_set({"type": "benchmark", "path": str(nordland_dir),
                               "seq_range": [1000, 1010]}, Path("."))
    assert len(val.queries) == len(val.database) == 10
    assert all(len(p) >= 1 for p in val.positives)


def test_gsv_cities_layout(tmp_path, sample_dir):
    from PIL import Image
    root = tmp_path / "gsv"
    (root / "Dataframes").mkdir(parents=True)
    (root / "Images" / "Oslo").mkdir(parents=True)
    src = sorted((sample_dir / "images/test/database").iterdir())[:8]
    rows = []
    for i, img in enumerate(src):
        row = {"place_id": i // 4, "year": 2020 + i % 2, "month": 3, "northdeg": 90,
               "city_id": "Oslo", "lat": 59.91 + i * 1e-4, "lon": 10.75, "panoid": f"pano{i}"}
        rows.append(row)
        from vpr_ros.training.data import gsv_image_name
        Image.open(img).save(root / "Images" / "Oslo" /
                             gsv_image_name("Oslo", {k: str(v) for k, v in row.items()}))
    with open(root / "Dataframes" / "Oslo.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    places = load_train_places({"type": "gsv_cities", "path": str(root)}, tmp_path, 4)
    assert len(places) == 2 and all(len(p.images) == 4 for p in places.places)


def test_maps_source_matches_traversals_by_position(tmp_path, sample_dir):
    maps = []
    for part in ("database", "queries"):
        m = tmp_path / f"map_{part}"
        m.mkdir()
        with open(sample_dir / f"poses_{part}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))[:5]
        with open(m / "places.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["place_id", "image_name", "x", "y", "z"])
            for i, r in enumerate(rows):
                w.writerow([i, r["filename"], r["east_m"], r["north_m"], 0])
        maps.append(m)
    src = {"type": "maps", "paths": [str(m) for m in maps], "radius_m": 5,
           "image_roots": [str(sample_dir / "images/test/database"),
                           str(sample_dir / "images/test/queries")]}
    places = load_train_places(src, tmp_path, 2)
    assert len(places) == 5
    assert all({i.parent.name for i in p.images} == {"database", "queries"} for p in places.places)
    # Without image_roots the folders come from the sources the manifests record.
    (maps[0] / "manifest.json").write_text(json.dumps(
        {"source": {"type": "benchmark", "dataset": str(sample_dir), "split": "database"}}))
    (maps[1] / "manifest.json").write_text(json.dumps(
        {"source": {"type": "images+csv", "images": str(sample_dir / "images/test/queries")}}))
    del src["image_roots"]
    again = load_train_places(src, tmp_path, 2)
    assert [p.images for p in again.places] == [p.images for p in places.places]


def test_sampler_p_by_k_deterministic_and_split_across_ranks():
    pos = np.stack([np.zeros(40), np.arange(40) * 20.0], 1)
    s = PlaceBatchSampler(40, 8, seed=3, positions=pos, avoid_near_m=30.0)
    s.set_epoch(0)
    batches = list(s)
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches for i, _ in b) == list(range(40))
    for b in batches:   # no two neighbouring places (20 m apart) in one batch
        idx = np.array([i for i, _ in b])
        assert np.min(np.abs(idx[:, None] - idx[None, :]) + 100 * np.eye(len(idx))) >= 2
    again = PlaceBatchSampler(40, 8, seed=3, positions=pos, avoid_near_m=30.0)
    again.set_epoch(0)
    assert list(again) == batches
    s.set_epoch(1)
    assert list(s) != batches
    ranks = [PlaceBatchSampler(40, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(0)
    b0, b1 = list(ranks[0]), list(ranks[1])
    assert len(b0) == len(b1) == 5
    for x, y in zip(b0, b1):
        assert len(x) == len(y) == 4 and not set(i for i, _ in x) & set(i for i, _ in y)
    ranks[0].set_epoch(0, start_batch=3)
    assert list(ranks[0]) == b0[3:]


def test_augmented_batch_shapes_and_labels(tmp_path, sample_dir):
    places = places_from_csv(sample_csv(sample_dir, tmp_path, n_places=3))
    ds = PlaceImagesDataset(places, 2, (112, 112),
                            {"color_jitter": 0.4, "crop_scale": [0.6, 1.0], "rand_augment_ops": 2})
    x, y, _ = collate_places([ds[(0, 5)], ds[(2, 6)]])
    assert x.shape == (4, 3, 112, 112) and y.tolist() == [0, 0, 2, 2]
    x2, _, _ = collate_places([ds[(0, 5)], ds[(2, 6)]])
    assert torch.equal(x, x2)                       # same seed -> same augmentation
    plain = PlaceImagesDataset(places, 2, (112, 112))[(0, 5)][0]
    assert not torch.equal(x[:2], plain)


# --------------------------------------------------------------------------- losses

def test_multi_similarity_matches_definition():
    g = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pos, neg = multi_similarity_mine(d, labels, 0.1)
    s = d @ d.T
    for a in range(8):
        same = [j for j in range(8) if labels[j] == labels[a] and j != a]
        other = [j for j in range(8) if labels[j] != labels[a]]
        for n in other:
            assert bool(neg[a, n]) == bool(s[a, n] + 0.1 > min(s[a, j] for j in same))
        for p in same:
            assert bool(pos[a, p]) == bool(s[a, p] - 0.1 < max(s[a, j] for j in other))
    loss = multi_similarity_loss(d, labels, pos, neg, alpha=1.0, beta=50.0, base=0.0)
    expected = 0.0
    for a in range(8):
        ps = [float(s[a, j]) for j in range(8) if pos[a, j]]
        ns = [float(s[a, j]) for j in range(8) if neg[a, j]]
        if ps:
            expected += np.log1p(sum(np.exp(-v) for v in ps))
        if ns:
            expected += np.log1p(sum(np.exp(50 * v) for v in ns)) / 50
    assert float(loss) == pytest.approx(expected / 8, rel=1e-5)


@pytest.mark.parametrize("p, k, dim, noise", [(32, 2, 256, 1.5), (72, 4, 512, 2.0),
                                              (16, 4, 64, 3.0), (8, 2, 32, 1.0)])
def test_multi_similarity_equals_pytorch_metric_learning(p, k, dim, noise):
    """The official SciceVPR trains with pytorch-metric-learning's MultiSimilarityMiner +
    MultiSimilarityLoss; ours gives the same mined pairs, loss and gradient (w.r.t. the
    features before the models' L2 normalisation).  Why ours is kept: docs/training.md."""
    from pytorch_metric_learning import losses, miners

    g = torch.Generator().manual_seed(p * 1000 + k)
    labels = torch.arange(p).repeat_interleave(k)[torch.randperm(p * k, generator=g)]
    centers = torch.randn(p, dim, generator=g)
    z = (centers[labels] + noise * torch.randn(p * k, dim, generator=g)).requires_grad_(True)
    ours = MultiSimilarity(alpha=1.0, beta=50.0, base=0.0, epsilon=0.1)
    loss = ours(torch.nn.functional.normalize(z, dim=1), labels)
    grad, = torch.autograd.grad(loss, z)
    x = torch.nn.functional.normalize(z, dim=1)
    pairs = miners.MultiSimilarityMiner(epsilon=0.1)(x, labels)
    ref = losses.MultiSimilarityLoss(alpha=1.0, beta=50.0, base=0.0)(x, labels, pairs)
    ref_grad, = torch.autograd.grad(ref, z)
    pos, neg = multi_similarity_mine(x.detach(), labels, 0.1)
    assert sorted(map(list, zip(*[t.tolist() for t in pairs[:2]]))) == pos.nonzero().tolist()
    assert sorted(map(list, zip(*[t.tolist() for t in pairs[2:]]))) == neg.nonzero().tolist()
    value, ref_value = float(loss.detach()), float(ref.detach())
    assert value > 0 and value == pytest.approx(ref_value, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max()))


def test_pytorch_metric_learning_drops_a_batch_with_one_mined_pair_each():
    """The one difference (docs/training.md): with at most one mined positive and one mined
    negative pair, the library returns a zero loss; ours trains on that pair."""
    from pytorch_metric_learning import losses

    labels = torch.tensor([0, 0, 1, 1])
    x = torch.nn.functional.normalize(torch.tensor(
        [[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]]), dim=1)
    pos = torch.zeros(4, 4, dtype=torch.bool)
    neg = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 1] = neg[0, 3] = True
    pairs = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([3]))
    ref = losses.MultiSimilarityLoss(alpha=1.0, beta=50.0, base=0.0)(x, labels, pairs)
    assert float(ref) == 0.0
    assert float(multi_similarity_loss(x, labels, pos, neg)) > 0.1


def test_distillation_and_local_similarity():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert float(distillation_loss(a, b)) == pytest.approx(1.0)
    q = torch.nn.functional.normalize(torch.randn(5, 5, 8), dim=-1)
    assert float(mutual_nn_similarity(q, q)) == pytest.approx(1.0)
    other = torch.nn.functional.normalize(torch.randn(5, 5, 8), dim=-1)
    assert float(mutual_nn_similarity(q, other)) < 1.0


# --------------------------------------------------------------------------- stages

def test_teacher_step_lowers_loss_and_trains_only_the_head(tmp_path, sample_dir):
    from vpr_ros.training.teacher import TeacherStage
    card = write_card(tmp_path, "t", "super_cricavpr")
    cfg = base_cfg(tmp_path, sample_dir, "teacher", card)
    stage = TeacherStage(cfg, torch.device("cpu"))
    places = places_from_csv(tmp_path / "places.csv")
    images, labels = fixed_batch(places, 2, (112, 112), 4)
    before = snapshot(stage.model)
    losses = run_steps(stage, images, labels, 4)
    assert losses[-1][0] < losses[0][0]
    after = stage.model.state_dict()
    for key in before:
        if key.startswith("backbone."):
            assert torch.equal(before[key], after[key]), key
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("fusion.") for k in changed)
    assert any(k.startswith("encoder.") for k in changed)


def test_teacher_partial_freeze_trains_last_blocks(tmp_path, sample_dir):
    from vpr_ros.training.teacher import TeacherStage
    card = write_card(tmp_path, "t", "super_cricavpr")
    cfg = base_cfg(tmp_path, sample_dir, "teacher", card, freeze__backbone_blocks=2)
    stage = TeacherStage(cfg, torch.device("cpu"))
    names = stage.trainable_names()
    assert "backbone.blocks.2.attn.qkv.weight" in names
    assert not any(n.startswith(("backbone.blocks.0.", "backbone.blocks.1.",
                                 "backbone.patch_embed", "backbone.pos_embed")) for n in names)


def teacher_file(tmp_path, **backbone) -> Path:
    card = load_card(write_card(tmp_path, "teacher_card", "super_cricavpr", **backbone))
    model = build_model(card, seed=3)
    return save_weights(model, card, tmp_path / "teacher.safetensors")


def test_student_step_distils_towards_frozen_teacher(tmp_path, sample_dir):
    from vpr_ros.training.student import StudentStage
    weights = teacher_file(tmp_path)
    card = write_card(tmp_path, "s", "scicevpr")
    cfg = base_cfg(tmp_path, sample_dir, "student", card, teacher__weights=str(weights),
                   loss__gamma=0.1, loss__eta=1.0)
    stage = StudentStage(cfg, torch.device("cpu"))
    teacher_state = snapshot(stage.teacher)
    for key, value in stage.model.state_dict().items():       # initialised from the teacher
        if key.startswith(("backbone.", "fusion.")):
            assert torch.equal(value, teacher_state[key]), key
    places = places_from_csv(tmp_path / "places.csv")
    images, labels = fixed_batch(places, 2, (112, 112), 4)
    before = snapshot(stage.model)
    stage.model.eval()
    with torch.no_grad():
        gap_before = float(distillation_loss(stage.model(images), stage.teacher(images)))
    losses = run_steps(stage, images, labels, 5, lr=3e-3)
    stage.model.eval()
    with torch.no_grad():
        gap_after = float(distillation_loss(stage.model(images), stage.teacher(images)))
    assert losses[-1][0] < losses[0][0]
    assert gap_after < gap_before
    assert losses[-1][1]["distill_loss"] < losses[0][1]["distill_loss"]
    after = stage.model.state_dict()
    for key in before:
        if key.startswith(("backbone.", "fusion.")):
            assert torch.equal(before[key], after[key]), key
    for key, value in stage.teacher.state_dict().items():
        assert torch.equal(value, teacher_state[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))


def test_student_copy_head_option(tmp_path, sample_dir):
    from vpr_ros.training.student import StudentStage
    weights = teacher_file(tmp_path)
    card = write_card(tmp_path, "s", "scicevpr")
    for copy in (False, True):
        cfg = base_cfg(tmp_path, sample_dir, "student", card, teacher__weights=str(weights),
                       teacher__copy_head=copy)
        stage = StudentStage(cfg, torch.device("cpu"))
        t, s = stage.teacher.state_dict(), stage.model.state_dict()
        same = torch.equal(t["token_mixers.0.mlp.0.weight"], s["token_mixers.0.mlp.0.weight"])
        assert same == copy
        assert "token_mixers.0.mlp.0.weight" in stage.trainable_names()


def test_student_teacher_mismatch_is_a_checkpoint_error(tmp_path, sample_dir):
    from vpr_ros.training.student import StudentStage
    weights = teacher_file(tmp_path, embed_dim=48)
    card = write_card(tmp_path, "s", "scicevpr")
    cfg = base_cfg(tmp_path, sample_dir, "student", card, teacher__weights=str(weights))
    with pytest.raises(CheckpointError, match=r"does not match student 's'.*differ in shape"):
        StudentStage(cfg, torch.device("cpu"))
    student_file = save_weights(build_model(load_card(card), seed=0), load_card(card),
                                tmp_path / "student.safetensors")
    cfg = base_cfg(tmp_path, sample_dir, "student", card, teacher__weights=str(student_file),
                   teacher__model=str(card))
    with pytest.raises(CheckpointError, match="super_cricavpr"):
        StudentStage(cfg, torch.device("cpu"))


def test_selavpr_step_trains_adapters_and_local_head_only(tmp_path, sample_dir):
    from vpr_ros.training.selavpr import SelaVPRStage
    card = write_card(tmp_path, "sela", "selavpr")
    cfg = base_cfg(tmp_path, sample_dir, "selavpr", card)
    stage = SelaVPRStage(cfg, torch.device("cpu"))
    names = stage.trainable_names()
    assert names and all("adapter" in n or n.startswith(("local_adapt.", "gem.")) for n in names)
    places = places_from_csv(tmp_path / "places.csv")
    images, labels = fixed_batch(places, 2, (56, 56), 4)
    before = snapshot(stage.model)
    losses = run_steps(stage, images, labels, 4, lr=3e-3)
    assert losses[0][1]["triplets"] > 0
    assert losses[-1][0] < losses[0][0]
    after = stage.model.state_dict()
    for key in before:
        trainable = "adapter" in key or key.startswith(("local_adapt.", "gem."))
        if not trainable:
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if "adapter" in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("local_adapt."))


# --------------------------------------------------------------------------- trainer

def trainer_cfg(tmp_path, sample_dir, **extra):
    card = write_card(tmp_path, "t", "super_cricavpr")
    val = {"type": "benchmark", "path": str(sample_dir), "seq_range": [1293, 1301]}
    extra = {"data__val": val, "optim__epochs": 2, "export_name": "tiny_teacher", **extra}
    return base_cfg(tmp_path, sample_dir, "teacher", card, **extra)


def test_training_run_resume_continues_from_saved_step(tmp_path, sample_dir):
    from safetensors.torch import load_file
    from vpr_ros.training.trainer import train

    cfg = trainer_cfg(tmp_path, sample_dir,             # 6 places / 4 per batch -> 1 batch
                      data__batches_per_epoch=2)
    full = train(cfg, tmp_path / "full", progress=False)
    assert full["finished"] and full["steps"] == 4 and full["epochs_done"] == 2
    for name in ("steps.csv", "epochs.csv", "curves.png", "config.yaml", "summary.json",
                 "checkpoint/model.safetensors", "checkpoint/optimizer.pt",
                 "best/model.safetensors",
                 "model/tiny_teacher.yaml", "model/tiny_teacher.safetensors"):
        assert (tmp_path / "full" / name).is_file(), name
    assert all(0.0 <= h["R@5"] <= 1.0 for h in full["history"])
    import os
    import stat
    mode = stat.S_IMODE(os.stat(tmp_path / "full" / "model" / "tiny_teacher.safetensors").st_mode)
    from vpr_ros.training.trainer import _umask
    assert mode == 0o666 & ~_umask()           # not the 0600 of the temporary file
    exported = load_card(tmp_path / "full" / "model" / "tiny_teacher.yaml")
    assert exported.has_weights and "2 epochs" in exported.notes

    part = train(cfg, tmp_path / "part", progress=False, max_steps=3)
    assert not part["finished"]
    state = json.loads((tmp_path / "part" / "checkpoint" / "state.json").read_text())
    assert (state["step"], state["epoch"], state["batch"]) == (3, 1, 1)
    assert not (tmp_path / "part" / "model").exists()
    resumed = train(cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["finished"] and resumed["steps"] == 4
    with open(tmp_path / "part" / "steps.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoint" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_grad_accumulation_and_bf16_autocast_run(tmp_path, sample_dir):
    from vpr_ros.training.trainer import train
    cfg = trainer_cfg(tmp_path, sample_dir).with_overrides(
        "optim.epochs=1", "optim.grad_accum=2", "data.batches_per_epoch=2", "precision=bf16",
        "data.val=null")
    out = train(cfg, tmp_path / "acc", progress=False)
    assert out["finished"] and out["steps"] == 1


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, sample_dir):
    from vpr_ros.training.trainer import train
    cfg = trainer_cfg(tmp_path, sample_dir)
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(cfg, tmp_path / "nothing", resume=True, progress=False)


def test_cli_reports_unknown_key(tmp_path, capsys):
    from vpr_ros.cli.main import main
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("stage: teacher\nmodel: scicevpr_tiny_random\nlearning_rate: 1\n"
                   "data: {train: {type: csv, path: x.csv}}\n")
    code = main(["train", "teacher", "--config", str(cfg), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown config key(s): learning_rate" in err and "Traceback" not in err
    cfg.write_text("stage: teacher\nmodel: scicevpr_tiny_random\n"
                   "data: {train: {type: csv, path: x.csv}}\n")
    code = main(["train", "teacher", "--config", str(cfg), "--set", "optim.lr=abc"])
    assert code == 2 and "optim.lr" in capsys.readouterr().err
    code = main(["train", "teacher", "optim.epochs=0", "--config", str(cfg)])
    assert code == 2 and "optim.epochs" in capsys.readouterr().err


def test_student_and_selavpr_run_through_the_trainer(tmp_path, sample_dir):
    from vpr_ros.training.trainer import train
    weights = teacher_file(tmp_path)
    val = {"type": "benchmark", "path": str(sample_dir), "seq_range": [1293, 1299]}
    student = base_cfg(tmp_path, sample_dir, "student", write_card(tmp_path, "s", "scicevpr"),
                       teacher__weights=str(weights), data__val=val, data__batches_per_epoch=2)
    out = train(student, tmp_path / "student", progress=False)
    assert out["finished"] and out["steps"] == 2 and "distill_loss" in out["history"][0]
    card = load_card(tmp_path / "student" / "model" / "student.yaml")
    assert card.architecture == "scicevpr" and card.has_weights
    sela = base_cfg(tmp_path, sample_dir, "selavpr", write_card(tmp_path, "sela", "selavpr"),
                    data__val=val, data__batches_per_epoch=2)
    out = train(sela, tmp_path / "sela", progress=False)
    assert out["finished"] and out["history"][0]["triplets"] > 0
    assert 0.0 <= out["history"][0]["R@1"] <= 1.0


def test_corrupt_training_image_and_bad_precision_are_clear_errors(tmp_path, sample_dir):
    from vpr_ros.errors import DeviceError
    from vpr_ros.training.trainer import train
    places_csv = sample_csv(sample_dir, tmp_path, n_places=2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with open(places_csv, "a", newline="") as fh:
        csv.writer(fh).writerows([["broken_place", str(bad), 0, 0]] * 2)
    places = places_from_csv(places_csv)
    ds = PlaceImagesDataset(places, 2, (112, 112))
    with pytest.raises(DatasetError, match=r"place broken_place: .*broken\.jpg"):
        ds[(2, 0)]
    cfg = trainer_cfg(tmp_path, sample_dir, precision="fp16")
    with pytest.raises(DeviceError, match="fp16"):
        train(cfg, tmp_path / "fp16", progress=False)


def test_stage_refuses_a_card_of_another_architecture(tmp_path, sample_dir):
    from vpr_ros.training.teacher import TeacherStage
    card = write_card(tmp_path, "s", "scicevpr")
    cfg = base_cfg(tmp_path, sample_dir, "teacher", card)
    with pytest.raises(ConfigError, match="stage teacher trains a super_cricavpr card"):
        TeacherStage(cfg, torch.device("cpu"))
