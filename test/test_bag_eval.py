"""Bag evaluation (offline) and the `vpr bag` / `vpr eval bag` commands on bags written here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vpr_ros.bags import BagFrame, bag_topics, write_image_bag
from vpr_ros.errors import BagError
from vpr_ros.evaluation.bag_eval import BagEvalSettings, evaluate_bag
from vpr_ros.preprocess import load_image

CARD = "scicevpr_tiny_random"
SEC = 1_000_000_000
N = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sample_database, describer):
    """A map of the first N database places and a bag driving past exactly those places."""
    from vpr_ros.maps import PlaceMap, build_map

    root = tmp_path_factory.mktemp("bageval")
    entries = sample_database[:N]
    build_map(entries, root / "map", describer, index="Flat", progress=False)
    place_map = PlaceMap.open_for(root / "map", describer, device="cpu")
    frames = [BagFrame((10 + i) * SEC // 2, load_image(e.path), position=e.position)
              for i, e in enumerate(entries)]
    write_image_bag(root / "drive", frames, storage="mcap")
    return root, place_map, entries, frames


def test_offline_bag_eval_on_the_map_drive_is_perfect(setup, describer, tmp_path):
    root, place_map, entries, _ = setup
    settings = BagEvalSettings(image_topic="/camera/image_raw", confidence_threshold=0.0)
    seen = []
    report = evaluate_bag(root / "drive", place_map, settings, describer=describer,
                          out_dir=tmp_path / "report", progress=False, on_frame=seen.append)
    assert report["frames"] == {"total": N, "bad": 0, "localized": N, "with_ground_truth": N}
    assert report["recall"]["1"] == 1.0 and report["recall"]["10"] == 1.0
    assert report["ground_truth"].startswith("/ground_truth/pose")
    gate = report["confidence_gate"]
    assert gate["confident_frames"] == N and gate["precision_of_confident"] == 1.0
    assert report["localization_error_m"]["confident"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert report["latency_ms"]["total"]["count"] == N
    assert [f["index"] for f in seen] == list(range(N))
    assert [f["place_ids"][0] for f in seen] == list(range(N))
    for name in ("report.json", "trajectory.png", "error_over_time.png", "pr_curve.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["recall"]["1"] == 1.0 and len(saved["per_frame"]) == N


def test_shifted_ground_truth_gives_the_expected_recall(setup, describer, tmp_path):
    """Ground truth from a CSV that puts every frame 100 m further on: top-1 is now wrong
    for every frame, and Recall@N only counts places within the radius of the shifted pose."""
    root, place_map, entries, _ = setup
    csv = tmp_path / "poses.csv"
    rows = ["stamp_ns,x,y"] + [f"{(10 + i) * SEC // 2},0,{e.position[1] + 100.0}"
                               for i, e in enumerate(entries)]
    csv.write_text("\n".join(rows) + "\n")
    settings = BagEvalSettings(image_topic="/camera/image_raw", poses_csv=str(csv),
                               radius_m=25.0, top_k=N)
    report = evaluate_bag(root / "drive", place_map, settings, describer=describer,
                          progress=False)
    # 100 m ahead is 5 places ahead; the last 4 frames have no map place within 25 m there
    assert report["recall"]["1"] == 0.0
    assert report["frames"]["with_ground_truth"] == N
    assert report["recall"]["20" if "20" in report["recall"] else "10"] <= (N - 4) / N


def test_poses_csv_by_order_and_missing_ground_truth(setup, describer, tmp_path):
    root, place_map, entries, frames = setup
    csv = tmp_path / "order.csv"
    csv.write_text("x,y\n" + "".join(f"0,{e.position[1]}\n" for e in entries))
    settings = BagEvalSettings(image_topic="/camera/image_raw", poses_csv=str(csv),
                               max_frames=None)
    report = evaluate_bag(root / "drive", place_map, settings, describer=describer,
                          progress=False)
    assert report["recall"]["1"] == 1.0 and "by order" in report["ground_truth"]

    nopose = tmp_path / "nopose"
    write_image_bag(nopose, [BagFrame(f.stamp_ns, f.image) for f in frames[:3]], pose_topic=None)
    with pytest.raises(BagError, match="no ground truth"):
        evaluate_bag(nopose, place_map, BagEvalSettings(image_topic="/camera/image_raw"),
                     describer=describer, progress=False)
    with pytest.raises(BagError, match="not in bag"):
        evaluate_bag(nopose, place_map, BagEvalSettings(image_topic="/cam/other"),
                     describer=describer, progress=False)


def test_cli_bag_from_images_info_and_eval_bag(setup, sample_dir, tmp_path, capsys):
    from vpr_ros.cli.main import main

    root, *_ = setup
    bag = tmp_path / "cli_bag"
    assert main(["bag", "from-images", "--dataset", str(sample_dir), "--split", "database",
                 "--max-frames", str(N), "--rate", "5", "--out", str(bag), "--compressed",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["topics"]["/camera/image_raw"] == {"type": "sensor_msgs/msg/CompressedImage",
                                                      "count": N}
    assert summary["duration_s"] == pytest.approx((N - 1) / 5, abs=1e-6)
    assert bag_topics(bag)["/ground_truth/pose"][1] == N

    assert main(["bag", "info", str(bag), "--json"]) == 0
    out = capsys.readouterr().out
    assert "/camera/image_raw" in out and "CompressedImage" in out

    # timing from the poses' t_s column (Nordland: frame numbers, 10 s apart)
    bag2 = tmp_path / "timed"
    assert main(["bag", "from-images", "--dataset", str(sample_dir), "--max-frames", "3",
                 "--out", str(bag2), "--storage", "mcap", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["storage"] == "mcap" and summary["duration_s"] == pytest.approx(20.0)
    assert main(["bag", "from-images", "--dataset", str(sample_dir), "--max-frames", "3",
                 "--out", str(bag2)]) == 2          # exists, no --overwrite
    assert "exists" in capsys.readouterr().err

    report_dir = tmp_path / "cli_report"
    assert main(["eval", "bag", str(bag), "--map", str(root / "map"), "--image-topic",
                 "/camera/image_raw", "--device", "cpu", "--out", str(report_dir),
                 "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # JPEG-compressed copies of the map images still find their own place
    assert result["recall"]["1"] >= 0.9 and result["frames"]["localized"] == N
    assert (report_dir / "trajectory.png").is_file()
    assert "recall:" in out

    assert main(["eval", "bag", str(tmp_path / "missing"), "--map", str(root / "map"),
                 "--image-topic", "/x"]) == 2
    assert "bag not found" in capsys.readouterr().err


def test_frame_stamp_rules():
    from vpr_ros.cli.bag_cmd import frame_stamps
    from vpr_ros.errors import DatasetError

    class E:
        def __init__(self, s):
            self.stamp_ns = s
    assert frame_stamps([E(-1)] * 3, 2.0, None) == [SEC, SEC + SEC // 2, 2 * SEC]
    assert frame_stamps([E(5), E(9)], None, 1.0) == [SEC, SEC + 4]
    with pytest.raises(DatasetError, match="--rate"):
        frame_stamps([E(-1)], None, None)
    with pytest.raises(DatasetError, match="backwards"):
        frame_stamps([E(9), E(5)], None, None)
    assert np.all(np.diff(frame_stamps([E(-1)] * 10, 30.0, 0.0)) > 0)


def test_realtime_bag_eval_through_the_live_node(setup, ros_domain):
    """The same drive replayed through the real node (subprocess, private DDS domain): what
    the node published is scored like the offline run."""
    pytest.importorskip("rclpy")
    root, place_map, *_ = setup
    # frame by frame (confidence_threshold 0: a pose for every answer); the node's stream
    # localizer is tested in test_ros_lifecycle.py::test_stream_localizer_in_the_node
    settings = BagEvalSettings(image_topic="/camera/image_raw", realtime=True, rate=2.0,
                               confidence_threshold=0.0, top_k=5, max_frames=8, stream=False)
    report = evaluate_bag(root / "drive", place_map, settings,
                          node_params={"map_path": str(root / "map"), "device": "cpu"},
                          progress=False)
    fr = report["frames"]
    assert fr["frames_sent"] == 8 and fr["total"] == 8
    assert fr["frames_answered"] + fr["frames_dropped"] >= 7
    assert fr["frames_answered"] >= 6 and fr["poses_published"] == fr["frames_answered"]
    assert report["recall"]["1"] == 1.0 and report["recall"]["5"] == 1.0
    assert report["node"]["node_diagnostics"]["state"] == "active"
    assert report["node"]["node_diagnostics"]["exit_code"] == "0"


def test_realtime_replay_reports_a_node_that_dies_instead_of_waiting(setup, ros_domain, tmp_path):
    """A node that exits (here: its map does not exist) ends the replay at once with the
    node's status and log, rather than leaving the replay waiting on a dead peer."""
    import time

    pytest.importorskip("rclpy")
    from vpr_ros.errors import VprError
    from vpr_ros.ros.replay import run_node_and_replay

    root, *_ = setup
    t0 = time.monotonic()
    with pytest.raises(VprError, match="exited with status 1 before it was ready"):
        run_node_and_replay(root / "drive", "/camera/image_raw",
                            {"map_path": str(tmp_path / "no_map"), "device": "cpu"},
                            ready_timeout_s=120.0)
    assert time.monotonic() - t0 < 100.0      # well before the ready timeout


