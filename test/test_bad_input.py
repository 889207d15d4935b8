"""The bad-input corpus: every hostile-but-realistic input gives one clear line.

Each case runs the real `vpr` command (a subprocess with ``-q``: no progress bars, no
informational log lines) on real files and asserts: the exit status (2 for input
errors), exactly one stderr line naming the file or parameter, no "Traceback", and that
data which existed before (a map, an output file) is byte-identical afterwards.

Categories: parameters, images, poses CSVs, map files (each file deleted, truncated,
bit-flipped, header-corrupted, under each --verify mode), local features of a map
(float16 and int8 storage: truncated, missing, a folder, lying .npy headers, bad int8
scales, non-finite data under --verify size/none), weights (garbage, truncated,
malicious pickles that must not run), devices, bags (an undecodable message is skipped
and counted), disk full (a small tmpfs, root only), read-only folders (a read-only tmpfs,
root only), concurrent writers, and a kill between the two renames of a map swap.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sqlite3
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.maps import benchmark_source, build_map

REPO = Path(__file__).resolve().parents[1]
CARD = "scicevpr_tiny_random"
N_PLACES = 8
TOPIC = "/camera/image_raw"


# --------------------------------------------------------------------------- helpers

def run_vpr(*args, timeout: float = 600, env: dict | None = None,
            python_code: str | None = None, quiet: bool = True) -> subprocess.CompletedProcess:
    """Run `vpr -q ARGS` (or ``python -c python_code ARGS``) in a fresh process."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    head = ([sys.executable, "-c", python_code] if python_code is not None
            else [sys.executable, "-m", "vpr_ros.cli.main"])
    return subprocess.run(head + (["-q"] if quiet else []) + [str(a) for a in args],
                          capture_output=True,
                          text=True, env=full_env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    err = proc.stderr
    assert "Traceback" not in err, err
    assert proc.returncode == rc, f"exit {proc.returncode}, stderr:\n{err}"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("vpr ") and ": error: " in line, line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) -> its bytes."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


