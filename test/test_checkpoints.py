"""Checkpoint loading: official layouts, key mapping vs full-size manifests, clear errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vpr_ros.errors import CheckpointError
from vpr_ros.models.cards import card_from_reference_config, load_card
from vpr_ros.models.checkpoint import (KIND_DINOV2_PRETRAIN, card_sidecar_path,
                                       check_against_model, official_to_ours, read_checkpoint,
                                       save_weights, load_weights)
from vpr_ros.models.factory import build_model, load_model

# Which shipped card each full-size manifest describes (pretrains: the cards whose
# backbone they fill).  A new manifest without an entry fails the test on purpose.
MANIFEST_CARDS = {
    "scicevpr_B": ["scicevpr_b"],
    "super_cricavpr_B": ["super_cricavpr_b"],
    "scicevpr_L_inferred": ["scicevpr_l"],
    "selavpr_vitl14": ["selavpr_vitl14"],
    "selavpr_vitl14_reg4": ["selavpr_vitl14_reg4"],
    "dinov2_vitb14_pretrain": ["scicevpr_b", "super_cricavpr_b"],
    "dinov2_vitl14_pretrain": ["selavpr_vitl14", "scicevpr_l"],
    "dinov2_vitl14_reg4_pretrain": ["selavpr_vitl14_reg4"],
}


def _manifest_entries(path: Path):
    data = json.loads(path.read_text())
    entries = data.get("tensors") or data.get("keys")
    if "num_tensors" in data:
        assert len(entries) == data["num_tensors"]
    return {e["key"]: tuple(e["shape"]) for e in entries}


def _manifest_params(reference):
    files = sorted((reference / "manifests").glob("*.json"))
    assert files, "no manifests in the reference folder"
    return [(f, card) for f in files for card in MANIFEST_CARDS.get(f.stem, [None])]


def test_every_manifest_maps_exactly_onto_its_card(reference):
    for path, card_name in _manifest_params(reference):
        assert card_name is not None, f"no card known for manifest {path.name}"
        card = load_card(card_name)
        with torch.device("meta"):
            model = build_model(card)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        manifest = _manifest_entries(path)
        fake = {k: torch.empty(shape, device="meta") for k, shape in manifest.items()}
        mapped, kind = official_to_ours(fake)
        assert len(mapped) == len(manifest), "key mapping must be one-to-one"
        check_against_model(mapped, expected, card, kind, path.name, strict=True)
        if kind == KIND_DINOV2_PRETRAIN:
            wanted = {k for k in expected if k.startswith("backbone.")
                      and ".adapter1." not in k and ".adapter2." not in k}
        else:
            wanted = set(expected)
        assert set(mapped) == wanted, path.name
        for k in mapped:
            assert tuple(mapped[k].shape) == tuple(expected[k]), (path.name, k)
        if "descriptor_dim" in json.loads(path.read_text()):
            assert card.descriptor_dim == json.loads(path.read_text())["descriptor_dim"]


# ----------------------------------------------------------------------------------
# tiny official files


def _config(reference, stem):
    return json.loads((reference / f"{stem}.config.json").read_text())


@pytest.fixture(scope="module")
def student_card(reference):
    return card_from_reference_config(_config(reference, "scicevpr_student_tiny"), "student")


@pytest.fixture(scope="module")
def sela_card(reference):
    return card_from_reference_config(_config(reference, "selavpr_tiny"), "sela")


@pytest.fixture(scope="module")
def student_pth(reference):
    return reference / "scicevpr_student_tiny.pth"


@pytest.fixture(scope="module")
def x(reference):
    return torch.from_numpy(np.load(reference / "inputs" / "preprocessed_224.npz")["images"][:2])


def _official_state(path):
    raw, _ = read_checkpoint(path)
    return raw


def test_official_training_dict_and_variants_give_same_model(tmp_path, student_card,
                                                             student_pth, x):
    raw = _official_state(student_pth)
    assert all(k.startswith("module.") for k in raw)
    bare = {k[len("module."):]: v for k, v in raw.items()}
    torch.save(bare, tmp_path / "bare.pth")
    torch.save({"model_state_dict": raw}, tmp_path / "wrapped.pth")
    outs = []
    for path in (student_pth, tmp_path / "bare.pth", tmp_path / "wrapped.pth"):
        model = build_model(student_card, seed=1)
        load_weights(model, student_card, path)
        with torch.no_grad():
            outs.append(model.eval()(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_truncated_file(tmp_path, student_card, student_pth):
    data = student_pth.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        load_weights(build_model(student_card, seed=0), student_card, bad)


def test_random_bytes_and_empty_file(tmp_path, student_card):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path in (junk, empty, tmp_path / "missing.pth"):
        with pytest.raises(CheckpointError):
            load_weights(build_model(student_card, seed=0), student_card, path)


class NotAllowed:
    pass


def test_pickled_objects_are_refused(tmp_path, student_card):
    path = tmp_path / "evil.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "extra": NotAllowed()}, path)
    with pytest.raises(CheckpointError, match="not allowed"):
        load_weights(build_model(student_card, seed=0), student_card, path)


def test_selavpr_file_into_scicevpr_card(reference, student_card):
    with pytest.raises(CheckpointError, match="SelaVPR"):
        load_weights(build_model(student_card, seed=0), student_card,
                     reference / "selavpr_tiny.pth")


def test_teacher_file_into_student_card(reference, student_card):
    with pytest.raises(CheckpointError, match="teacher") as err:
        load_weights(build_model(student_card, seed=0), student_card,
                     reference / "super_cricavpr_teacher_tiny.pth")
    assert "unexpected keys" in str(err.value) and "encoder.layers.1" in str(err.value)


def test_missing_and_misshaped_keys(tmp_path, student_card, student_pth):
    raw = _official_state(student_pth)
    missing = dict(raw)
    del missing["module.gem.p"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys 1 \(gem\.p\)"):
        load_weights(build_model(student_card, seed=0), student_card, tmp_path / "missing.pth")
    wrong = dict(raw)
    wrong["module.conv.weight"] = torch.zeros(7, 3, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="mis-shaped keys 1 .*fusion.weight"):
        load_weights(build_model(student_card, seed=0), student_card, tmp_path / "wrong.pth")
    # Non-strict loading tolerates missing keys but never wrong shapes.
    model = build_model(student_card, seed=0)
    load_weights(model, student_card, tmp_path / "missing.pth", strict=False)
    with pytest.raises(CheckpointError):
        load_weights(model, student_card, tmp_path / "wrong.pth", strict=False)


def test_dinov2_pretrain_fills_backbone_of_any_card(tmp_path, student_card, sela_card,
                                                    student_pth, reference):
    raw = _official_state(student_pth)
    prefix = "module.backbone.dino_model."
    pretrain = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
    torch.save(pretrain, tmp_path / "dinov2_tiny_pretrain.pth")
    model = build_model(student_card, seed=3)
    head_before = model.fusion.weight.detach().clone()
    pretrain_file = tmp_path / "dinov2_tiny_pretrain.pth"
    assert load_weights(model, student_card, pretrain_file) == KIND_DINOV2_PRETRAIN
    assert torch.equal(model.backbone.pos_embed.detach(), pretrain["pos_embed"])
    assert torch.equal(model.fusion.weight.detach(), head_before)
    # SelaVPR: a pretrain has no adapters; they keep their identity/zero start.
    sela_raw = _official_state(reference / "selavpr_tiny.pth")
    sprefix = "module.backbone."
    sela_pre = {k[len(sprefix):]: v for k, v in sela_raw.items()
                if k.startswith(sprefix) and ".adapter" not in k}
    torch.save(sela_pre, tmp_path / "dinov2_sela_pretrain.pth")
    sela = build_model(sela_card, seed=0)
    load_weights(sela, sela_card, tmp_path / "dinov2_sela_pretrain.pth")
    assert torch.count_nonzero(sela.backbone.blocks[0].adapter1.fc2.weight) == 0
    # A pretrain of another size is refused with the offending keys named.
    with pytest.raises(CheckpointError, match="blocks.4"):
        load_weights(build_model(sela_card, seed=0), sela_card,
                     tmp_path / "dinov2_tiny_pretrain.pth")


def test_save_weights_round_trip(tmp_path, student_card, student_pth, x, sela_card):
    model = build_model(student_card, seed=0)
    load_weights(model, student_card, student_pth)
    out = save_weights(model, student_card, tmp_path / "student.safetensors")
    sidecar = card_sidecar_path(out)
    assert out.is_file() and sidecar.is_file()
    card = load_card(sidecar)
    assert card.has_weights and card.architecture == "scicevpr"
    loaded, card2, fingerprint = load_model(card, device="cpu")
    assert fingerprint == "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(CheckpointError, match="scicevpr"):
        load_weights(build_model(sela_card, seed=0), sela_card, out)


def test_card_without_weights_asks_for_weights():
    with pytest.raises(CheckpointError, match="--weights"):
        load_model("scicevpr_b")


def test_official_key_mapping_examples():
    examples = {
        "module.backbone.dino_model.blocks.3.attn.qkv.weight": "backbone.blocks.3.attn.qkv.weight",
        "module.backbone.dino_model.pos_embed": "backbone.pos_embed",
        "module.conv.weight": "fusion.weight",
        "module.tokenmix.1.mix.2.bias": "token_mixers.1.mlp.2.bias",
        "module.tokenmix.0.norm.weight": "token_mixers.0.norm.weight",
        "module.gem.p": "gem.p",
        "module.encoder.layers.0.self_attn.in_proj_weight":
            "encoder.layers.0.self_attn.in_proj_weight",
    }
    mapped, kind = official_to_ours({k: torch.zeros(1) for k in examples})
    assert kind == "scicevpr_official" and set(mapped) == set(examples.values())
    sela = {
        "module.backbone.blocks.0.adapter1.D_fc1.weight": "backbone.blocks.0.adapter1.fc1.weight",
        "module.backbone.blocks.5.adapter2.D_fc2.bias": "backbone.blocks.5.adapter2.fc2.bias",
        "module.backbone.register_tokens": "backbone.register_tokens",
        "module.aggregation.1.p": "gem.p",
        "module.LocalAdapt.upconv2.weight": "local_adapt.upconv2.weight",
    }
    mapped, kind = official_to_ours({k: torch.zeros(1) for k in sela})
    assert kind == "selavpr_official" and set(mapped) == set(sela.values())
    mapped, kind = official_to_ours({"cls_token": torch.zeros(1),
                                     "blocks.0.ls1.gamma": torch.zeros(1)})
    assert kind == "dinov2_pretrain"
    assert set(mapped) == {"backbone.cls_token", "backbone.blocks.0.ls1.gamma"}
    ours = {"backbone.cls_token": torch.zeros(1), "fusion.weight": torch.zeros(1)}
    mapped, kind = official_to_ours(ours)
    assert kind == "vpr_ros" and set(mapped) == set(ours)
