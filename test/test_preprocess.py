"""Our preprocessing equals the official evaluation pipeline on the reference images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vpr_ros.errors import ImageError
from vpr_ros.preprocess import IMAGENET_STD, load_image, preprocess

# One grey level of JPEG decoder difference, after normalisation (smallest std).
ONE_GREY_LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)


@pytest.fixture(scope="module")
def stored(reference):
    data = np.load(reference / "inputs" / "preprocessed_224.npz")
    return [str(n) for n in data["image_names"]], data["images"]


def test_preprocess_matches_official_tensors(reference, stored):
    names, images = stored
    assert images.shape[1:] == (3, 224, 224)
    for i, name in enumerate(names):
        ours = preprocess(load_image(reference / "inputs" / name), (224, 224)).numpy()[0]
        diff = np.abs(ours - images[i])
        if name.lower().endswith(".png"):
            # Lossless input: bit-for-bit the same arithmetic.
            assert diff.max() < 1e-5, name
        else:
            assert diff.max() <= ONE_GREY_LEVEL + 1e-5, (name, diff.max())
            assert diff.mean() < 1e-3, (name, diff.mean())


def test_rgba_png_drops_alpha(reference):
    rgb = load_image(reference / "inputs" / "architecture.png")
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3


def test_preprocess_is_resize_after_normalise_without_antialias(reference, stored):
    names, images = stored
    name = names[0]
    rgb = load_image(reference / "inputs" / name)
    x = preprocess(rgb, (224, 224))
    # Antialiased resizing (torchvision >= 0.17 default) would differ by far more.
    t = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    aa = torch.nn.functional.interpolate((t - mean) / std, size=(224, 224), mode="bilinear",
                                         align_corners=False, antialias=True)
    assert (aa - x).abs().max() > 10 * ONE_GREY_LEVEL


@pytest.mark.parametrize("array", [
    np.zeros((0, 10, 3), np.uint8),
    np.zeros((10, 10, 3), np.uint16),
    np.zeros((10, 10, 3), np.float32),
    np.zeros((10, 10, 2), np.uint8),
])
def test_bad_arrays_raise_image_error(array):
    with pytest.raises(ImageError):
        preprocess([array])


def test_empty_and_corrupt_files(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    for path in (empty, junk, tmp_path / "missing.png"):
        with pytest.raises(ImageError):
            load_image(path)
