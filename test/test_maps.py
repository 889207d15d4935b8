"""Map format, FAISS index, sources and builder with the real tiny model, real FAISS,
real image files and real rosbag2 files."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vpr_ros.bags import BagFrame, write_image_bag
from vpr_ros.errors import BagError, DatasetError, ImageError, MapError, MapMismatchError
from vpr_ros.inference import GlobalDescriber
from vpr_ros.maps import (BagSource, MapEntry, PlaceMap, add_to_map, benchmark_source,
                          build_index, build_map, folder_source, read_manifest,
                          select_keyframes)
from vpr_ros.maps.index import normalized_factory

CARD = "scicevpr_tiny_random"
N_PLACES = 24


@pytest.fixture(scope="module")
def entries(sample_database):
    return sample_database[:N_PLACES]


@pytest.fixture(scope="module")
def built_map(tmp_path_factory, entries, describer):
    out = tmp_path_factory.mktemp("maps") / "nordland"
    build_map(entries, out, describer, progress=False, command="pytest")
    return out


def test_map_folder_holds_the_documented_files(built_map, entries, describer):
    names = sorted(p.name for p in built_map.iterdir())
    assert names == ["descriptors.npy", "index.faiss", "manifest.json", "places.csv",
                     "poses.npy", "stamps.npy"]
    m = json.loads((built_map / "manifest.json").read_text())
    assert m["format_version"] == 1
    assert m["model"]["card"] == CARD
    assert m["model"]["fingerprint"] == describer.fingerprint
    assert m["model"]["descriptor_dim"] == describer.dim
    assert m["index"]["factory"] == "Flat" and m["index"]["metric"] == "inner_product"
    assert m["counts"]["places"] == N_PLACES
    assert m["local_features"] == {"present": False}
    assert m["created"]["command"] == "pytest" and m["created"]["utc"].endswith("+00:00")
    assert set(m["files"]) == set(names) - {"manifest.json"}
    assert all(v["sha256"].startswith("sha256:") for v in m["files"].values())
    # Human-readable places table, in the order of the source.
    lines = (built_map / "places.csv").read_text().splitlines()
    assert lines[0] == "place_id,image_name,x,y,z,qx,qy,qz,qw,stamp_ns,frame_id"
    assert lines[1].startswith(f"0,{entries[0].name},0.0,31500.0,0.0,")
    desc = np.load(built_map / "descriptors.npy", mmap_mode="r")
    assert desc.dtype == np.float32 and desc.shape == (N_PLACES, describer.dim)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, atol=1e-5)
    assert oct(built_map.stat().st_mode & 0o777) != "0o700"   # readable like a normal folder


def test_open_and_exact_self_retrieval(built_map, entries, describer):
    pm = PlaceMap.open_for(built_map, describer)
    assert len(pm) == N_PLACES and pm.index_device == "cpu"
    np.testing.assert_allclose(pm.places.positions[3], entries[3].position)
    fresh = describer.describe([e.load() for e in entries[:6]])
    sims, idx = pm.search(fresh, 5)
    assert idx[:, 0].tolist() == list(range(6))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-4)
    assert (np.diff(sims, axis=1) <= 1e-6).all()          # best first


def test_memory_mapped_index_gives_the_same_answers(built_map):
    normal = PlaceMap.open(built_map, verify="size")
    mapped = PlaceMap.open(built_map, verify="size", mmap_index=True)
    desc = np.asarray(normal.descriptors[:5])
    for a, b in zip(normal.search(desc, 4), mapped.search(desc, 4)):
        np.testing.assert_array_equal(a, b)


def test_open_refuses_other_card_other_seed_other_dim_and_version(built_map, tmp_path,
                                                                  describer):
    other_card = GlobalDescriber("selavpr_tiny_random", device="cpu")
    with pytest.raises(MapMismatchError, match="card"):
        PlaceMap.open_for(built_map, other_card)
    card_text = (Path(__file__).resolve().parents[1] / "models" / f"{CARD}.yaml").read_text()
    reseeded = tmp_path / f"{CARD}.yaml"
    reseeded.write_text(card_text.replace("random_init_seed: 1234", "random_init_seed: 99"))
    other_seed = GlobalDescriber(str(reseeded), device="cpu")
    assert other_seed.card.name == CARD
    with pytest.raises(MapMismatchError, match="weights"):
        PlaceMap.open_for(built_map, other_seed)
    with pytest.raises(MapMismatchError, match="448-dimensional|dimensional"):
        PlaceMap.open(built_map, expect_dim=describer.dim + 1)
    old = tmp_path / "old_format"
    shutil.copytree(built_map, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(MapMismatchError, match="format version"):
        PlaceMap.open(old)


def test_corrupted_or_missing_file_is_named(built_map, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built_map, bad)
    data = bytearray((bad / "descriptors.npy").read_bytes())
    data[-7] ^= 0xFF                                      # one bit pattern flipped, same size
    (bad / "descriptors.npy").write_bytes(bytes(data))
    with pytest.raises(MapError, match="descriptors.npy is corrupt"):
        PlaceMap.open(bad)
    PlaceMap.open(bad, verify="size")                     # size check cannot see a flip
    with open(bad / "index.faiss", "ab") as fh:           # ... but sees truncation/growth
        fh.write(b"x")
    with pytest.raises(MapError, match="index.faiss is corrupt"):
        PlaceMap.open(bad, verify="size")
    (bad / "poses.npy").unlink()
    with pytest.raises(MapError, match="poses.npy is missing"):
        PlaceMap.open(bad, verify=False)
    with pytest.raises(MapError, match="not a vpr_ros map|not found"):
        PlaceMap.open(tmp_path / "nowhere")


def test_failed_build_leaves_the_previous_map(tmp_path, entries, describer):
    out = tmp_path / "map"
    build_map(entries[:8], out, describer, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bad_entries = list(entries[:10]) + [MapEntry("broken.jpg", np.zeros(3), path=broken)]
    with pytest.raises(ImageError, match="broken.jpg"):
        build_map(bad_entries, out, describer, overwrite=True, progress=False, batch_size=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".map.tmp-*"))
    assert len(PlaceMap.open(out)) == 8
    with pytest.raises(MapError, match="already exists"):
        build_map(entries[:2], out, describer, progress=False)
    empty = tmp_path / "made_by_user"
    empty.mkdir()
    assert build_map(entries[:2], empty, describer, progress=False)["counts"]["places"] == 2


def test_killed_cli_build_leaves_the_previous_map(tmp_path, sample_dir, built_map, repo_root):
    out = tmp_path / "map"
    shutil.copytree(built_map, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "vpr_ros.cli.main", "map", "build", str(out), "--dataset",
         str(sample_dir), "--model", CARD, "--device", "cpu", "--batch-size", "2",
         "--overwrite"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            partial = list(tmp_path.glob(".map.tmp-*/descriptors.npy"))
            if partial and partial[0].stat().st_size > 256 + 2 * 448 * 4:
                break                                     # a few images are on disk
            time.sleep(0.05)
        assert proc.poll() is None, "the build finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(PlaceMap.open(out)) == N_PLACES
    assert list(tmp_path.glob(".map.tmp-*"))              # the killed build's leftovers ...
    from vpr_ros.atomic import atomic_directory
    with atomic_directory(out):                           # ... are cleaned by the next build
        raise_nothing = True
    assert raise_nothing and not list(tmp_path.glob(".map.tmp-*"))


def test_map_add_describes_only_new_places_and_refuses_another_model(tmp_path, sample_dir,
                                                                     entries, describer):
    out = tmp_path / "map"
    build_map(entries[:10], out, describer, progress=False)
    old_desc = np.load(out / "descriptors.npy").copy()
    new = benchmark_source(sample_dir, "queries")[:5]
    m = add_to_map(out, new, describer, progress=False, command="pytest add")
    assert m["counts"]["places"] == 15 and m["updates"][-1]["added_places"] == 5
    pm = PlaceMap.open_for(out, describer)
    assert pm.places.ids.tolist() == list(range(15))
    assert pm.places.names[10:] == [e.name for e in new]
    np.testing.assert_array_equal(np.asarray(pm.descriptors[:10]), old_desc)
    _, idx = pm.search(describer.describe([e.load() for e in new]), 1)
    assert idx[:, 0].tolist() == list(range(10, 15))
    other = GlobalDescriber("selavpr_tiny_random", device="cpu")
    with pytest.raises(MapMismatchError):
        add_to_map(out, new, other, progress=False)
    assert len(PlaceMap.open(out)) == 15


@pytest.mark.parametrize("factory,expect", [
    ("Flat", "Flat"), ("HNSW32", "HNSW32"), ("PCA16,Flat", "PCA16,L2norm,Flat"),
    ("PCAW16,Flat", "PCAW16,L2norm,Flat"), ("IVF4,Flat", "IVF4,Flat")])
def test_index_factories_find_each_place_itself(built_map, factory, expect):
    desc = np.asarray(np.load(built_map / "descriptors.npy"))
    index, info = build_index(desc, factory)
    assert info["factory"] == expect and info["metric"] == "inner_product"
    assert index.ntotal == len(desc)
    from vpr_ros.maps.index import search
    _, idx = search(index, desc, 3)
    assert (idx[:, 0] == np.arange(len(desc))).mean() >= (1.0 if "IVF" not in factory else 0.9)


def test_compressed_index_trains_on_the_map_descriptors():
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index, info = build_index(x, "IVF4,SQ8")
    assert info["trained"] is True and index.ntotal == 300
    from vpr_ros.maps.index import search
    _, idx = search(index, x[:20], 1)
    assert (idx[:, 0] == np.arange(20)).mean() >= 0.9


def test_index_trains_on_a_sample_of_a_float16_memmap(tmp_path, monkeypatch):
    """Large maps: descriptors stay memory-mapped (added in blocks) and training uses a
    fixed-seed sample, so the same map always gives the same index."""
    import vpr_ros.maps.index as index_mod
    x = np.random.default_rng(1).standard_normal((500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.save(tmp_path / "d.npy", x.astype(np.float16))
    mm = np.load(tmp_path / "d.npy", mmap_mode="r")
    monkeypatch.setattr(index_mod, "ADD_BLOCK", 64)          # several add blocks
    a, info = build_index(mm, "PCA16,IVF4,Flat", max_train=200)
    b, _ = build_index(mm, "PCA16,IVF4,Flat", max_train=200)
    assert info["train_size"] == 200 and a.ntotal == 500
    from vpr_ros.maps.index import search
    sa, ia = search(a, x[:50], 5)
    sb, ib = search(b, x[:50], 5)
    np.testing.assert_array_equal(ia, ib)
    assert (ia[:, 0] == np.arange(50)).mean() >= 0.9


def test_index_errors_are_clear(built_map):
    desc = np.asarray(np.load(built_map / "descriptors.npy"))
    with pytest.raises(MapError, match=r"IVF1024.*at least 1024"):
        build_index(desc, "IVF1024,PQ64")
    with pytest.raises(MapError, match="invalid index factory"):
        build_index(desc, "NotAnIndex")
    with pytest.raises(MapError, match="more dimensions"):
        build_index(desc, "PCA4096,Flat")
    assert normalized_factory("Flat", pca_dim=32) == "PCA32,L2norm,Flat"
    with pytest.raises(MapError, match="already has a PCA"):
        normalized_factory("PCA16,Flat", pca_dim=32)


def test_build_with_pca_shortcut_and_float16(tmp_path, entries, describer):
    out = tmp_path / "pca"
    m = build_map(entries[:20], out, describer, pca_dim=8, descriptor_dtype="float16",
                  progress=False)
    assert m["index"]["factory"] == "PCA8,L2norm,Flat" and m["index"]["pca_dim"] == 8
    assert np.load(out / "descriptors.npy").dtype == np.float16
    pm = PlaceMap.open(out)
    _, idx = pm.search(np.asarray(pm.descriptors, np.float32), 1)
    assert idx[:, 0].tolist() == list(range(20))


# --------------------------------------------------------------------------- sources

def test_folder_source_reads_documented_columns_and_lists_mismatches(tmp_path, entries):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, e in enumerate(entries[:3]):
        shutil.copy(e.path, folder / f"f{i}.jpg")
    csv = tmp_path / "poses.csv"
    csv.write_text("image,x,y,z,yaw_deg,t_s\n"
                   "f0.jpg,1,2,3,90,10.5\nf1.jpg,4,5,6,0,11\nf2.jpg,7,8,9,180,12\n")
    got = folder_source(folder, csv)
    assert [e.name for e in got] == ["f0.jpg", "f1.jpg", "f2.jpg"]
    np.testing.assert_allclose(got[0].position, [1, 2, 3])
    np.testing.assert_allclose(got[0].orientation, [0, 0, np.sqrt(0.5), np.sqrt(0.5)])
    assert got[0].stamp_ns == 10_500_000_000
    assert got[2].load().shape == (32, 64, 3)
    csv.write_text("filename,east_m,north_m,qx,qy,qz,qw\nf0.jpg,1,2,0,0,0,2\n"
                   "f1.jpg,1,2,0,0,0,1\nmissing.jpg,1,2,0,0,0,1\n")
    with pytest.raises(DatasetError, match=r"missing\.jpg.*f2\.jpg|f2\.jpg.*missing\.jpg"):
        folder_source(folder, csv)
    csv.write_text("filename,lat,lon\nf0.jpg,1,2\n")
    with pytest.raises(DatasetError, match="x / east_m"):
        folder_source(folder, csv)


def test_benchmark_source_uses_names_without_csv(tmp_path, entries):
    split = tmp_path / "ds" / "images" / "test" / "database"
    split.mkdir(parents=True)
    for e in entries[:3]:
        shutil.copy(e.path, split / e.name)
    got = benchmark_source(tmp_path / "ds")
    np.testing.assert_allclose([g.position for g in got], [e.position for e in entries[:3]])
    assert all(g.stamp_ns == -1 for g in got)
    (split / "nopos.jpg").write_bytes(entries[0].path.read_bytes())
    with pytest.raises(DatasetError, match="@east@north@"):
        benchmark_source(tmp_path / "ds")
    with pytest.raises(DatasetError, match="benchmark layout"):
        benchmark_source(tmp_path)


def test_keyframe_selection_by_distance_and_time(entries):
    kept = list(select_keyframes(entries[:12], min_distance=50.0))
    assert [e.name for e in kept] == [e.name for e in entries[:12][::3]]   # 20 m spacing
    kept = list(select_keyframes(entries[:12], min_interval=25.0))        # 10 s apart
    assert [e.name for e in kept] == [e.name for e in entries[:12][::3]]


def _frames(entries, with_pose):
    frames = []
    for i, e in enumerate(entries):
        pos = e.position if with_pose(i) else None
        frames.append(BagFrame(stamp_ns=1_000_000_000 + i * 100_000_000, image=e.load(),
                               position=pos))
    return frames


def test_bag_source_interpolates_poses_and_drops_frames_without(tmp_path, entries,
                                                                describer):
    bag = tmp_path / "drive"
    # Poses for frames 0..5 only: frames 6..7 are after the last pose and get dropped.
    write_image_bag(bag, _frames(entries[:8], lambda i: i <= 5))
    src = BagSource(bag, "/camera/image_raw", pose_topic="/ground_truth/pose", max_gap_s=0.5)
    got = list(src)
    assert len(got) == 6 and src.frames == 8 and src.dropped == 2
    np.testing.assert_allclose([g.position for g in got], [e.position for e in entries[:6]])
    assert got[0].stamp_ns == 1_000_000_000
    np.testing.assert_array_equal(got[1].image, entries[1].load())
    out = tmp_path / "bagmap"
    m = build_map(BagSource(bag, "/camera/image_raw", pose_topic="/ground_truth/pose"), out,
                  describer, progress=False)
    assert m["counts"]["places"] == 6
    assert PlaceMap.open(out).places.names[0] == "/camera/image_raw#0"


def test_bag_source_with_poses_csv_matched_by_stamp(tmp_path, entries):
    bag = tmp_path / "drive"
    write_image_bag(bag, _frames(entries[:4], lambda i: False), pose_topic=None)
    csv = tmp_path / "gt.csv"
    csv.write_text("stamp_ns,x,y\n1000000000,0,0\n1400000000,0,40\n")
    got = list(BagSource(bag, "/camera/image_raw", poses_csv=csv, max_gap_s=1.0))
    np.testing.assert_allclose([g.position[1] for g in got], [0, 10, 20, 30])
    csv.write_text("stamp_ns,x,y\n9000000000,0,0\n9100000000,0,1\n")
    with pytest.raises(BagError, match="none of the 4 frames"):
        list(BagSource(bag, "/camera/image_raw", poses_csv=csv))


def test_bag_errors_are_clear(tmp_path, entries):
    bag = tmp_path / "noposes"
    write_image_bag(bag, _frames(entries[:2], lambda i: False))
    with pytest.raises(BagError, match="pose topic"):
        list(BagSource(bag, "/camera/image_raw", pose_topic="/ground_truth/pose"))
    with pytest.raises(BagError, match="exactly one pose source"):
        BagSource(bag, "/camera/image_raw")
    with pytest.raises(BagError):
        list(BagSource(bag, "/no/such/topic", pose_topic="/ground_truth/pose"))
    empty = tmp_path / "empty"
    _write_raw_bag(empty, frames=[])
    with pytest.raises(BagError, match="no messages"):
        list(BagSource(empty, "/camera/image_raw", pose_topic="/gt"))
    weird = tmp_path / "weird"
    _write_raw_bag(weird, frames=[(1_000_000_000, "weird_enc16")])
    with pytest.raises(ImageError, match="weird_enc16"):
        list(BagSource(weird, "/camera/image_raw", pose_topic="/gt"))


def _write_raw_bag(path, frames):
    """A bag written with rosbags directly: an image topic (maybe empty, maybe with an
    encoding nobody supports) and a pose topic covering the frames."""
    from rosbags.rosbag2 import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_HUMBLE)
    Image = ts.types["sensor_msgs/msg/Image"]
    PoseStamped = ts.types["geometry_msgs/msg/PoseStamped"]
    Header, Time = ts.types["std_msgs/msg/Header"], ts.types["builtin_interfaces/msg/Time"]
    Pose, Point = ts.types["geometry_msgs/msg/Pose"], ts.types["geometry_msgs/msg/Point"]
    Quaternion = ts.types["geometry_msgs/msg/Quaternion"]
    with Writer(path, version=9) as w:
        img = w.add_connection("/camera/image_raw", "sensor_msgs/msg/Image", typestore=ts)
        pose = w.add_connection("/gt", "geometry_msgs/msg/PoseStamped", typestore=ts)
        for stamp in (0, 5_000_000_000):
            h = Header(stamp=Time(sec=stamp // 10**9, nanosec=0), frame_id="map")
            msg = PoseStamped(header=h, pose=Pose(position=Point(x=0.0, y=0.0, z=0.0),
                                                  orientation=Quaternion(x=0.0, y=0.0, z=0.0,
                                                                         w=1.0)))
            w.write(pose, stamp, ts.serialize_cdr(msg, "geometry_msgs/msg/PoseStamped"))
        for stamp, enc in frames:
            h = Header(stamp=Time(sec=stamp // 10**9, nanosec=stamp % 10**9), frame_id="cam")
            msg = Image(header=h, height=2, width=2, encoding=enc, is_bigendian=0, step=4,
                        data=np.zeros(8, dtype=np.uint8))
            w.write(img, stamp, ts.serialize_cdr(msg, "sensor_msgs/msg/Image"))


# --------------------------------------------------------------------------- CLI

def test_cli_map_build_info_add(tmp_path, entries):
    from vpr_ros.cli.main import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = ["filename,x,y"]
    for i, e in enumerate(entries[:6]):
        shutil.copy(e.path, folder / f"img{i}.jpg")
        rows.append(f"img{i}.jpg,{e.position[0]},{e.position[1]}")
    (tmp_path / "poses.csv").write_text("\n".join(rows[:5]) + "\n")      # img4, img5 first
    out = tmp_path / "cli_map"
    only4 = tmp_path / "imgs4"
    only4.mkdir()
    for i in range(4):
        shutil.copy(folder / f"img{i}.jpg", only4)
    common = ["--model", CARD, "--device", "cpu"]
    assert main(["map", "build", str(out), "--images", str(only4), "--poses",
                 str(tmp_path / "poses.csv"), *common]) == 0
    assert main(["map", "build", str(out), "--images", str(folder), "--poses",
                 str(tmp_path / "poses.csv"), *common, "--overwrite"]) == 2    # 2 unlisted
    assert main(["map", "build", str(out), "--images", str(only4), "--poses",
                 str(tmp_path / "poses.csv"), *common]) == 2                    # exists
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in (4, 5):
        shutil.copy(folder / f"img{i}.jpg", extra)
    (tmp_path / "extra.csv").write_text("filename,x,y\n" + "\n".join(rows[5:]) + "\n")
    assert main(["map", "add", str(out), "--images", str(extra), "--poses",
                 str(tmp_path / "extra.csv"), "--device", "cpu"]) == 0         # map's card
    assert read_manifest(out)["counts"]["places"] == 6
    assert main(["map", "add", str(out), "--images", str(extra), "--poses",
                 str(tmp_path / "extra.csv"), "--model", "selavpr_tiny_random",
                 "--device", "cpu"]) == 2


def test_cli_map_info_json(built_map, capsys):
    from vpr_ros.cli.main import main

    assert main(["map", "info", str(built_map), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["places"] == N_PLACES and info["model"]["card"] == CARD
    assert main(["map", "info", str(built_map)]) == 0
    text = capsys.readouterr().out
    assert "places:" in text and "Flat" in text


def test_cli_map_build_from_bag_records_dropped_frames(tmp_path, entries):
    from vpr_ros.cli.main import main

    bag = tmp_path / "drive"
    write_image_bag(bag, _frames(entries[:6], lambda i: i <= 3), storage="mcap")
    out = tmp_path / "bagmap"
    assert main(["map", "build", str(out), "--bag", str(bag), "--image-topic",
                 "/camera/image_raw", "--pose-topic", "/ground_truth/pose", "--model", CARD,
                 "--device", "cpu", "--min-distance", "30"]) == 0
    m = read_manifest(out)
    assert m["source"]["frames"] == 6 and m["source"]["dropped_without_pose"] == 2
    assert m["counts"]["places"] == 2                     # 4 posed frames 20 m apart, keep >= 30 m
    assert main(["map", "build", str(tmp_path / "x"), "--bag", str(bag), "--model", CARD,
                 "--device", "cpu"]) == 2                 # --image-topic missing


def test_manifest_records_the_int8_numerical_choices():
    """An int8 model's conv_transpose / patch_conv choices go into the manifest's model
    sections (maps built and queried with other choices can be told apart); other
    precisions record none."""
    from vpr_ros.accel.options import AccelOptions
    from vpr_ros.inference import GlobalDescriber, LocalFeatureExtractor
    from vpr_ros.maps.place_map import local_model_section, model_section

    fp32 = model_section(GlobalDescriber("demo_tiny", device="cpu"))
    assert fp32["precision"] == "fp32" and "int8_compute" not in fp32
    default = model_section(GlobalDescriber("demo_tiny", device="cpu", precision="int8"))
    assert default["int8_compute"] == {"conv_transpose": "bf16", "patch_conv": "bf16"}
    chosen = AccelOptions(conv_transpose="int8", patch_conv="fp32")
    local = local_model_section(LocalFeatureExtractor(None, device="cpu", precision="int8",
                                                      accel=chosen))
    assert local["precision"] == "int8"
    assert local["int8_compute"] == {"conv_transpose": "int8", "patch_conv": "fp32"}
