"""GlobalDescriber / LocalFeatureExtractor behaviour with tiny models and real images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from vpr_ros.errors import CheckpointError, DeviceError, ImageError, ModelCardError
from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
from vpr_ros.models.cards import card_from_dict, default_card_name, load_card
from vpr_ros.models.checkpoint import save_weights
from vpr_ros.models.factory import build_model
from vpr_ros.preprocess import load_image


@pytest.fixture(scope="module")
def sample_images(sample_dir):
    paths = sorted((sample_dir / "images" / "test" / "queries").glob("*.jpg"))[:6]
    return [load_image(p) for p in paths]


@pytest.fixture(scope="module")
def describer():
    return GlobalDescriber("scicevpr_tiny_random", device="cpu", batch_size=4)


def test_default_describer_shapes_and_norms(describer, sample_images):
    assert describer.card.name == "scicevpr_tiny_random"
    assert describer.fingerprint == "random:1234:scicevpr_tiny_random"
    assert describer.input_size == (224, 224)
    d = describer.describe(sample_images)
    assert d.shape == (len(sample_images), describer.dim) and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    assert describer.describe([]).shape == (0, describer.dim)


def test_describe_files_is_describe_of_the_decoded_files_in_order(describer, sample_dir):
    paths = sorted((sample_dir / "images" / "test" / "queries").glob("*.jpg"))[:7]
    want = describer.describe([load_image(p) for p in paths])
    np.testing.assert_array_equal(describer.describe_files(paths, chunk=3), want)
    assert describer.describe_files([]).shape == (0, describer.dim)


def test_describe_is_batch_invariant(describer, sample_images):
    full = describer.describe(sample_images)              # batches of 4 + 2
    one = np.concatenate([describer.describe([im]) for im in sample_images])
    mixed = describer.describe([sample_images[3], sample_images[0], sample_images[5]])
    assert np.abs(full - one).max() < 1e-6
    assert np.abs(mixed - full[[3, 0, 5]]).max() < 1e-6


def test_seeded_random_cards_are_reproducible(sample_images, describer):
    again = GlobalDescriber("scicevpr_tiny_random", device="cpu")
    assert np.array_equal(again.describe(sample_images[:2]), describer.describe(sample_images[:2]))


def test_color_order_and_single_image(describer, sample_images):
    rgb = sample_images[0]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    a = describer.describe([rgb])
    b = describer.describe([bgr], color_order="bgr")
    assert np.array_equal(a, b)
    assert np.array_equal(describer.describe(rgb), a)


@pytest.mark.parametrize("bad", [
    np.zeros((0, 0, 3), np.uint8),
    np.zeros((32, 32, 3), np.uint16),
    np.zeros((32, 32, 3), np.float32),
])
def test_bad_images(describer, bad):
    with pytest.raises(ImageError):
        describer.describe([bad])


def test_describe_tensor_checks_size(describer):
    with pytest.raises(ImageError, match="224"):
        describer.describe_tensor(torch.zeros(1, 3, 112, 112))
    out = describer.describe_tensor(torch.zeros(2, 3, 224, 224))
    assert out.shape == (2, describer.dim) and out.dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu():
    for device in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="CUDA is not available"):
            GlobalDescriber("scicevpr_tiny_random", device=device)
    with pytest.raises(DeviceError, match="unknown device"):
        GlobalDescriber("scicevpr_tiny_random", device="tpu")
    assert GlobalDescriber("scicevpr_tiny_random", device="auto").device.type == "cpu"


def test_fp16_on_cpu_is_refused():
    with pytest.raises(DeviceError, match="fp16"):
        GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="fp16")
    with pytest.raises(DeviceError, match="precision"):
        # int8 is valid on the CPU, int4 is not a precision
        GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="int4")


def test_bf16_close_to_fp32(describer, sample_images):
    bf16 = GlobalDescriber("scicevpr_tiny_random", device="cpu", precision="bf16")
    a = describer.describe(sample_images)
    b = bf16.describe(sample_images)
    assert b.dtype == np.float32
    cos = (a * b).sum(axis=1)
    print(f"bf16 vs fp32 descriptor cosine: min {cos.min():.5f} mean {cos.mean():.5f}")
    assert cos.min() >= 0.99


def test_card_without_weights_or_seed():
    with pytest.raises(CheckpointError, match="--weights"):
        GlobalDescriber("selavpr_vitl14", device="cpu")


def test_weights_file_fingerprint_and_official_file(reference, tmp_path, sample_images):
    config = json.loads((reference / "scicevpr_student_tiny.config.json").read_text())
    from vpr_ros.models.cards import card_from_reference_config

    card = card_from_reference_config(config, "student_tiny")
    card_path = tmp_path / "student_tiny.yaml"
    card_path.write_text(yaml.safe_dump(card.to_dict()))
    g = GlobalDescriber(str(card_path), weights=reference / config["checkpoint"], device="cpu")
    import hashlib
    digest = hashlib.sha256((reference / config["checkpoint"]).read_bytes()).hexdigest()
    assert g.fingerprint == f"sha256:{digest}"
    x = torch.from_numpy(np.load(reference / "inputs" / "preprocessed_224.npz")["images"])
    expected = np.load(reference / config["expected_outputs"])["desc_batch"]
    np.testing.assert_allclose(g.describe_tensor(x).numpy(), expected, atol=1e-4, rtol=0)


def test_local_feature_extractor(sample_images):
    ex = LocalFeatureExtractor("selavpr_tiny_random", device="cpu", batch_size=4)
    assert ex.local_shape == (61, 61, 16) and ex.global_dim == 48
    g, loc = ex.extract(sample_images[:5])
    assert g.shape == (5, 48) and g.dtype == np.float32
    assert loc.shape == (5, 61, 61, 16) and loc.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(loc.astype(np.float32), axis=-1), 1.0, atol=2e-3)
    # The SelaVPR global branch also works as a plain describer.
    d = GlobalDescriber("selavpr_tiny_random", device="cpu").describe(sample_images[:5])
    assert np.abs(d - g).max() < 1e-6
    with pytest.raises(ModelCardError, match="SelaVPR"):
        LocalFeatureExtractor("scicevpr_tiny_random", device="cpu")


def test_position_embedding_cache_and_native_grid():
    model = build_model("scicevpr_tiny_random", seed=0).eval()
    bb = model.backbone
    assert bb.blocks[0].attn.fused_attn  # scaled_dot_product_attention
    with torch.inference_mode():
        first = bb.position_embedding((16, 16))
        assert bb.position_embedding((16, 16)) is first
    with torch.no_grad():
        bb.pos_embed.add_(1.0)   # weights changed -> cache invalidated
    with torch.inference_mode():
        second = bb.position_embedding((16, 16))
    assert second is not first and not torch.equal(second, first)
    model.train()
    assert bb.position_embedding((16, 16)).requires_grad
    # Demo-style model: 112 px input, patch 7, stored grid 16 -> table used as is.
    card = card_from_dict(dict(
        name="demo_like", architecture="scicevpr", input_size=[112, 112],
        backbone=dict(embed_dim=24, depth=2, num_heads=2, patch_size=7, pos_embed_grid=16),
        head=dict(out_indices=[0, 1], mix_in_dim=8, token_num=1, token_ratio=1,
                  encoder_layers=1, encoder_heads=2, encoder_ffn=16)))
    demo = build_model(card, seed=0).eval()
    assert demo.backbone.position_embedding((16, 16)) is demo.backbone.pos_embed
    with torch.inference_mode():
        assert demo.backbone.position_embedding((16, 16)) is demo.backbone.pos_embed
    with torch.no_grad():
        assert demo(torch.zeros(2, 3, 112, 112)).shape == (2, 14 * 8)


def test_default_card_prefers_demo_with_weights(tmp_path, monkeypatch, repo_root):
    for f in (repo_root / "models").glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    monkeypatch.setenv("VPR_MODELS_DIR", str(tmp_path))
    demo = load_card("scicevpr_tiny_random").replace(name="demo_tiny", random_init_seed=None,
                                                     weights="demo_tiny.safetensors")
    (tmp_path / "demo_tiny.yaml").write_text(yaml.safe_dump(demo.to_dict()))
    assert default_card_name() == "scicevpr_tiny_random"       # weights not there yet
    save_weights(build_model("scicevpr_tiny_random", seed=5), demo,
                 tmp_path / "demo_tiny.safetensors")
    assert default_card_name() == "demo_tiny"
    g = GlobalDescriber(device="cpu")
    assert g.card.name == "demo_tiny" and g.fingerprint.startswith("sha256:")
