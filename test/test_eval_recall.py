"""`vpr eval recall` end to end on the shipped Nordland sample: JSON, report, plots, and
recall numbers recomputed by hand from the saved map."""

import csv
import json
import shutil

import numpy as np
import pytest

from vpr_ros.cli.main import main
from vpr_ros.inference import GlobalDescriber
from vpr_ros.maps import PlaceMap, read_manifest
from vpr_ros.preprocess import load_image

CARD = "scicevpr_tiny_random"
PNG = b"\x89PNG\r\n\x1a\n"


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_recall_cli_end_to_end_on_the_sample(sample_dir, tmp_path, capsys):
    out, saved = tmp_path / "report", tmp_path / "map"
    rc = main(["eval", "recall", "--dataset", str(sample_dir), "--model", CARD,
               "--device", "cpu", "--batch-size", "16", "--max-queries", "30",
               "--latency-queries", "3", "--out", str(out), "--save-map", str(saved), "--json"])
    assert rc == 0
    res = last_json(capsys)
    assert res["num_queries"] == 30 and res["num_database"] == 200
    assert set(res["recall"]) == {"1", "5", "10", "20"}
    assert all(0.0 <= v <= 1.0 for v in res["recall"].values())
    assert list(res["recall"].values()) == sorted(res["recall"].values())
    assert "recall_reranked" not in res and "recall_temporal" not in res
    st = res["stream"]
    assert set(st["recall"]) == {"1", "5", "10", "20"} and st["method"] == "sparse-hmm"
    assert list(st["recall"].values()) == sorted(st["recall"].values())
    assert {"recall_at_100_precision", "precision_of_published", "published_fraction",
            "odometry"} <= set(st) and st["odometry"] is False
    assert {"describe", "search", "total"} <= set(res["latency_ms"])
    for name in ("recall_at_n.png", "pr_curve.png", "examples.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    report = json.loads((out / "report.json").read_text())
    assert report["recall"] == res["recall"] and report["radius_m"] == 25.0
    assert "calibrated (cross-fitted)" in report["precision_recall"]
    assert report["stream"]["recall"] == st["recall"] and "_arrays" not in report["stream"]
    assert not list(tmp_path.glob(".report.tmp-*"))
    # Recompute the recall by hand: exact inner products against the saved map.
    manifest = read_manifest(saved)
    assert "confidence" in manifest
    assert manifest["stream_calibration"]["target_precision"] == 0.99
    assert 0.0 <= manifest["stream_calibration"]["threshold"] <= 1.0
    describer = GlobalDescriber(CARD, device="cpu", batch_size=16)
    pm = PlaceMap.open_for(saved, describer)
    with open(sample_dir / "poses_queries.csv") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["seq"]))[:30]
    q = describer.describe([load_image(sample_dir / "images/test/queries" / r["filename"])
                            for r in rows])
    rank = np.argsort(-(q @ np.asarray(pm.descriptors).T), axis=1, kind="stable")
    q_north = np.array([float(r["north_m"]) for r in rows])
    db_north = pm.places.positions[:, 1]
    for n in (1, 5, 10, 20):
        hits = [np.any(np.abs(db_north[rank[i, :n]] - q_north[i]) <= 25.0) for i in range(30)]
        assert res["recall"][str(n)] == pytest.approx(np.mean(hits)), n


