"""Camera image -> model input, exactly as the official evaluation pipeline does it.

One implementation shared by every caller (CLI, map building, localizer, ROS node,
training).  The official ``datasets_ws.BaseDataset`` test pipeline
(``hard_resize``), used by both SciceVPR and SelaVPR, is per image:

1. RGB uint8 (PIL ``convert("RGB")``: alpha dropped, grey replicated),
2. ``/ 255`` as float32, CHW,
3. normalise with the ImageNet mean/std,
4. resize the *normalised* tensor to the model size, bilinear,
   ``align_corners=False``, **no antialiasing** (torchvision 0.15 semantics).

Step 4 runs after normalisation, as the official code does; doing it before
normalising is mathematically equal but not bit-identical.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .constants import MAX_IMAGE_PIXELS
from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

COLOR_ORDERS = ("rgb", "bgr", "mono")


# Pixel limit checked from the file header, before anything is decoded.
DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS
# Images above this many pixels are decoded at reduced size: JPEG through the decoder's
# DCT scaling (draft), other formats with a box reduce right after decoding, so the
# float copies preprocessing makes stay small.  The result keeps at least
# REDUCED_MIN_SIDE pixels on its shorter side, far more than any model input (224 px).
# Images at or below it (every usual camera frame) decode exactly as the official
# pipeline does.
REDUCE_ABOVE_PIXELS = 16_000_000
REDUCED_MIN_SIDE = 1024


def _check_pixels(width: int, height: int, max_pixels: Optional[int], what: str) -> None:
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if limit > 0 and width * height > limit:
        raise ImageError(f"{what} is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
                         f"above the limit of {limit / 1e6:g} MP; downscale it or raise the "
                         "limit (--max-pixels)")


def _decode(source, max_pixels: Optional[int], what: str) -> np.ndarray:
    """Open (header only), check the pixel count, decode (reduced if huge) to RGB uint8."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    # Our limit, checked right after the header is read, replaces PIL's process-wide
    # decompression-bomb check (a warning above 89 MP, an error above 179 MP), so the
    # limit is the one the user set and the message names the image and its size.
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # other threads
            with Image.open(source) as im:
                width, height = im.size
                _check_pixels(width, height, max_pixels, what)
                if width * height > REDUCE_ABOVE_PIXELS:
                    factor = max(1, min(width, height) // REDUCED_MIN_SIDE)
                    if im.format == "JPEG" and factor > 1:
                        im.draft("RGB", (max(1, width // factor), max(1, height // factor)))
                    im.load()
                    if factor > 1 and im.size == (width, height):
                        im = im.reduce(factor)
                else:
                    im.load()
                rgb = _wide_to_rgb8(im) if _is_wide_grey(im.mode) else im.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError,
            EOFError, IndexError, struct_error()) as exc:
        raise ImageError(f"cannot decode {what}: {' '.join(str(exc).split())}") from None
    return np.asarray(rgb, dtype=np.uint8)


def scale_16_to_8(values: np.ndarray) -> np.ndarray:
    """Full-range linear 16 -> 8 bit: round(v * 255 / 65535) (as raw mono16/rgb16 frames)."""
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _is_wide_grey(mode: str) -> bool:
    """A 16-bit grey image as PIL opens it: mode I;16* (Pillow >= 10.3), or mode I (32-bit
    integers: how Pillow before 10.3, e.g. ROS Jazzy's python3-pil 10.2, opens a 16-bit
    PNG)."""
    return mode == "I" or mode.startswith("I;16")


def _wide_to_rgb8(im) -> np.ndarray:
    """A 16-bit grey image (:func:`_is_wide_grey`: a 16-bit PNG or TIFF, e.g. a mono16
    camera frame sent through the png compressed transport) -> RGB uint8, scaled over the
    full 16-bit range like a raw mono16 message (mode I values clipped to 0..65535).
    PIL's convert("RGB") would clip every value above 255 to white."""
    grey = scale_16_to_8(np.clip(np.asarray(im), 0, 65535).astype(np.uint16))
    return np.repeat(grey[:, :, None], 3, axis=2)


def struct_error():
    import struct

    return struct.error


def load_image(path: Union[str, Path], max_pixels: Optional[int] = None) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3); ImageError if unreadable.

    ``max_pixels`` (default DEFAULT_MAX_PIXELS; 0 = no limit) is checked from the header
    before decoding; images above REDUCE_ABOVE_PIXELS are decoded at reduced size.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    return _decode(path, max_pixels, f"image {path}")


def decode_image_bytes(data: bytes, what: str = "image",
                       max_pixels: Optional[int] = None) -> np.ndarray:
    """Decode compressed image bytes (JPEG, PNG, ...) to RGB uint8; ImageError if corrupt
    or above ``max_pixels`` (as in load_image)."""
    if not data:
        raise ImageError(f"{what}: no data (0 bytes)")
    return _decode(io.BytesIO(bytes(data)), max_pixels, f"{what} (compressed image)")


def to_rgb_uint8(image: np.ndarray, color_order: str = "rgb") -> np.ndarray:
    """Normalise a camera array to contiguous RGB uint8 (H, W, 3).

    Accepts (H, W) mono, (H, W, 1), (H, W, 3) in ``color_order`` ("rgb" or "bgr"),
    and (H, W, 4) RGBA/BGRA (alpha dropped, as PIL ``convert("RGB")`` does).
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"unsupported image dtype {image.dtype}: expected uint8 (convert 16-bit or "
            "float images to 8 bit first, e.g. via the ROS image converter)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        if image.size == 0:
            raise ImageError(f"image has zero size {image.shape}")
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageError(f"unsupported image shape {image.shape}: expected (H,W), (H,W,1), "
                         "(H,W,3) or (H,W,4)")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageError(f"image has zero size {image.shape}")
    color_order = color_order.lower()
    if color_order not in COLOR_ORDERS:
        raise ImageError(f"unknown color order {color_order!r}; expected one of {COLOR_ORDERS}")
    image = image[:, :, :3]
    if color_order == "bgr":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


def preprocess(images: Union[np.ndarray, Sequence[np.ndarray]],
               size: Tuple[int, int] = (224, 224),
               color_order: str = "rgb") -> torch.Tensor:
    """Turn one image or a list of images into a (B, 3, H, W) float32 model input.

    Images may differ in size; each is resized on its own, exactly as the official
    evaluation pipeline does.
    """
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    images = list(images)
    if not images:
        raise ImageError("no images to preprocess")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    for img in images:
        rgb = to_rgb_uint8(img, color_order)
        if not rgb.flags.writeable:  # torch.from_numpy warns on read-only buffers (PIL, mmap)
            rgb = rgb.copy()
        t = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).to(torch.float32).div_(255.0)
        t = (t - mean) / std
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False,
                              antialias=False)
        out.append(t)
    return torch.cat(out, 0)


def iter_batches(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]
