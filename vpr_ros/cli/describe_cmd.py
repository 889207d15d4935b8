"""`vpr describe`: global descriptors of image files into a .npy (+ .names.txt)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, atomic_write_text, check_writable
from ..errors import ImageError
from .common import add_image_args, add_model_args, describer_from_args

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "describe", help="compute global descriptors of images",
        description="Compute one unit-length global descriptor per image and save them as "
                    "an (N, dim) float32 .npy; FILE.names.txt lists the images in row order.")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or folders (their images are taken in sorted order)")
    p.add_argument("--out", required=True, metavar="FILE.npy", help="output .npy file")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (files, count, dim, model, fingerprint) on the "
                        "last line")
    add_model_args(p)
    add_image_args(p)
    p.set_defaults(func=run)


def expand_images(items) -> list:
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                kinds = ", ".join(sorted(IMAGE_SUFFIXES))
                raise ImageError(f"folder {p} contains no images ({kinds})")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        else:
            raise ImageError(f"image file not found: {p}")
    return paths


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..preprocess import load_image

    paths = expand_images(args.images)
    out = Path(args.out)
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    check_writable(out)                     # a read-only --out fails before the model loads
    describer = describer_from_args(args)
    log.info("model %s (%s), dim %d, device %s, %s", describer.card.name,
             describer.fingerprint[:23], describer.dim, describer.device, describer.precision)
    result = np.empty((len(paths), describer.dim), dtype=np.float32)
    bs = describer.batch_size
    with tqdm(total=len(paths), desc="describe", unit="img") as bar:
        for start in range(0, len(paths), bs):
            chunk = paths[start:start + bs]
            images = [load_image(p, max_pixels=args.max_pixels) for p in chunk]
            result[start:start + len(chunk)] = describer.describe(images)
            bar.update(len(chunk))
    with atomic_path(out, suffix=".npy") as tmp:
        np.save(tmp, result)
    names = out.with_name(out.name[:-len(".npy")] + ".names.txt")
    atomic_write_text(names, "".join(f"{p}\n" for p in paths))
    print(f"wrote {out} ({len(paths)} x {describer.dim}) and {names}")
    if args.json:
        print(json.dumps({"out": str(out), "names": str(names), "count": len(paths),
                          "dim": describer.dim, "model": describer.card.name,
                          "fingerprint": describer.fingerprint,
                          "device": str(describer.device), "precision": describer.precision}))
    return 0