def leftovers(folder: Path, name: str) -> list:
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(f".{name}.") and not p.name.endswith(".lock"))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def png_header_only(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims width x height RGB pixels but whose data is
    one compressed row of zeros (a decompression bomb's shape, without the bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def entries(sample_dir):
    return benchmark_source(sample_dir, "database")


@pytest.fixture(scope="module")
def small_map(tmp_path_factory, entries):
    from vpr_ros.inference import GlobalDescriber

    out = tmp_path_factory.mktemp("bad_input") / "m"
    build_map(entries[:N_PLACES], out, GlobalDescriber(CARD, device="cpu"), progress=False,
              command="pytest")
    return out


@pytest.fixture()
def map_copy(tmp_path, small_map):
    out = tmp_path / "m"
    shutil.copytree(small_map, out)
    return out


def image_folder(folder: Path, entries, start: int, count: int) -> tuple:
    """``count`` sample images copied to ``folder`` with a poses CSV beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["filename,x,y"]
    for i, e in enumerate(entries[start:start + count]):
        name = f"img{start + i}.jpg"
        shutil.copy(e.path, folder / name)
        rows.append(f"{name},{e.position[0]},{e.position[1]}")
    csv_path = folder.parent / f"{folder.name}.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return folder, csv_path


# --------------------------------------------------------------------------- parameters

PARAMETER_CASES = [
    (["describe", "IMG", "--out", "OUT", "--batch-size", "0"], "--batch-size"),
    (["describe", "IMG", "--out", "OUT", "--batch-size", "-3"], "--batch-size"),
    (["describe", "IMG", "--out", "OUT", "--batch-size", "many"], "--batch-size"),
    (["describe", "IMG", "--out", "OUT", "--max-pixels", "-1"], "--max-pixels"),
    (["localize", "IMG", "--map", "MAP", "--batch-size", "0"], "--batch-size"),
    (["map", "build", "OUT", "--dataset", "DATA", "--batch-size", "0"], "--batch-size"),
    (["map", "build", "OUT", "--dataset", "DATA", "--pca-dim", "0"], "--pca-dim"),
    (["map", "build", "OUT", "--dataset", "DATA", "--min-distance", "nan"], "--min-distance"),
    (["map", "add", "MAP", "--dataset", "DATA", "--wait-lock", "-1"], "--wait-lock"),
    (["eval", "bag", "BAG", "--map", "MAP", "--image-topic", TOPIC, "--top-k", "0"], "--top-k"),
    (["eval", "bag", "BAG", "--map", "MAP", "--image-topic", TOPIC,
      "--confidence-threshold", "1.5"], "--confidence-threshold"),
    (["bag", "from-images", "--dataset", "DATA", "--out", "OUT", "--rate", "0"], "--rate"),
]


@pytest.mark.parametrize("argv, needle", PARAMETER_CASES,
                         ids=[" ".join(a[:2]) + " " + a[-2] + "=" + a[-1]
                              for a, _ in PARAMETER_CASES])
def test_bad_parameter_is_refused_before_any_work(argv, needle, tmp_path, sample_dir,
                                                  small_map):
    out = tmp_path / "out.npy"
    out.write_bytes(b"old output")
    subst = {"IMG": str(sample_dir / "images"), "OUT": str(out), "MAP": str(small_map),
             "DATA": str(sample_dir), "BAG": str(tmp_path / "nobag")}
    before = snapshot(small_map)
    proc = run_vpr(*[subst.get(a, a) for a in argv], timeout=120)
    assert_one_line_error(proc, needle, "--help")
    assert out.read_bytes() == b"old output" and snapshot(small_map) == before


# --------------------------------------------------------------------------- images

def _truncated_jpeg(sample: Path) -> bytes:
    return sample.read_bytes()[:200]


IMAGE_CASES = {
    "truncated-jpeg": ("bad.jpg", _truncated_jpeg, "bad.jpg"),
    "garbage": ("bad.jpg", lambda s: os.urandom(3000), "bad.jpg"),
    "huge-png-header": ("bomb.png", lambda s: png_header_only(20000, 20000),
                        "20000x20000"),
    "text-as-png": ("notes.png", lambda s: b"these are my notes, not an image\n" * 20,
                    "notes.png"),
    "empty": ("empty.jpg", lambda s: b"", "empty"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_file(case, tmp_path, entries):
    name, make, needle = IMAGE_CASES[case]
    bad = tmp_path / name
    bad.write_bytes(make(entries[0].path))
    out = tmp_path / "desc.npy"
    out.write_bytes(b"old descriptors")
    proc = run_vpr("describe", entries[0].path, bad, "--out", out, "--model", CARD,
                   "--device", "cpu")
    assert_one_line_error(proc, needle, str(bad))
    assert out.read_bytes() == b"old descriptors"


def test_pixel_limit_is_an_option_checked_from_the_header(tmp_path, entries):
    out = tmp_path / "desc.npy"
    proc = run_vpr("describe", entries[0].path, "--out", out, "--model", CARD,
                   "--device", "cpu", "--max-pixels", "1000")
    assert_one_line_error(proc, entries[0].path.name, "megapixels", "--max-pixels")
    assert not out.exists()


def test_pixel_limit_and_reduced_decoding_in_the_core(tmp_path):
    """The decoding functions take the limit as a parameter (the ROS node counts the
    ImageError as a bad frame); images above REDUCE_ABOVE_PIXELS decode reduced."""
    from PIL import Image

    from vpr_ros.errors import ImageError
    from vpr_ros.preprocess import (DEFAULT_MAX_PIXELS, REDUCED_MIN_SIDE, decode_image_bytes,
                                    load_image)
    from vpr_ros.cli.common import DEFAULT_MAX_PIXELS as CLI_DEFAULT

    assert CLI_DEFAULT == DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="20000x20000"):
        decode_image_bytes(png_header_only(20000, 20000))
    with pytest.raises(ImageError, match="above the limit"):
        decode_image_bytes(png_header_only(300, 300), max_pixels=300 * 299)
    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 3000), (90, 120, 200)).save(big, quality=80)   # 18 MP
    rgb = load_image(big)
    assert min(rgb.shape[:2]) >= REDUCED_MIN_SIDE and rgb.shape[1] < 6000
    assert rgb.shape[1] * 3000 == rgb.shape[0] * 6000                         # aspect kept
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), (90, 120, 200), atol=3)
    with pytest.raises(ImageError, match="above the limit"):
        load_image(big, max_pixels=10_000_000)


def test_large_legal_image_memory_stays_bounded(tmp_path):
    """Peak memory of decoding + preprocessing a 36 MP JPEG, reduced decoding vs full
    decoding, in the same run (a ratio, no absolute number)."""
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (7200, 5000), (10, 200, 30)).save(big, quality=70)
    code = ("import resource, sys\n"
            "import vpr_ros.preprocess as p\n"
            "if sys.argv[2] == 'full': p.REDUCE_ABOVE_PIXELS = 10**12\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "x = p.preprocess(p.load_image(sys.argv[1]), (224, 224))\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    peaks = {}
    for mode in ("reduced", "full"):
        proc = subprocess.run([sys.executable, "-c", code, str(big), mode], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        peaks[mode] = int(proc.stdout.split()[-1])
    assert peaks["reduced"] * 4 < peaks["full"], peaks


# --------------------------------------------------------------------------- poses CSVs

CSV_CASES = {
    "binary": (lambda rows: b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" + os.urandom(200),
               "UTF-8"),
    "nul-bytes": (lambda rows: rows.encode().replace(b",", b"\x00", 3), "poses.csv"),
    "missing-x-column": (lambda rows: rows.replace("filename,x,y", "filename,lat,y").encode(),
                         "x / east_m"),
    "nan-value": (lambda rows: rows.replace(rows.splitlines()[2].split(",")[1], "nan", 1)
                  .encode(), "not finite"),
    "text-value": (lambda rows: rows.replace(rows.splitlines()[2].split(",")[1], "east", 1)
                   .encode(), "not a number"),
    "header-only": (lambda rows: b"filename,x,y\n", "no rows"),
}


@pytest.mark.parametrize("case", sorted(CSV_CASES))
def test_bad_poses_csv(case, tmp_path, entries, map_copy):
    folder, csv_path = image_folder(tmp_path / "imgs", entries, 0, 3)
    make, needle = CSV_CASES[case]
    bad = tmp_path / "poses.csv"
    bad.write_bytes(make(csv_path.read_text()))
    before = snapshot(map_copy)
    proc = run_vpr("map", "build", map_copy, "--overwrite", "--images", folder, "--poses",
                   bad, "--model", CARD, "--device", "cpu")
    assert_one_line_error(proc, needle)
    assert snapshot(map_copy) == before


def test_binary_poses_csv_of_a_benchmark_dataset(tmp_path, entries, map_copy):
    data = tmp_path / "ds"
    (data / "images" / "test" / "database").mkdir(parents=True)
    for e in entries[:3]:
        shutil.copy(e.path, data / "images" / "test" / "database" / e.path.name)
    (data / "poses_database.csv").write_bytes(b"\xff\xfe\x00binary" + os.urandom(100))
    before = snapshot(map_copy)
    proc = run_vpr("map", "build", map_copy, "--overwrite", "--dataset", data, "--model",
                   CARD, "--device", "cpu")
    assert_one_line_error(proc, "poses_database.csv", "UTF-8")
    assert snapshot(map_copy) == before


# --------------------------------------------------------------------------- map files

MAP_FILES = ["manifest.json", "places.csv", "poses.npy", "stamps.npy", "descriptors.npy",
             "index.faiss"]
CORRUPTIONS = ["deleted", "truncated", "bit-flipped", "header-corrupted"]
VERIFY = ["full", "size", "none"]


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "deleted":
        path.unlink()
        return
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "bit-flipped":
        data[len(data) * 3 // 4] ^= 0x10
    elif how == "header-corrupted":
        if path.suffix == ".npy":          # inside the header dict (was a TokenError)
            data[10:40] = b"(" * 30
        else:
            data[0:12] = b"\x00\xff{[(garbage"[:12]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("how", CORRUPTIONS)
@pytest.mark.parametrize("name", MAP_FILES)
def test_corrupt_map_file_is_named(name, how, verify, tmp_path, small_map, capfd):
    """`vpr map info` in process (fast; the same main() the command runs): one line naming
    the damaged file, or, only where the check cannot see it (a flipped data bit under
    --verify size/none), a map that opens."""
    from vpr_ros.cli.main import main

    if name == "manifest.json" and how == "bit-flipped":
        pytest.skip("the manifest carries the checksums; its own integrity is JSON + "
                    "schema checks (header-corrupted / truncated cases)")
    bad = tmp_path / "m"
    shutil.copytree(small_map, bad)
    corrupt(bad / name, how)
    before = snapshot(bad)
    capfd.readouterr()
    rc = main(["map", "info", str(bad), "--verify", verify])
    err = capfd.readouterr().err
    assert "Traceback" not in err
    if rc == 0:
        assert how == "bit-flipped" and verify != "full", err
    else:
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1, err
        assert name in lines[0] and ("vpr map build" in lines[0] or "not found" in lines[0]), \
            lines[0]
    assert snapshot(bad) == before                         # readers never write


def test_corrupt_map_header_in_a_subprocess(tmp_path, small_map):
    """The probe's case end to end: a corrupted .npy header under the default --verify."""
    bad = tmp_path / "m"
    shutil.copytree(small_map, bad)
    corrupt(bad / "descriptors.npy", "header-corrupted")
    proc = run_vpr("map", "info", bad, "--verify", "size")
    assert_one_line_error(proc, "descriptors.npy is corrupt", "vpr map build")


# --------------------------------------------------------------------------- local features
# A map built with --local-features (float16 or int8 storage): its local_features.npy
# (N,H,W,C) and, for int8, local_scales.npy (N,H,W) damaged in every way a disk or a copy
# can, opened by `vpr localize` (which re-ranks with them) under each --verify mode.

LOCAL_CARD = "selavpr_tiny_random"
LOCAL_PLACES = 4
LF, LS = "local_features.npy", "local_scales.npy"


@pytest.fixture(scope="module")
def local_maps(tmp_path_factory, entries):
    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor

    root = tmp_path_factory.mktemp("bad_local")
    describer = GlobalDescriber(CARD, device="cpu")
    local = LocalFeatureExtractor(LOCAL_CARD, device="cpu")
    for storage in ("float16", "int8"):
        build_map(entries[:LOCAL_PLACES], root / storage, describer, local_extractor=local,
                  local_storage=storage, progress=False, command="pytest")
    return root


def rewrite_npy_header(path: Path, shape=None, dtype=None) -> None:
    """Keep the data bytes, write a different (well-formed) header: a lying shape/dtype."""
    from numpy.lib import format as npy_format

    arr = np.load(path, mmap_mode="r")
    with open(path, "rb") as fh:
        npy_format.read_magic(fh)
        npy_format.read_array_header_1_0(fh)
        data = fh.read()
    header = {"descr": npy_format.dtype_to_descr(np.dtype(dtype or arr.dtype)),
              "fortran_order": False, "shape": tuple(shape or arr.shape)}
    del arr
    with open(path, "wb") as fh:
        npy_format.write_array_header_1_0(fh, header)
        fh.write(data)


def damage_local(folder: Path, how: str) -> str:
    """Damage a map's local feature files; returns the name of the damaged file."""
    n, h, w, c = np.load(folder / LF, mmap_mode="r").shape
    target = LS if how.startswith("scales-") else LF
    path = folder / target
    if how.endswith("truncated"):
        path.write_bytes(path.read_bytes()[:-1000])
    elif how.endswith("missing"):
        path.unlink()
    elif how == "folder":
        path.unlink()
        path.mkdir()
    elif how == "n-plus-one":
        rewrite_npy_header(path, (n + 1, h, w, c))
    elif how == "n-minus-one":
        rewrite_npy_header(path, (n - 1, h, w, c))
    elif how == "wrong-c":
        rewrite_npy_header(path, (n, h, w, c - 1))
    elif how == "wrong-hw":
        rewrite_npy_header(path, (n, h * w, 1, c))
    elif how == "wrong-dtype":            # float16 <-> float32 / int8 <-> float16, same bytes
        stored = np.load(path, mmap_mode="r").dtype
        wide = np.float32 if stored == np.float16 else np.float16
        rewrite_npy_header(path, (n, h, w, c * stored.itemsize // np.dtype(wide).itemsize),
                           wide)
    elif how == "scales-wrong-shape":
        rewrite_npy_header(path, (n, h * w))
    elif how == "scales-n-minus-one":
        rewrite_npy_header(path, (n - 1, h, w))
    elif how == "scales-wrong-dtype":
        rewrite_npy_header(path, (n, h, w), np.float32)
    elif how == "header-corrupted":
        data = bytearray(path.read_bytes())
        data[10:40] = b"(" * 30
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(how)
    return target


LOCAL_DAMAGE = ["truncated", "missing", "folder", "header-corrupted", "n-plus-one",
                "n-minus-one", "wrong-c", "wrong-hw", "wrong-dtype"]
SCALES_DAMAGE = ["scales-truncated", "scales-missing", "scales-wrong-shape",
                 "scales-n-minus-one", "scales-wrong-dtype"]
LOCAL_CASES = ([("float16", how) for how in LOCAL_DAMAGE]
               + [("int8", how) for how in LOCAL_DAMAGE + SCALES_DAMAGE])


def _localize_in_process(capfd, map_dir: Path, query: Path, verify: str) -> tuple:
    from vpr_ros.cli.main import main

    capfd.readouterr()
    rc = main(["-q", "localize", "--map", str(map_dir), str(query), "--verify", verify,
               "--json"])
    cap = capfd.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("storage, how", LOCAL_CASES,
                         ids=[f"{s}-{h}" for s, h in LOCAL_CASES])
def test_corrupt_local_features_are_named(storage, how, verify, tmp_path, local_maps, entries,
                                          capfd):
    """`vpr localize` (re-ranking by default on a map with local features) on a damaged
    local_features.npy / local_scales.npy: exit 2, one line naming the file and what is
    wrong, under every --verify mode (the .npy header and shapes are checked against the
    manifest even with --verify none); the map is not touched."""
    bad = tmp_path / "m"
    shutil.copytree(local_maps / storage, bad)
    name = damage_local(bad, how)
    before = snapshot(bad)
    rc, _, err = _localize_in_process(capfd, bad, entries[0].path, verify)
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    line = lines[0]
    assert line.startswith("vpr localize: error: ") and name in line and str(bad) in line, line
    assert "vpr map build" in line, line                    # and the fix
    what = {"missing": ["missing"], "folder": ["folder"]}.get(
        how.split("-")[-1], ["corrupt", "shape", "holds"])
    assert any(word in line for word in what), line
    assert snapshot(bad) == before


@pytest.mark.parametrize("verify", VERIFY)
@pytest.mark.parametrize("storage, name", [("float16", LF), ("int8", LF), ("int8", LS)])
def test_bit_flipped_local_features(storage, name, verify, tmp_path, local_maps, entries,
                                    capfd):
    """Data bytes damaged, header intact: --verify full names the file (sha256); size/none
    cannot see it, so the map opens and re-ranking must stay sane: non-finite float16
    values (NaN/inf, what a flipped exponent bit gives) or extreme int8 codes give finite,
    bounded counts and no traceback."""
    bad = tmp_path / "m"
    shutil.copytree(local_maps / storage, bad)
    arr = np.load(bad / name, mmap_mode="r+")
    if arr.dtype == np.float16:
        arr[1] = np.nan                           # a whole place
        arr[2, 3, 3] = np.inf                     # one point of another
    else:
        arr[1] = -128                             # outside the symmetric int8 range
    arr.flush()
    del arr
    before = snapshot(bad)
    rc, out, err = _localize_in_process(capfd, bad, entries[1].path, verify)
    assert "Traceback" not in err
    if verify == "full":
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and name in lines[0] and "sha256" in lines[0], err
    else:
        assert rc == 0, err
        assert "Warning" not in err, err          # a clean stderr on success
        result = json.loads(out.strip().splitlines()[-1])
        result = result["results"][0] if "results" in result else result
        h, w = np.load(bad / LF, mmap_mode="r").shape[1:3]
        scores = [c["rerank_score"] for c in result["candidates"]]
        assert len(scores) == LOCAL_PLACES, result
        assert all(s is not None and 0 <= s <= h * w for s in scores), scores
        assert result["place_id"] in [c["place_id"] for c in result["candidates"]]
        assert np.isfinite(result["similarity"]) and 0 <= result["confidence"] <= 1
    assert snapshot(bad) == before


@pytest.mark.parametrize("verify", VERIFY)
def test_local_features_open_for_names_the_file(verify, tmp_path, local_maps):
    """The library path the node takes (PlaceMap.open_for with its map_verify): MapError
    naming the file, for a header N off by one and a missing int8 scales file."""
    from vpr_ros.errors import MapError
    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
    from vpr_ros.maps import PlaceMap

    describer = GlobalDescriber(CARD, device="cpu")
    local = LocalFeatureExtractor(LOCAL_CARD, device="cpu")
    for storage, how, name in [("float16", "n-minus-one", LF), ("int8", "scales-missing", LS)]:
        bad = tmp_path / storage
        shutil.copytree(local_maps / storage, bad)
        damage_local(bad, how)
        with pytest.raises(MapError, match=name) as info:
            PlaceMap.open_for(bad, describer, local_extractor=local, verify=verify,
                              device="cpu")
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("verify", VERIFY)
def test_unreadable_local_features(verify, tmp_path, local_maps, entries, capfd):
    bad = tmp_path / "m"
    shutil.copytree(local_maps / "float16", bad)
    (bad / LF).chmod(0)
    try:
        rc, _, err = _localize_in_process(capfd, bad, entries[0].path, verify)
    finally:
        (bad / LF).chmod(0o644)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and LF in lines[0], err
    assert "cannot be read" in lines[0] or verify == "size", lines[0]


def test_corrupt_local_features_eval_recall_in_a_subprocess(tmp_path, local_maps, sample_dir):
    """`vpr eval recall --map M --rerank` end to end on an int8 map whose scales header
    lies about N: exit 2, one line naming local_scales.npy, no report written."""
    bad = tmp_path / "m"
    shutil.copytree(local_maps / "int8", bad)
    damage_local(bad, "scales-n-minus-one")
    out = tmp_path / "report"
    proc = run_vpr("eval", "recall", "--dataset", sample_dir, "--map", bad, "--rerank",
                   "--rerank-model", LOCAL_CARD, "--device", "cpu", "--max-queries", "2",
                   "--out", out)
    assert_one_line_error(proc, LS, str(bad))
    assert not (out / "report.json").exists()


# --------------------------------------------------------------------------- weights

class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights(kind: str, folder: Path) -> tuple:
    marker = folder / "PWNED"
    if kind == "garbage":
        path = folder / "w.pth"
        path.write_bytes(os.urandom(5000))
    elif kind == "truncated-safetensors":
        path = folder / "w.safetensors"
        path.write_bytes((REPO / "models" / "demo_tiny.safetensors").read_bytes()[:40000])
    elif kind == "truncated-pth":
        import torch

        full = folder / "full.pth"
        torch.save({"w": torch.zeros(4000)}, full)
        path = folder / "w.pth"
        path.write_bytes(full.read_bytes()[:3000])
    elif kind == "malicious-pickle":
        path = folder / "w.pth"
        path.write_bytes(pickle.dumps({"state_dict": _Evil(marker)}))
    elif kind == "malicious-torch-zip":
        import torch

        path = folder / "w.pth"
        torch.save({"state_dict": _Evil(marker)}, path)
    else:
        raise AssertionError(kind)
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("kind", ["garbage", "truncated-safetensors", "truncated-pth",
                                  "malicious-pickle", "malicious-torch-zip"])
def test_bad_weights(kind, tmp_path, entries):
    path, marker = _weights(kind, tmp_path)
    model = "demo_tiny" if path.suffix == ".safetensors" else CARD
    out = tmp_path / "d.npy"
    proc = run_vpr("describe", entries[0].path, "--out", out, "--model", model, "--weights",
                   path, "--device", "cpu")
    assert_one_line_error(proc, path.name)
    assert not marker.exists(), "the pickle ran code"
    assert not out.exists()


# --------------------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["foo", "cuda:x", "cuda"])
def test_bad_device(device, tmp_path, entries):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid")
    proc = run_vpr("describe", entries[0].path, "--out", tmp_path / "d.npy", "--model", CARD,
                   "--device", device)
    assert_one_line_error(proc, repr(device) if device != "cuda" else "cuda")


# --------------------------------------------------------------------------- bags

def test_eval_bag_skips_and_counts_an_undecodable_message(tmp_path, entries, small_map):
    from vpr_ros.bags import BagFrame, write_image_bag

    bag = tmp_path / "bag"
    frames = [BagFrame(1_000_000_000 + i * 250_000_000, e.load(), e.position, e.orientation)
              for i, e in enumerate(entries[:6])]
    write_image_bag(bag, frames, TOPIC, pose_topic="/gt")
    db = next(bag.glob("*.db3"))
    with sqlite3.connect(db) as con:                       # message 3 becomes garbage CDR
        topic_id = con.execute("SELECT id FROM topics WHERE name = ?", (TOPIC,)).fetchone()[0]
        ids = [r[0] for r in con.execute(
            "SELECT id FROM messages WHERE topic_id = ? ORDER BY timestamp", (topic_id,))]
        con.execute("UPDATE messages SET data = ? WHERE id = ?", (b"\x00\x01\x00", ids[2]))
    proc = run_vpr("eval", "bag", bag, "--map", small_map, "--image-topic", TOPIC,
                   "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["frames"]["total"] == 6 and report["frames"]["bad"] == 1
    assert report["frames"]["localized"] == 5
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert all(line.startswith("WARNING ") for line in lines), proc.stderr   # none glued
    bad = [line for line in lines if "bad frame" in line]
    assert len(bad) == 1 and bad[0].startswith("WARNING vpr_ros.bags: skipping bad frame 2"), \
        proc.stderr
    # With progress bars (no -q) the warning still starts a line of its own: the bar is
    # cleared (\r) before it, never continued by it.
    proc = run_vpr("eval", "bag", bag, "--map", small_map, "--image-topic", TOPIC,
                   "--device", "cpu", quiet=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    bad = [line for line in proc.stderr.splitlines() if "bad frame" in line]
    assert len(bad) == 1, proc.stderr
    assert bad[0].split("\r")[-1].startswith("WARNING vpr_ros.bags: skipping bad frame 2"), \
        repr(bad[0])


# --------------------------------------------------------------------------- disk full / read-only

def _mount_tmpfs(folder: Path, size: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (disk-full / read-only cases)")
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture()
def small_fs(tmp_path):
    """A 1 MiB tmpfs (unmounted afterwards)."""
    mnt = tmp_path / "fs"
    _mount_tmpfs(mnt, "1m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.parametrize("command", ["map build", "map add", "describe"])
def test_disk_full(command, small_fs, small_map, sample_dir, entries, tmp_path):
    target = small_fs / "m"
    shutil.copytree(small_map, target)
    (small_fs / "d.npy").write_bytes(b"old descriptors")
    if command == "map build":
        _fill(small_fs, 40_000)
        argv = ["map", "build", target, "--overwrite", "--dataset", sample_dir]
    elif command == "map add":
        _fill(small_fs, 40_000)
        folder, csv_path = image_folder(tmp_path / "new", entries, 100, 20)
        argv = ["map", "add", target, "--images", folder, "--poses", csv_path]
    else:
        _fill(small_fs, 2_000)
        argv = ["describe", *[e.path for e in entries[:5]], "--out", small_fs / "d.npy"]
    before = snapshot(small_fs)
    del before["filler"]
    proc = run_vpr(*argv, "--model", CARD, "--device", "cpu")
    line = assert_one_line_error(proc, "No space left on device", "disk is full")
    assert str(small_fs) in line
    after = snapshot(small_fs)
    del after["filler"]
    assert after == before
    assert not leftovers(small_fs, "m") and not [p for p in small_fs.iterdir()
                                                 if p.name.startswith(".d.npy")]


@pytest.fixture()
def read_only_fs(tmp_path, small_map):
    """A tmpfs holding a map and an output file, then remounted read-only (root ignores
    chmod, a read-only mount it cannot)."""
    mnt = tmp_path / "ro"
    _mount_tmpfs(mnt, "4m")
    shutil.copytree(small_map, mnt / "m")
    (mnt / "d.npy").write_bytes(b"old descriptors")
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("command", ["map build", "map add", "describe"])
def test_read_only_folder(command, read_only_fs, sample_dir, entries, tmp_path):
    target = read_only_fs / "m"
    if command == "map build":
        argv = ["map", "build", target, "--overwrite", "--dataset", sample_dir]
    elif command == "map add":
        folder, csv_path = image_folder(tmp_path / "new", entries, 100, 2)
        argv = ["map", "add", target, "--images", folder, "--poses", csv_path]
    else:
        argv = ["describe", entries[0].path, "--out", read_only_fs / "d.npy"]
    before = snapshot(read_only_fs)
    proc = run_vpr(*argv, "--model", CARD, "--device", "cpu")
    assert_one_line_error(proc, str(read_only_fs), "read-only")
    assert snapshot(read_only_fs) == before


# --------------------------------------------------------------------------- concurrent writers

def _places(map_dir: Path) -> list:
    return [line.split(",")[1] for line in (map_dir / "places.csv").read_text().splitlines()[1:]]


@pytest.mark.parametrize("wait", [True, False], ids=["wait-lock", "fail-fast"])
def test_concurrent_map_add_never_loses_a_reported_success(wait, map_copy, entries, tmp_path):
    rounds = 2
    sets = []
    for r in range(rounds):
        for w in range(2):
            start = 100 + (2 * r + w) * 3
            sets.append(image_folder(tmp_path / f"add{r}_{w}", entries, start, 3))
    expected = list(_places(map_copy))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for r in range(rounds):
        procs = []
        for w in range(2):
            folder, csv_path = sets[2 * r + w]
            argv = [sys.executable, "-m", "vpr_ros.cli.main", "-q", "map", "add",
                    str(map_copy), "--images", str(folder), "--poses", str(csv_path),
                    "--device", "cpu"] + (["--wait-lock", "600"] if wait else [])
            procs.append((folder, subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                                   stderr=subprocess.PIPE, text=True)))
        for folder, p in procs:
            out, err = p.communicate(timeout=900)
            assert "Traceback" not in err, err
            if p.returncode == 0:
                expected += sorted(q.name for q in folder.iterdir())
            else:
                proc = subprocess.CompletedProcess(p.args, p.returncode, out, err)
                assert_one_line_error(proc, "is being written by PID", "--wait-lock")
                assert not wait, err
        got = _places(map_copy)
        assert sorted(got) == sorted(expected)             # every success is in the map
        assert not leftovers(map_copy.parent, "m")
    from vpr_ros.maps import PlaceMap

    assert len(PlaceMap.open(map_copy)) == len(expected)


def test_lock_names_the_writer_and_readers_do_not_block(map_copy):
    from vpr_ros.atomic import write_lock
    from vpr_ros.errors import LockedError
    from vpr_ros.maps import PlaceMap

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from vpr_ros.atomic import write_lock\n"
         "with write_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
         str(map_copy)], env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockedError, match=f"being written by PID {holder.pid}"):
            with write_lock(map_copy):
                pass
        assert len(PlaceMap.open(map_copy)) == N_PLACES     # a reader is not blocked
    finally:
        holder.kill()
        holder.wait()
    with write_lock(map_copy, wait_s=5):                   # released when the holder dies
        pass


# --------------------------------------------------------------------------- killed swaps

KILL_BETWEEN_RENAMES = r"""
import os, sys
import vpr_ros.atomic as atomic
atomic._exchange_supported = False          # the two-rename fallback of file systems without it
real = os.replace
def replace(src, dst):
    if os.path.basename(str(dst)) == "m" and ".m.tmp-" in str(src):
        os._exit(9)                         # killed after NAME -> .NAME.old-PID
    return real(src, dst)
os.replace = replace
from vpr_ros.cli.main import main
sys.exit(main(sys.argv[1:]))
"""

KILL_AFTER_EXCHANGE = r"""
import os, sys
import vpr_ros.atomic as atomic
real = atomic.exchange
def exchange(a, b):
    assert real(a, b), "renameat2(RENAME_EXCHANGE) not offered on this file system"
    os._exit(9)                             # killed right after the one-call swap
atomic.exchange = exchange
from vpr_ros.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["between-renames", "after-exchange"])
def test_killed_swap_leaves_a_map_that_opens(where, map_copy, entries, tmp_path):
    from vpr_ros.maps import PlaceMap

    folder, csv_path = image_folder(tmp_path / "new", entries, 100, 2)
    before = snapshot(map_copy)
    code = KILL_BETWEEN_RENAMES if where == "between-renames" else KILL_AFTER_EXCHANGE
    proc = run_vpr("map", "add", map_copy, "--images", folder, "--poses", csv_path,
                   "--device", "cpu", python_code=code)
    assert proc.returncode == 9, proc.stderr
    if where == "between-renames":
        assert not map_copy.exists() and leftovers(map_copy.parent, "m")
        assert len(PlaceMap.open(map_copy)) == N_PLACES     # a reader restores the old map
        assert snapshot(map_copy) == before
    else:
        assert len(PlaceMap.open(map_copy)) == N_PLACES + 2   # the new map, complete
    # The next writer removes what the dead one left (the lock file included).
    proc = run_vpr("map", "add", map_copy, "--images", folder, "--poses", csv_path,
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(map_copy.parent).count("m") == 1
    assert not leftovers(map_copy.parent, "m")


def _swap_call(trace: Path, target: Path) -> tuple:
    """(system call name, its 1-based number in its thread) of the call that swaps the new
    map in: strace counts injections per thread and per system call."""
    calls = []
    for line in trace.read_text().splitlines():
        pid, _, call = line.partition(" ")
        if "rename" in call and "resumed" not in call:
            calls.append((pid, call.split("(", 1)[0].strip(), call))
    for i, (pid, name, call) in enumerate(calls):
        if ".m.tmp-" in call and f'"{target}"' in call.split(",", 2)[-1]:
            return name, sum(1 for p, n, _ in calls[:i + 1] if p == pid and n == name)
    raise AssertionError("no swap rename found in the trace:\n"
                         + "\n".join(c for _, _, c in calls))


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_strace_injected_kill_at_the_swap(fallback, map_copy, entries, tmp_path):
    """Fault injection from outside the process: strace kills the build at the system
    call that swaps the new map in; the map then opens (old or new)."""
    from vpr_ros.maps import PlaceMap

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    probe = subprocess.run([strace, "-f", "-o", "/dev/null", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode().strip()}")
    folder, csv_path = image_folder(tmp_path / "new", entries, 100, 2)
    code = ("import sys\nimport vpr_ros.atomic as atomic\n"
            + ("atomic._exchange_supported = False\n" if fallback else "")
            + "from vpr_ros.cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    argv = ["-q", "map", "add", str(map_copy), "--images", str(folder), "--poses",
            str(csv_path), "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    calls = "rename,renameat,renameat2"
    # 1) trace a run on a copy to find which rename call swaps the map in
    probe_map = tmp_path / "probe" / "m"
    shutil.copytree(map_copy, probe_map)
    trace = tmp_path / "trace.txt"
    probe_argv = [a if a != str(map_copy) else str(probe_map) for a in argv]
    subprocess.run([strace, "-f", "-qq", "-s", "4096", "-e", f"trace={calls}", "-o", str(trace),
                    sys.executable, "-c", code, *probe_argv], env=env, check=True,
                   capture_output=True, timeout=600)
    name, nth = _swap_call(trace, probe_map)
    # 2) the same run on the real map, killed at that call
    before = snapshot(map_copy)
    proc = subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", "-e",
                           f"inject={name}:signal=KILL:when={nth}", sys.executable, "-c",
                           code, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "strace did not kill the build at the swap"
    pm = PlaceMap.open(map_copy)
    assert len(pm) in (N_PLACES, N_PLACES + 2)
    if len(pm) == N_PLACES:
        assert snapshot(map_copy) == before


def test_quiet_in_process_leaves_progress_bars_as_they_were(capsys):
    from tqdm import tqdm

    from vpr_ros.cli.main import main

    raw = tqdm.__dict__["__init__"]
    assert main(["-q", "models"]) == 0
    assert tqdm.__dict__["__init__"] is raw
    assert not tqdm(total=1).disable