@pytest.fixture()
def small_dataset(sample_dir, tmp_path):
    """8 database places and the 4 queries of the first 4 of them, with poses CSVs."""
    root = tmp_path / "small"
    for split, count in (("database", 8), ("queries", 4)):
        folder = root / "images" / "test" / split
        folder.mkdir(parents=True)
        with open(sample_dir / f"poses_{split}.csv") as fh:
            reader = csv.DictReader(fh)
            rows = sorted(reader, key=lambda r: int(r["seq"]))[:count]
            fields = reader.fieldnames
        with open(root / f"poses_{split}.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            shutil.copy(sample_dir / "images" / "test" / split / r["filename"], folder)
    return root


def test_eval_recall_with_reranking_and_with_a_given_map(small_dataset, tmp_path, capsys):
    rc = main(["eval", "recall", "--dataset", str(small_dataset), "--model", CARD,
               "--device", "cpu", "--rerank", "--rerank-k", "3", "--latency-queries", "1",
               "--no-stream", "--json", "--out", str(tmp_path / "rep"),
               "--save-map", str(tmp_path / "m")])
    assert rc == 0
    res = last_json(capsys)
    assert res["num_queries"] == 4 and res["num_database"] == 8
    assert read_manifest(tmp_path / "m")["local_features"]["present"]
    assert set(res["recall_reranked"]) == {"1", "5", "10", "20"}
    assert "stream" not in res and "rerank" in res["latency_ms"]
    # Re-ranking only reorders the first 3 candidates: recall@5 and beyond cannot change.
    assert res["recall_reranked"]["5"] == res["recall"]["5"]
    assert (tmp_path / "rep" / "recall_at_n.png").read_bytes()[:8] == PNG

    assert main(["eval", "recall", "--dataset", str(small_dataset), "--map",
                 str(tmp_path / "m"), "--model", CARD, "--device", "cpu",
                 "--latency-queries", "0", "--json"]) == 0
    with_map = last_json(capsys)
    assert with_map["recall"] == res["recall"]
    assert main(["eval", "recall", "--dataset", str(small_dataset), "--map",
                 str(tmp_path / "m"), "--model", "selavpr_tiny_random", "--device", "cpu"]) == 2
    assert "was built with model card" in capsys.readouterr().err
    assert main(["eval", "recall", "--dataset", str(tmp_path / "nothing"), "--model", CARD,
                 "--device", "cpu"]) == 2
    assert main(["eval", "recall", "--dataset", str(small_dataset), "--map",
                 str(tmp_path / "m"), "--save-map", str(tmp_path / "m2")]) == 2


def test_queries_without_driving_order_are_scored_as_single_frames(small_dataset, tmp_path,
                                                                   capsys):
    """No poses CSV: name order is no drive, so the stream object repeats single frames."""
    (small_dataset / "poses_queries.csv").unlink()
    assert main(["eval", "recall", "--dataset", str(small_dataset), "--model", CARD,
                 "--device", "cpu", "--latency-queries", "0", "--json"]) == 0
    res = last_json(capsys)
    assert res["stream"]["recall"]["1"] == res["recall"]["1"]
    assert res["stream"]["method"].startswith("single-frame")
    assert res["stream"]["motion_prior_fits"] is False


def test_eval_recall_with_an_odometry_file(small_dataset, tmp_path, capsys):
    rows = list(csv.DictReader(open(small_dataset / "poses_queries.csv")))
    odo = tmp_path / "odo.csv"
    with open(odo, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filename", "x", "y"])
        for r in rows:        # wheel odometry: its own frame, the distance travelled
            w.writerow([r["filename"], float(r["north_m"]) - 31000.0, 0.0])
    assert main(["eval", "recall", "--dataset", str(small_dataset), "--model", CARD,
                 "--device", "cpu", "--latency-queries", "0", "--odometry", str(odo),
                 "--json"]) == 0
    res = last_json(capsys)
    assert res["stream"]["odometry"] is True
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["eval", "recall", "--dataset", str(small_dataset), "--model", CARD,
                 "--device", "cpu", "--odometry", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "odometry file" in err and "Traceback" not in err


def test_grief_says_the_stream_prior_does_not_fit(grief_dir, capsys):
    """Five separate places visited in turn: the stream falls back to single frames, says
    so, and publishes nothing (a single frame is never what the robot should trust)."""
    assert main(["eval", "recall", "--dataset", str(grief_dir), "--latency-queries", "0",
                 "--device", "cpu", "--json"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out.strip().splitlines()[-1])
    st = res["stream"]
    assert st["recall"]["1"] >= res["recall"]["1"]
    assert st["motion_prior_fits"] is False and st["stream_answered_fraction"] < 0.5
    assert st["published_fraction"] == 0.0
    assert "stream prior does not fit" in out
