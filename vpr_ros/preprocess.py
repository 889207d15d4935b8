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
from typing import Iterable, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

COLOR_ORDERS = ("rgb", "bgr", "mono")


def load_image(path: Union[str, Path]) -> np.ndarray:
    """Read an image file as an RGB uint8 array (H, W, 3); ImageError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"image file is empty (0 bytes): {path}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode image {path}: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


def decode_image_bytes(data: bytes, what: str = "image") -> np.ndarray:
    """Decode compressed image bytes (JPEG, PNG, ...) to RGB uint8; ImageError if corrupt."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{what}: no data (0 bytes)")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what}: cannot decode compressed image: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8)


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
