"""ROS image payload conversion: every encoding decodes to the right pixels."""

from __future__ import annotations

import array
import io

import numpy as np
import pytest

from vpr_ros.errors import ImageError, UnsupportedEncodingError
from vpr_ros.image_encoding import (SUPPORTED_ENCODINGS, compressed_to_rgb, image_fields_to_rgb,
                                    rgb_to_compressed, rgb_to_image_fields)
from vpr_ros.preprocess import load_image


@pytest.fixture(scope="module")
def sample_rgb(sample_dir):
    path = sorted((sample_dir / "images" / "test" / "queries").glob("*.jpg"))[0]
    return load_image(path)


def _decode(fields):
    return image_fields_to_rgb(fields["encoding"], fields["height"], fields["width"],
                               fields["step"], fields["is_bigendian"], fields["data"])


def _colourful(h=6, w=8):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "rgba8", "bgra8", "8UC3", "8UC4",
                                      "rgb16", "bgr16", "rgba16", "bgra16"])
def test_colour_encodings_round_trip_exactly(encoding):
    rgb = _colourful()
    for big in (False, True):
        fields = rgb_to_image_fields(rgb, encoding, is_bigendian=big)
        np.testing.assert_array_equal(_decode(fields), rgb)


def test_known_byte_layouts():
    # one red pixel and one blue pixel
    assert _decode(dict(encoding="bgr8", height=1, width=2, step=6, is_bigendian=0,
                        data=bytes([0, 0, 255, 255, 0, 0])))[0].tolist() == [
        [255, 0, 0], [0, 0, 255]]
    assert _decode(dict(encoding="8UC3", height=1, width=1, step=3, is_bigendian=0,
                        data=bytes([10, 20, 30])))[0, 0].tolist() == [30, 20, 10]
    assert _decode(dict(encoding="rgba8", height=1, width=1, step=4, is_bigendian=0,
                        data=bytes([1, 2, 3, 4])))[0, 0].tolist() == [1, 2, 3]
    mono = _decode(dict(encoding="mono8", height=1, width=2, step=2, is_bigendian=0,
                        data=bytes([7, 200])))
    assert mono.tolist() == [[[7, 7, 7], [200, 200, 200]]]


@pytest.mark.parametrize("encoding", ["mono16", "16UC1"])
def test_16_bit_mono_scaled_to_8_bit(encoding):
    values = np.array([[0, 257, 65535, 32768]], dtype=np.uint16)
    for big in (False, True):
        data = values.astype(">u2" if big else "<u2").tobytes()
        out = image_fields_to_rgb(encoding, 1, 4, 8, big, data)
        assert out[0, :, 0].tolist() == [0, 1, 255, 128]
        assert (out[..., 0] == out[..., 2]).all()


@pytest.mark.parametrize("encoding", ["mono8", "8UC1", "mono16", "16UC1"])
def test_grey_round_trip(encoding):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(_decode(rgb_to_image_fields(rgb, encoding)), rgb)


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuv422_yuy2", "yuyv"])
def test_yuv422_decodes_close_to_source(encoding, sample_rgb):
    # chroma is shared by pixel pairs: compare on an image constant over pairs
    rgb = np.repeat(sample_rgb[:, ::2], 2, axis=1)
    out = _decode(rgb_to_image_fields(rgb, encoding))
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).max() <= 3


def test_yuv422_byte_order_differs():
    grey = np.full((2, 4, 3), 128, np.uint8)
    uyvy = rgb_to_image_fields(grey, "uyvy")["data"]
    yuyv = rgb_to_image_fields(grey, "yuyv")["data"]
    assert uyvy[:4] != yuyv[:4]
    # Y=16 U=V=128 is black in limited range, Y=235 white
    black = image_fields_to_rgb("uyvy", 1, 2, 4, 0, bytes([128, 16, 128, 16]))
    white = image_fields_to_rgb("yuyv", 1, 2, 4, 0, bytes([235, 128, 235, 128]))
    assert black.max() == 0 and white.min() == 255


@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_flat_colour_is_exact(pattern):
    colour = np.array([200, 90, 30], np.uint8)
    rgb = np.broadcast_to(colour, (6, 8, 3)).copy()
    for bits in (8, 16):
        fields = rgb_to_image_fields(rgb, f"bayer_{pattern}{bits}")
        assert fields["step"] == 8 * bits // 8
        np.testing.assert_array_equal(_decode(fields), rgb)


