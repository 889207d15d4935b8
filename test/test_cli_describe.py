"""`vpr describe` and `vpr models` end to end on the shipped sample images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from vpr_ros.cli.main import main
from vpr_ros.inference import GlobalDescriber
from vpr_ros.preprocess import load_image


def test_describe_writes_npy_and_names(sample_dir, tmp_path, capsys):
    images = sorted((sample_dir / "images" / "test" / "database").glob("*.jpg"))[:10]
    out = tmp_path / "out" / "db.npy"
    rc = main(["describe", *map(str, images), "--out", str(out), "--model",
               "scicevpr_tiny_random", "--device", "cpu", "--batch-size", "4"])
    assert rc == 0
    desc = np.load(out)
    assert desc.shape == (10, 448) and desc.dtype == np.float32
    names = (tmp_path / "out" / "db.names.txt").read_text().splitlines()
    assert names == [str(p) for p in images]
    expected = GlobalDescriber("scicevpr_tiny_random", device="cpu").describe(
        [load_image(p) for p in images])
    assert np.abs(desc - expected).max() < 1e-6
    # no temporary files left
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_describe_folder_argument(sample_dir, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted((sample_dir / "images" / "test" / "queries").glob("*.jpg"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    rc = main(["describe", str(folder), "--out", str(tmp_path / "q.npy"), "--device", "cpu",
               "--json"])
    assert rc == 0 and np.load(tmp_path / "q.npy").shape[0] == 3
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # no --model: the embedded default (the shipped demo model, or the tiny random card)
    from vpr_ros.models import default_card_name
    assert summary["count"] == 3 and summary["model"] == default_card_name()
    assert summary["fingerprint"].startswith(("sha256:", "random:"))


def test_describe_errors_exit_2(tmp_path, capsys, sample_dir):
    rc = main(["describe", str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "x.npy")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    rc = main(["describe", str(bad), "--out", str(tmp_path / "x.npy"), "--device", "cpu"])
    assert rc == 2 and "cannot decode" in capsys.readouterr().err
    img = next((sample_dir / "images" / "test" / "queries").glob("*.jpg"))
    rc = main(["describe", str(img), "--out", str(tmp_path / "x.npy"), "--model", "scicevpr_b"])
    assert rc == 2 and "--weights" in capsys.readouterr().err
    assert not (tmp_path / "x.npy").exists()


def test_models_json_subprocess(repo_root):
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.run([sys.executable, "-m", "vpr_ros.cli.main", "models", "--json"],
                          capture_output=True, text=True, env=env, cwd=repo_root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    names = {m["name"]: m for m in data["models"]}
    for expected in ("scicevpr_b", "scicevpr_l", "super_cricavpr_b", "selavpr_vitl14",
                     "selavpr_vitl14_reg4", "scicevpr_tiny_random",
                     "super_cricavpr_tiny_random", "selavpr_tiny_random"):
        assert expected in names
    assert names["scicevpr_b"]["descriptor_dim"] == 10752
    assert names["selavpr_vitl14"]["local_shape"] == [61, 61, 128]
    assert names["scicevpr_l"]["inferred"] is True
    assert data["default"] in names and names[data["default"]]["default"]


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "scicevpr_tiny_random" in out and "ARCHITECTURE" in out