def test_eval_bag_stream_with_an_odometry_topic(sample_dir, tmp_path, capsys):
    """A winter drive with stops past the summer map, the demo model, odometry in the bag:
    the stream object is reported, uses the odometry, beats single frames; ground truth
    comes from a CSV and can never be the odometry."""
    from vpr_ros.cli.main import main
    from vpr_ros.datasets import read_split
    from vpr_ros.evaluation.drives import make_drive, simulated_odometry
    from vpr_ros.maps import read_manifest

    assert main(["map", "build", str(tmp_path / "map"), "--dataset", str(sample_dir)]) == 0
    q = read_split(sample_dir, "queries")
    order = make_drive(80, "stops", seed=2)
    odo = simulated_odometry(q.positions[order])
    frames = [BagFrame((i + 1) * SEC // 2, load_image(q.paths[j]), position=odo[i])
              for i, j in enumerate(order)]
    write_image_bag(tmp_path / "drive", frames, pose_topic="/odom", storage="mcap")
    gt = tmp_path / "gt.csv"
    gt.write_text("stamp_ns,x,y\n" + "".join(
        f"{(i + 1) * SEC // 2},{q.positions[j, 0]},{q.positions[j, 1]}\n"
        for i, j in enumerate(order)))
    args = ["eval", "bag", str(tmp_path / "drive"), "--map", str(tmp_path / "map"),
            "--image-topic", "/camera/image_raw", "--poses", str(gt), "--device", "cpu"]
    assert main(args + ["--odometry-topic", "/odom", "--store-calibration", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    st = rep["stream"]
    assert st["odometry"] is True and st["frames_with_odometry"] >= len(order) - 2
    assert st["recall"]["1"] >= max(0.8, rep["recall"]["1"] + 0.3)
    assert {"recall_at_100_precision", "precision_of_published", "published_fraction",
            "method", "published_as_run"} <= set(st)
    assert read_manifest(tmp_path / "map")["stream_calibration"]["target_precision"] == 0.99
    # the ground-truth topic is refused as odometry
    assert main(args[:-4] + ["--pose-topic", "/odom", "--odometry-topic", "/odom",
                             "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "ground-truth topic" in err and "Traceback" not in err