def test_bayer_pattern_position():
    # rggb: top-left sample is red
    raw = np.zeros((4, 4), np.uint8)
    raw[0::2, 0::2] = 255
    out = image_fields_to_rgb("bayer_rggb8", 4, 4, 4, 0, raw.tobytes())
    assert out[0, 0].tolist() == [255, 0, 0]
    out = image_fields_to_rgb("bayer_bggr8", 4, 4, 4, 0, raw.tobytes())
    assert out[0, 0].tolist() == [0, 0, 255]


def test_padded_step_and_buffer_types():
    rgb = _colourful(3, 5)
    rows = [rgb[r].tobytes() + b"\x00\x00" for r in range(3)]
    data = b"".join(rows)
    for buf in (data, bytearray(data), memoryview(data), array.array("B", data),
                np.frombuffer(data, np.uint8)):
        np.testing.assert_array_equal(image_fields_to_rgb("rgb8", 3, 5, 17, 0, buf), rgb)


@pytest.mark.parametrize("kwargs, message", [
    (dict(step=10), "step"),                      # smaller than a row
    (dict(data=b"\x00" * 20), "truncated"),
    (dict(data=b"\x00" * 40), "more than"),
    (dict(height=0, data=b""), "zero size"),
    (dict(width=0, step=0, data=b""), "zero size"),
])
def test_bad_geometry_raises_image_error(kwargs, message):
    args = dict(encoding="rgb8", height=2, width=4, step=12, is_bigendian=0, data=b"\x00" * 24)
    args.update(kwargs)
    with pytest.raises(ImageError, match=message):
        image_fields_to_rgb(**args)


def test_odd_width_yuv_rejected():
    with pytest.raises(ImageError, match="even width"):
        image_fields_to_rgb("yuyv", 1, 3, 6, 0, b"\x00" * 6)


@pytest.mark.parametrize("encoding", ["32FC1", "nv12", "", "hsv8"])
def test_unknown_encoding(encoding):
    with pytest.raises(UnsupportedEncodingError):
        image_fields_to_rgb(encoding, 1, 1, 4, 0, b"\x00" * 4)
    assert issubclass(UnsupportedEncodingError, ImageError)


def test_supported_list_is_complete():
    for enc in SUPPORTED_ENCODINGS:
        fields = rgb_to_image_fields(np.zeros((2, 4, 3), np.uint8), enc)
        assert _decode(fields).shape == (2, 4, 3)


def test_compressed_round_trip(sample_rgb):
    fmt, png = rgb_to_compressed(sample_rgb, "png")
    assert fmt == "png"
    np.testing.assert_array_equal(compressed_to_rgb(fmt, png), sample_rgb)
    fmt, jpg = rgb_to_compressed(sample_rgb, "jpeg", quality=95)
    out = compressed_to_rgb("bgr8; jpeg compressed bgr8", np.frombuffer(jpg, np.uint8))
    assert np.abs(out.astype(int) - sample_rgb.astype(int)).mean() < 3


def test_corrupt_or_empty_compressed():
    _, jpg = rgb_to_compressed(_colourful(16, 16), "jpeg")
    with pytest.raises(ImageError):
        compressed_to_rgb("jpeg", jpg[: len(jpg) // 3])
    with pytest.raises(ImageError):
        compressed_to_rgb("jpeg", b"")
    with pytest.raises(ImageError):
        compressed_to_rgb("jpeg", b"not an image at all")


def test_mono16_frame_is_the_same_raw_or_png_compressed(tmp_path):
    """A mono16 camera frame (values far above 255) decodes alike as a raw Image message
    and through the png compressed transport (a 16-bit PNG) and as a 16-bit PNG file:
    scaled over the 16-bit range, never clipped to white."""
    from PIL import Image

    rng = np.random.default_rng(4)
    frame = rng.integers(0, 65536, size=(24, 32), dtype=np.uint16)
    frame[0, :4] = (0, 4000, 32768, 65535)
    raw = image_fields_to_rgb("mono16", 24, 32, 64, False, frame.astype("<u2").tobytes())
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    png = compressed_to_rgb("png", buf.getvalue())
    (tmp_path / "f.png").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(png, raw)
    np.testing.assert_array_equal(load_image(tmp_path / "f.png"), raw)
    assert png[0, :4, 0].tolist() == [0, 16, 128, 255]
    # mode I (32-bit integers): how Pillow before 10.3 (ROS Jazzy's python3-pil) opens a
    # 16-bit PNG; the same frame stored that way decodes alike
    Image.fromarray(frame.astype(np.int32)).save(tmp_path / "f.tif")
    with Image.open(tmp_path / "f.tif") as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif"), raw)
