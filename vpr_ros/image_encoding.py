"""ROS image payloads <-> RGB uint8 arrays, without ROS.

``sensor_msgs/Image`` is described by six fields (encoding, height, width, step,
is_bigendian, data); ``sensor_msgs/CompressedImage`` by (format, data).  This module turns
those fields into the RGB uint8 (H, W, 3) array every other part of the package takes,
and back (for writing bags and debug images).  It never imports ROS, so bags read with
``rosbags``, messages received by rclpy and unit tests all share one implementation.

Conversions (documented in docs/ros.md):

* 8-bit colour: rgb8, bgr8, rgba8, bgra8, 8UC3 (taken as BGR, as OpenCV does), 8UC4 (BGRA).
* Grey: mono8 / 8UC1 (replicated to three channels).
* 16-bit: mono16 / 16UC1, rgb16, bgr16, rgba16, bgra16: linearly scaled to 8 bit over the
  full range (``round(v * 255 / 65535)``), byte order from ``is_bigendian``.
* YUV 4:2:2: ``yuv422`` / ``uyvy`` (U Y0 V Y1) and ``yuv422_yuy2`` / ``yuyv`` (Y0 U Y1 V),
  ITU-R BT.601 limited range (the coefficients OpenCV uses).
* Bayer: bayer_rggb8 / bggr8 / gbrg8 / grbg8 (and the 16-bit variants): bilinear
  demosaic by normalised convolution (exact on flat colour, no edge artefacts at borders).
"""

from __future__ import annotations

import io
from typing import Dict, Optional, Tuple, Union

import numpy as np

from .errors import ImageError, UnsupportedEncodingError
from .preprocess import decode_image_bytes, scale_16_to_8

Buffer = Union[bytes, bytearray, memoryview, np.ndarray, "array.array"]  # noqa: F821

