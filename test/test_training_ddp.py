"""The DDP code path: `vpr train` under torchrun with 2 CPU processes (gloo), 2 steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import yaml

from test_training import sample_csv, write_card


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training(tmp_path, sample_dir, repo_root):
    card = write_card(tmp_path, "t", "super_cricavpr")
    cfg = {
        "stage": "teacher", "model": str(card), "seed": 0, "device": "cpu",
        "export_name": "ddp_teacher",
        "data": {"train": {"type": "csv", "path": str(sample_csv(sample_dir, tmp_path, 8))},
                 "val": {"type": "benchmark", "path": str(sample_dir),
                         "seq_range": [1293, 1299]},
                 "places_per_batch": 4, "images_per_place": 2, "num_workers": 0,
                 "batches_per_epoch": 2},
        "optim": {"lr": 1e-3, "epochs": 1, "schedule": "constant"},
        "log": {"every_steps": 1},
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "vpr_ros.cli.main", "train", "teacher", "--config", str(path),
           "--out", str(out), "--no-progress", "--json"]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["finished"]
    assert (out / "model" / "ddp_teacher.safetensors").is_file()
    # Both processes printed a summary (one JSON line each) with the same step count.
    # (decoded object by object: the ranks share one stdout pipe)
    decoder, lines, pos, text = json.JSONDecoder(), [], 0, proc.stdout
    while (start := text.find("{", pos)) >= 0:
        if start and text[start - 1] not in "\n}":      # a brace inside some other line
            pos = start + 1
            continue
        obj, pos = decoder.raw_decode(text, start)
        lines.append(obj)
    assert len(lines) == 2 and {s["steps"] for s in lines} == {2}


GRAD_CHECK = r'''
import sys
import torch
import torch.nn.functional as F
from vpr_ros.training.ddp import cleanup, gather_no_grad, gather_with_grad, setup_distributed
from vpr_ros.training.losses import MultiSimilarity

info = setup_distributed("cpu")
torch.manual_seed(0)
model = torch.nn.Linear(6, 4)
reference = torch.nn.Linear(6, 4)
reference.load_state_dict(model.state_dict())
ddp = torch.nn.parallel.DistributedDataParallel(model)
g = torch.Generator().manual_seed(1)
x = torch.randn(12, 6, generator=g)
labels = torch.arange(12) // 2
mine = [i for i in range(12) if int(labels[i]) % info.world_size == info.rank]
out = gather_with_grad(info, F.normalize(ddp(x[mine]), dim=1))
lab = gather_no_grad(info, labels[mine])
MultiSimilarity()(out, lab).backward()
world = info.world_size
order = [i for r in range(world) for i in range(12) if int(labels[i]) % world == r]
assert torch.equal(lab, labels[order])
MultiSimilarity()(F.normalize(reference(x[order]), dim=1), labels[order]).backward()
err = (model.weight.grad - reference.weight.grad).abs().max().item()
assert err < 1e-6, err
print(f"rank {info.rank} gradient matches the single-process full batch (max diff {err:.1e})")
cleanup(info)
'''


def test_gathered_loss_gives_the_full_batch_gradient(tmp_path, repo_root):
    script = tmp_path / "grad_check.py"
    script.write_text(GRAD_CHECK)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script)]
    proc = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("gradient matches") == 2
