"""PIL vs OpenCV in the node's image hot path: decode a CompressedImage (JPEG, PNG) and
turn the RGB frame into the model input, for camera-sized frames.

Run: ``python -m benchmarks.bench_decode [--repeats N] [--out FILE.json]`` (needs
``opencv-python-headless``, not a dependency of the package: the numbers decide whether it
becomes one; see docs/image_decoding.md).  Variants are timed interleaved in the same run
and reported as medians and ratios; outputs are compared with the package's path.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python benchmarks/x.py`: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = ((640, 480), (1280, 720), (1920, 1080))
MODEL_SIZE = (224, 224)


def camera_frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A natural-looking RGB frame: a real sample image scaled up, with sensor noise."""
    from PIL import Image

    from vpr_ros.preprocess import load_image

    repo = Path(__file__).resolve().parents[1]
    src = sorted((repo / "samples" / "nordland_mini").rglob("*.jpg"))[0]
    big = Image.fromarray(load_image(src)).resize((width, height), Image.BICUBIC)
    rng = np.random.default_rng(seed)
    noisy = np.asarray(big, dtype=np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def encode(rgb: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pil_decode(data: bytes) -> np.ndarray:
    from vpr_ros.preprocess import decode_image_bytes

    return decode_image_bytes(data)


def cv2_decode(data: bytes) -> np.ndarray:
    import cv2

    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def torch_preprocess(rgb: np.ndarray):
    from vpr_ros.preprocess import preprocess

    return preprocess(rgb, MODEL_SIZE)


def cv2_preprocess(rgb: np.ndarray):
    """The same steps with cv2.resize (bilinear, half-pixel centres, on the normalised
    float32 image as the official pipeline resizes after normalising)."""
    import cv2
    import torch

    from vpr_ros.preprocess import IMAGENET_MEAN, IMAGENET_STD

    x = (rgb.astype(np.float32) / 255.0 - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    x = cv2.resize(x, MODEL_SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def timed(fns: dict, arg, repeats: int) -> dict:
    """Median milliseconds per call, variants interleaved (same machine state)."""
    times = {k: [] for k in fns}
    for f in fns.values():
        f(arg)
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f(arg)
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def run(repeats: int, threads: int) -> dict:
    import cv2
    import PIL
    import torch

    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    rows = []
    for w, h in SIZES:
        rgb = camera_frame(w, h)
        row = {"size": f"{w}x{h}"}
        for fmt in ("JPEG", "PNG"):
            data = encode(rgb, fmt)
            t = timed({"pil": pil_decode, "cv2": cv2_decode}, data, repeats)
            a, b = pil_decode(data), cv2_decode(data)
            row[fmt] = {"kb": round(len(data) / 1024), "pil_ms": t["pil"], "cv2_ms": t["cv2"],
                        "max_abs_diff": int(np.abs(a.astype(int) - b.astype(int)).max())}
        t = timed({"torch": torch_preprocess, "cv2": cv2_preprocess}, rgb, repeats)
        diff = float((torch_preprocess(rgb) - cv2_preprocess(rgb)).abs().max())
        row["preprocess"] = {"torch_ms": t["torch"], "cv2_ms": t["cv2"], "max_abs_diff": diff}
        rows.append(row)
    return {"rows": rows, "repeats": repeats, "threads": threads, "versions": {
        "opencv": cv2.__version__, "pillow": PIL.__version__, "torch": torch.__version__}}


def markdown(res: dict) -> str:
    lines = ["| frame | JPEG KB | JPEG PIL ms | JPEG cv2 ms | PNG KB | PNG PIL ms | PNG cv2 ms "
             "| to 224x224 torch ms | cv2 ms |", "|" + " --- |" * 9]
    for r in res["rows"]:
        j, p, q = r["JPEG"], r["PNG"], r["preprocess"]
        lines.append(f"| {r['size']} | {j['kb']} | {j['pil_ms']:.2f} | {j['cv2_ms']:.2f} | "
                     f"{p['kb']} | {p['pil_ms']:.2f} | {p['cv2_ms']:.2f} | "
                     f"{q['torch_ms']:.2f} | {q['cv2_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()
    res = run(args.repeats, args.threads)
    print(json.dumps(res, indent=1))
    print(markdown(res))
    if args.out:
        from vpr_ros.atomic import atomic_write_json
        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