# encoding -> (channels, bytes per channel)
_PLAIN = {
    "rgb8": (3, 1), "bgr8": (3, 1), "rgba8": (4, 1), "bgra8": (4, 1),
    "mono8": (1, 1), "8uc1": (1, 1), "8uc3": (3, 1), "8uc4": (4, 1),
    "mono16": (1, 2), "16uc1": (1, 2),
    "rgb16": (3, 2), "bgr16": (3, 2), "rgba16": (4, 2), "bgra16": (4, 2),
}
_BGR_ORDER = {"bgr8", "bgra8", "8uc3", "8uc4", "bgr16", "bgra16"}
_YUV = {"yuv422": "uyvy", "uyvy": "uyvy", "yuv422_yuy2": "yuyv", "yuyv": "yuyv"}
_BAYER_PATTERNS = ("rggb", "bggr", "gbrg", "grbg")
_BAYER = {f"bayer_{p}{bits}": (p, bits // 8) for p in _BAYER_PATTERNS for bits in (8, 16)}

SUPPORTED_ENCODINGS: Tuple[str, ...] = tuple(
    ["rgb8", "bgr8", "rgba8", "bgra8", "mono8", "8UC1", "8UC3", "8UC4",
     "mono16", "16UC1", "rgb16", "bgr16", "rgba16", "bgra16"]
    + list(_YUV) + list(_BAYER))


def _normalize_encoding(encoding: str) -> str:
    if not isinstance(encoding, str) or not encoding.strip():
        raise UnsupportedEncodingError(
            "image message has an empty encoding field; expected one of "
            + ", ".join(SUPPORTED_ENCODINGS))
    return encoding.strip().lower()


def _as_bytes_array(data: Buffer) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        return np.asarray(bytearray(data), dtype=np.uint8)


def _layout(encoding: str) -> Tuple[int, int]:
    """(bytes per pixel numerator, pixels per unit) for row-size checks."""
    if encoding in _PLAIN:
        ch, bpc = _PLAIN[encoding]
        return ch * bpc, 1
    if encoding in _YUV:
        return 4, 2          # 4 bytes per 2 pixels
    if encoding in _BAYER:
        return _BAYER[encoding][1], 1
    raise UnsupportedEncodingError(
        f"unsupported image encoding {encoding!r}; supported: {', '.join(SUPPORTED_ENCODINGS)} "
        "(republish the camera in one of these, e.g. with image_proc)")


def _rows(encoding: str, height: int, width: int, step: int, data: Buffer) -> np.ndarray:
    """Validate the geometry and return the pixel bytes as (height, row_bytes) uint8."""
    for name, value in (("height", height), ("width", width), ("step", step)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ImageError(f"image message has an invalid {name}: {value!r}")
    if height == 0 or width == 0:
        raise ImageError(f"image message has zero size ({width}x{height})")
    num, per = _layout(encoding)
    if encoding in _YUV and width % 2:
        raise ImageError(f"{encoding} image has an odd width {width}; "
                         "YUV 4:2:2 needs an even width")
    row_bytes = width * num // per
    if step < row_bytes:
        raise ImageError(
            f"image message step {step} is smaller than one row of {width} px in {encoding} "
            f"({row_bytes} bytes): wrong step or encoding")
    buf = _as_bytes_array(data)
    expected = step * height
    if buf.size < expected:
        raise ImageError(
            f"image message data is truncated: {buf.size} bytes, expected step*height = "
            f"{step}*{height} = {expected}")
    if buf.size > expected:
        raise ImageError(
            f"image message data has {buf.size} bytes, more than step*height = {expected}: "
            "wrong step or height")
    return buf.reshape(height, step)[:, :row_bytes]


def _to_uint16(rows: np.ndarray, is_bigendian: bool) -> np.ndarray:
    dtype = np.dtype(">u2" if is_bigendian else "<u2")
    return np.ascontiguousarray(rows).view(dtype).astype(np.uint16)


def _yuv_to_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    yf = (y.astype(np.float32) - 16.0) * 1.164
    uf = u.astype(np.float32) - 128.0
    vf = v.astype(np.float32) - 128.0
    r = yf + 1.596 * vf
    g = yf - 0.813 * vf - 0.391 * uf
    b = yf + 2.018 * uf
    return np.clip(np.rint(np.stack([r, g, b], axis=-1)), 0, 255).astype(np.uint8)


def _rgb_to_yuv(rgb: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = rgb.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b
    return y, u, v


def _bayer_masks(pattern: str, height: int, width: int) -> Dict[str, np.ndarray]:
    masks = {c: np.zeros((height, width), dtype=bool) for c in "rgb"}
    for i, c in enumerate(pattern):
        dy, dx = divmod(i, 2)
        masks[c.lower()][dy::2, dx::2] = True
    return masks


def _demosaic(raw: np.ndarray, pattern: str) -> np.ndarray:
    """Bilinear demosaic by normalised convolution (known samples kept as they are)."""
    from scipy.ndimage import convolve

    h, w = raw.shape
    masks = _bayer_masks(pattern, h, w)
    kernel = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=np.float32)
    raw_f = raw.astype(np.float32)
    out = np.empty((h, w, 3), dtype=np.float32)
    for idx, c in enumerate("rgb"):
        m = masks[c].astype(np.float32)
        num = convolve(raw_f * m, kernel, mode="constant", cval=0.0)
        den = convolve(m, kernel, mode="constant", cval=0.0)
        plane = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        out[..., idx] = np.where(masks[c], raw_f, plane)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def image_fields_to_rgb(encoding: str, height: int, width: int, step: int,
                        is_bigendian: Union[bool, int], data: Buffer) -> np.ndarray:
    """Convert the fields of a sensor_msgs/Image to RGB uint8 (height, width, 3).

    Raises UnsupportedEncodingError for an encoding not in SUPPORTED_ENCODINGS and
    ImageError for zero size, a step smaller than a row, or data of the wrong length.
    """
    out = _image_fields_to_rgb(encoding, height, width, step, is_bigendian, data)
    # a view of a read-only message buffer would be read-only: hand out a writable array
    return out if out.flags.writeable else out.copy()


def _image_fields_to_rgb(encoding: str, height: int, width: int, step: int,
                         is_bigendian: Union[bool, int], data: Buffer) -> np.ndarray:
    enc = _normalize_encoding(encoding)
    if not (enc in _PLAIN or enc in _YUV or enc in _BAYER):
        _layout(encoding.strip())
    rows = _rows(enc, int(height), int(width), int(step), data)
    h, w = int(height), int(width)
    if enc in _PLAIN:
        ch, bpc = _PLAIN[enc]
        if bpc == 2:
            pix = scale_16_to_8(_to_uint16(rows, bool(is_bigendian)))
        else:
            pix = rows
        pix = pix.reshape(h, w, ch)
        if ch == 1:
            return np.ascontiguousarray(np.repeat(pix, 3, axis=2))
        pix = pix[:, :, :3]
        if enc in _BGR_ORDER:
            pix = pix[:, :, ::-1]
        return np.ascontiguousarray(pix)
    if enc in _YUV:
        quads = rows.reshape(h, w // 2, 4)
        if _YUV[enc] == "uyvy":
            u, y0, v, y1 = (quads[..., i] for i in range(4))
        else:
            y0, u, y1, v = (quads[..., i] for i in range(4))
        y = np.stack([y0, y1], axis=-1).reshape(h, w)
        u = np.repeat(u, 2, axis=1)
        v = np.repeat(v, 2, axis=1)
        return _yuv_to_rgb(y, u, v)
    pattern, bpc = _BAYER[enc]
    raw = scale_16_to_8(_to_uint16(rows, bool(is_bigendian))) if bpc == 2 else rows
    return _demosaic(np.ascontiguousarray(raw).reshape(h, w), pattern)


def compressed_to_rgb(fmt: str, data: Buffer, max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (JPEG, PNG, ...) to RGB uint8.

    ``format`` is informative only ("jpeg", "png", "bgr8; jpeg compressed bgr8", ...): the
    bytes themselves say what they are.  Corrupt or empty data, or more than ``max_pixels``
    pixels (read from the header; default as decode_image_bytes) -> ImageError.
    """
    what = f"compressed image ({fmt or 'no format'})"
    raw = _as_bytes_array(data)
    return decode_image_bytes(raw.tobytes(), what=what, max_pixels=max_pixels)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 \
            or rgb.shape[2] != 3:
        raise ImageError("expected an RGB uint8 array of shape (H, W, 3), got "
                         f"{getattr(rgb, 'dtype', type(rgb).__name__)} "
                         f"{getattr(rgb, 'shape', '')}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"image has zero size {rgb.shape}")
    return np.ascontiguousarray(rgb)


def _grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma, as PIL convert("L")."""
    f = rgb.astype(np.float32)
    return np.clip(np.rint(0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]),
                   0, 255).astype(np.uint8)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8",
                        is_bigendian: bool = False) -> dict:
    """RGB uint8 (H, W, 3) -> dict of sensor_msgs/Image fields (encoding .. data bytes).

    The inverse of image_fields_to_rgb for every supported encoding (grey encodings store
    the luma; 16-bit encodings store v * 257; Bayer keeps one colour per pixel; YUV 4:2:2
    averages the chroma of each pixel pair).
    """
    rgb = _check_rgb(rgb)
    enc = _normalize_encoding(encoding)
    _layout(enc)  # raises UnsupportedEncodingError
    h, w = rgb.shape[:2]
    if enc in _PLAIN:
        ch, bpc = _PLAIN[enc]
        if ch == 1:
            pix = _grey(rgb)[:, :, None]
        else:
            pix = rgb[:, :, ::-1] if enc in _BGR_ORDER else rgb
            if ch == 4:
                pix = np.concatenate([pix, np.full((h, w, 1), 255, np.uint8)], axis=2)
        if bpc == 2:
            pix = (pix.astype(np.uint16) * 257).astype(">u2" if is_bigendian else "<u2")
        payload = np.ascontiguousarray(pix).tobytes()
    elif enc in _YUV:
        if w % 2:
            raise ImageError(f"{enc} needs an even width, got {w}")
        y, u, v = _rgb_to_yuv(rgb)
        u2 = u.reshape(h, w // 2, 2).mean(axis=2)
        v2 = v.reshape(h, w // 2, 2).mean(axis=2)
        y0, y1 = y[:, 0::2], y[:, 1::2]
        order = (u2, y0, v2, y1) if _YUV[enc] == "uyvy" else (y0, u2, y1, v2)
        quads = np.stack(order, axis=-1)
        payload = np.clip(np.rint(quads), 0, 255).astype(np.uint8).tobytes()
    else:
        pattern, bpc = _BAYER[enc]
        masks = _bayer_masks(pattern, h, w)
        raw = np.zeros((h, w), dtype=np.uint8)
        for idx, c in enumerate("rgb"):
            raw[masks[c]] = rgb[..., idx][masks[c]]
        if bpc == 2:
            raw = (raw.astype(np.uint16) * 257).astype(">u2" if is_bigendian else "<u2")
        payload = np.ascontiguousarray(raw).tobytes()
    step = len(payload) // h
    canonical = encoding.strip()
    return {"encoding": canonical, "height": int(h), "width": int(w), "step": int(step),
            "is_bigendian": int(bool(is_bigendian)), "data": payload}


def rgb_to_compressed(rgb: np.ndarray, fmt: str = "jpeg", quality: int = 95) -> Tuple[str, bytes]:
    """RGB uint8 -> (format, bytes) of a sensor_msgs/CompressedImage ("jpeg" or "png")."""
    from PIL import Image

    rgb = _check_rgb(rgb)
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        fmt, pil_fmt, kwargs = "jpeg", "JPEG", {"quality": int(quality)}
    elif fmt == "png":
        pil_fmt, kwargs = "PNG", {}
    else:
        raise UnsupportedEncodingError(f"unsupported compressed format {fmt!r}; use jpeg or png")
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format=pil_fmt, **kwargs)
    return fmt, buf.getvalue()
