"""The training loop shared by all stages.

Output folder (``--out DIR``)::

    config.yaml            the resolved configuration
    steps.csv              one row per ``log.every_steps`` optimiser steps (loss, lr, ...)
    epochs.csv             one row per epoch (mean loss, validation Recall@N)
    curves.png             loss and recall curves
    checkpoint/            last checkpoint (replaced atomically):
        model.safetensors  the trained model's weights
        optimizer.pt       optimiser state (tensors + numbers only; loaded weights_only)
        state.json         epoch, batch, step, best R@5, history
    best/                  weights of the epoch with the best validation R@5
    model/                 the exported model: <name>.yaml card + <name>.safetensors
                           (best epoch, or the last one without validation), atomic
    summary.json           what was trained, how long, final/best recalls

``--resume`` reads ``checkpoint/`` and continues at the saved epoch and batch with
the same sampler order (the batches are a function of seed and epoch).  Mid-epoch
checkpoints are written every ``log.checkpoint_every_steps`` steps when set.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from ..atomic import atomic_directory, atomic_write_json, atomic_write_text
from ..device import resolve_precision
from ..errors import CheckpointError, ConfigError
from ..preprocess import load_image, preprocess
from .config import dump_config
from .data import (PlaceBatchSampler, ValidationSet, load_train_places, load_validation_set,
                   make_train_loader)
from .ddp import DistInfo, all_reduce_mean, barrier, broadcast_object, cleanup, setup_distributed

log = logging.getLogger(__name__)

STAGE_CLASSES = {}


def stage_class(name: str):
    if not STAGE_CLASSES:
        from .selavpr import SelaVPRStage
        from .student import StudentStage
        from .teacher import TeacherStage
        STAGE_CLASSES.update(teacher=TeacherStage, student=StudentStage, selavpr=SelaVPRStage)
    return STAGE_CLASSES[name]


def seed_everything(seed: int, deterministic: bool = True) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False


def learning_rate(cfg: dict, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) for the configured schedule."""
    o = cfg["optim"]
    base = float(o["lr"])
    warm = int(o["warmup_steps"] or 0)
    if warm and step < warm:
        return base * (step + 1) / warm
    if o["schedule"] == "constant":
        return base
    if o["schedule"] == "step":
        period = max(1, int(o["step_epochs"]) * steps_per_epoch)
        return base * float(o["step_gamma"]) ** (step // period)
    total = max(1, int(o["epochs"]) * steps_per_epoch - warm)
    t = min(1.0, (step - warm) / total)
    lo = float(o["min_lr"])
    return lo + (base - lo) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(cfg: dict, params) -> torch.optim.Optimizer:
    o = cfg["optim"]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen (check freeze.*)")
    if o["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
    if o["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    return torch.optim.SGD(params, lr=o["lr"], momentum=o["momentum"],
                           weight_decay=o["weight_decay"])


# --------------------------------------------------------------------------- validation

@torch.no_grad()
def describe_paths(stage, paths: List[Path], batch_size: int, precision: torch.dtype,
                   progress: bool = False) -> np.ndarray:
    from tqdm import tqdm

    from ..device import autocast_context

    model = stage.model
    was_training = model.training
    model.eval()
    out = []
    size = stage.card.input_size
    try:
        for start in tqdm(range(0, len(paths), batch_size), desc="validate", leave=False,
                          disable=not progress):
            x = preprocess([load_image(p) for p in paths[start:start + batch_size]], size)
            with autocast_context(stage.device, precision):
                d = stage.describe(x.to(stage.device))
            out.append(d.float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out, 0)


def validate(stage, val: ValidationSet, ns, batch_size: int, precision: torch.dtype,
             progress: bool = False) -> Dict[str, float]:
    from ..evaluation.metrics import recall_at_n

    db = describe_paths(stage, val.database, batch_size, precision, progress)
    qs = describe_paths(stage, val.queries, batch_size, precision, progress)
    k = min(max(ns), len(db))
    sims = qs @ db.T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return recall_at_n(top, val.positives, ns)


# --------------------------------------------------------------------------- checkpoints


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_permissions(path: Path) -> None:
    """Give a run's outputs the usual umask permissions (temp files start as 0600/0700)."""
    mask = _umask()
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() else [])
    for item in items:
        try:
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
        except OSError:
            pass


def _state_dict_cpu(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(folder: Path, stage, optimizer, scaler, state: dict) -> None:
    from safetensors.torch import save_file

    with atomic_directory(folder) as tmp:
        save_file(_state_dict_cpu(stage.model), str(tmp / "model.safetensors"),
                  metadata={"format": "vpr_ros-train", "architecture": stage.card.architecture,
                            "card_name": stage.card.name})
        opt = {"optimizer": optimizer.state_dict()}
        if scaler is not None:
            opt["scaler"] = scaler.state_dict()
        torch.save(opt, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        share_permissions(tmp)


def check_resumable(folder: Path) -> None:
    needed = [folder / n for n in ("model.safetensors", "optimizer.pt", "state.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(f"cannot resume: {folder} lacks {', '.join(missing)} (start "
                              "without --resume, or point --out at the earlier run)")


def load_checkpoint(folder: Path, stage, optimizer, scaler) -> dict:
    from safetensors.torch import load_file

    check_resumable(folder)
    try:
        weights = load_file(str(folder / "model.safetensors"))
        opt = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except Exception as exc:  # corrupt/truncated files
        raise CheckpointError(f"cannot resume from {folder}: {exc}") from None
    if state.get("card") != stage.card.name or state.get("stage") != stage.name:
        raise CheckpointError(f"cannot resume: {folder} was written by stage "
                              f"{state.get('stage')!r} for card {state.get('card')!r}, not "
                              f"{stage.name!r} / {stage.card.name!r}")
    result = stage.model.load_state_dict(weights, strict=True)
    del result
    optimizer.load_state_dict(opt["optimizer"])
    if scaler is not None and "scaler" in opt:
        scaler.load_state_dict(opt["scaler"])
    return state


def export_model(out_dir: Path, stage, weights: Dict[str, torch.Tensor], name: str,
                 notes: str, description: str) -> Path:
    """Write ``<out>/model/<name>.yaml`` + ``<name>.safetensors`` atomically."""
    from safetensors.torch import save_file

    from ..models.cards import write_card

    card = stage.card.replace(name=name, weights=f"{name}.safetensors", random_init_seed=None,
                              notes=notes, description=description or stage.card.description,
                              official_files=(), path=None)
    target = out_dir / "model"
    with atomic_directory(target) as tmp:
        save_file(weights, str(tmp / f"{name}.safetensors"),
                  metadata={"format": "vpr_ros", "architecture": card.architecture,
                            "card_name": name})
        write_card(card, tmp / f"{name}.yaml")
        share_permissions(tmp)
    return target / f"{name}.yaml"


# --------------------------------------------------------------------------- logs and plots

class CsvLog:
    def __init__(self, path: Path, columns: List[str], append: bool):
        self.path = path
        self.columns = columns
        if not append or not path.is_file():
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerow(columns)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c, "")) for c in self.columns])


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_curves(out_dir: Path) -> Optional[Path]:
    """curves.png: training loss per step and validation recall per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = _read_csv(out_dir / "steps.csv")
    epochs = _read_csv(out_dir / "epochs.csv")
    if not steps and not epochs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        x = [float(r["step"]) for r in steps]
        for key in [k for k in steps[0] if k.endswith("loss")]:
            y = [float(r[key]) for r in steps if r[key] != ""]
            if len(y) == len(x):
                axes[0].plot(x, y, label=key)
        axes[0].set_xlabel("optimiser step")
        axes[0].set_ylabel("loss")
        axes[0].set_title("training loss")
        if axes[0].lines:
            axes[0].legend()
        axes[0].grid(alpha=0.3)
    if epochs:
        x = [int(r["epoch"]) + 1 for r in epochs]
        for key in [k for k in epochs[0] if k.startswith("R@")]:
            y = [100 * float(r[key]) for r in epochs if r[key] != ""]
            if len(y) == len(x):
                axes[1].plot(x, y, marker="o", label=key)
        axes[1].set_xlabel("epoch")
        from matplotlib.ticker import MaxNLocator
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].set_ylabel("validation recall (%)")
        axes[1].set_title("validation Recall@N")
        axes[1].set_ylim(0, 100)
        if axes[1].lines:
            axes[1].legend()
        axes[1].grid(alpha=0.3)
    fig.tight_layout()
    target = out_dir / "curves.png"
    from ..atomic import atomic_path
    with atomic_path(target, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    share_permissions(target)
    return target


def _read_csv(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the loop

def train(cfg: dict, out_dir, resume: bool = False, progress: bool = True,
          max_steps: Optional[int] = None) -> dict:
    """Run one training stage; returns the summary dict (also written to summary.json).

    ``max_steps`` stops after that many optimiser steps in this call (tests, smoke runs);
    the checkpoint written at the stop lets ``resume=True`` continue.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir).absolute()
    info = setup_distributed(cfg["device"])
    try:
        return _train(cfg, out_dir, resume, progress, max_steps, info, tqdm)
    finally:
        cleanup(info)


def _train(cfg, out_dir: Path, resume: bool, progress: bool, max_steps, info: DistInfo, tqdm):
    seed = int(cfg["seed"])
    if resume:
        check_resumable(out_dir / "checkpoint")
    seed_everything(seed, cfg["deterministic"])
    precision = resolve_precision(cfg["precision"], info.device)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in ("steps.csv", "epochs.csv"):
                (out_dir / stale).unlink(missing_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
        share_permissions(out_dir / "config.yaml")

    stage = stage_class(cfg["stage"])(cfg, info.device)
    log.info("%s", stage.summary())
    d = cfg["data"]
    base = Path(cfg["_base_dir"]) if cfg.get("_base_dir") else Path.cwd()
    k = d["images_per_place"]
    places = load_train_places(d["train"], base, k)
    val = load_validation_set(d["val"], base, cfg["eval"]["radius_m"]) if d["val"] else None
    log.info("training set: %d places, %d images; validation: %s", len(places),
             places.num_images, f"{len(val.queries)} queries / {len(val.database)} database"
             if val else "none")
    sampler = PlaceBatchSampler(len(places), d["places_per_batch"], seed, d["batches_per_epoch"],
                                info.rank, info.world_size, places.positions(),
                                d["avoid_near_places_m"])
    loader = make_train_loader(places, sampler, k, stage.card.input_size, d["augment"],
                               d["num_workers"])
    accum = int(cfg["optim"]["grad_accum"])
    steps_per_epoch = max(1, sampler.batches_per_epoch // accum)

    module = stage.train_module
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(module, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                     broadcast_buffers=False)
    optimizer = make_optimizer(cfg, stage.trainable_parameters())
    scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None

    state = {"stage": stage.name, "card": stage.card.name, "epoch": 0, "batch": 0, "step": 0,
             "best_r5": -1.0, "best_epoch": None, "not_improved": 0, "history": [],
             "train_seconds": 0.0}
    ckpt_dir = out_dir / "checkpoint"
    if resume:
        state = load_checkpoint(ckpt_dir, stage, optimizer, scaler)
        log.info("resuming at epoch %d, batch %d, step %d", state["epoch"], state["batch"],
                 state["step"])
    metric_cols = list(stage.metric_names)
    steps_log = epochs_log = None
    if info.is_main:
        steps_log = CsvLog(out_dir / "steps.csv", ["step", "epoch", "lr", "loss"] + metric_cols
                           + ["seconds"], append=resume)
        epochs_log = CsvLog(out_dir / "epochs.csv", ["epoch", "step", "loss"] + metric_cols +
                            [f"R@{n}" for n in cfg["eval"]["recall_ns"]] + ["seconds"],
                            append=resume)

    def checkpoint():
        state["train_seconds"] = train_seconds + (time.time() - t_run)
        if info.is_main:
            save_checkpoint(ckpt_dir, stage, optimizer, scaler, state)
        barrier(info)

    train_seconds = float(state.get("train_seconds", 0.0))
    t_run = time.time()
    epochs = int(cfg["optim"]["epochs"])
    patience = int(cfg["optim"]["patience"])
    steps_this_call = 0
    stopped_early = False
    ns = [int(n) for n in cfg["eval"]["recall_ns"]]
    clip = cfg["optim"]["clip_grad_norm"]
    every = max(1, int(cfg["log"]["every_steps"]))
    ckpt_every = cfg["log"]["checkpoint_every_steps"]

    while state["epoch"] < epochs and not stopped_early:
        epoch = state["epoch"]
        sampler.set_epoch(epoch, state["batch"])
        module.train()
        sums: Dict[str, float] = {}
        count = 0
        window: Dict[str, float] = {}
        window_n = 0
        bar = tqdm(total=len(sampler), desc=f"{stage.name} epoch {epoch + 1}/{epochs}",
                   disable=not (progress and info.is_main), leave=False)
        optimizer.zero_grad(set_to_none=True)
        micro = 0
        interrupted = False
        for images, labels in loader:
            # Dropout etc. seeded per (epoch, batch, rank): a resumed run repeats it exactly.
            torch.manual_seed((((seed * 1_000_003 + epoch) * 1_000_003 + state["batch"]) * 64
                               + info.rank) % (2**63))
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device)
            lr = learning_rate(cfg, state["step"], steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            last_micro = (micro + 1) % accum == 0
            sync_ctx = (module.no_sync() if info.enabled and not last_micro
                        else _null_context())
            with sync_ctx:
                from ..device import autocast_context
                with autocast_context(info.device, precision):
                    outputs = module(images)
                outputs, labels = stage.gather(outputs, labels, info)
                loss, metrics = stage.compute_loss(outputs, labels)
                scaled = loss / accum
                if scaler is not None:
                    scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            micro += 1
            state["batch"] += 1
            bar.update(1)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {state['step']}; lower "
                                         "optim.lr or use precision fp32")
            metrics = {"loss": value, **metrics}
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + v
                window[key] = window.get(key, 0.0) + v
            count += 1
            window_n += 1
            if not last_micro:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            if clip:
                torch.nn.utils.clip_grad_norm_(stage.trainable_parameters(), float(clip))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            steps_this_call += 1
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            if state["step"] % every == 0 and info.is_main:
                row = {k2: v / window_n for k2, v in window.items()}
                row.update(step=state["step"], epoch=epoch, lr=lr,
                           seconds=round(train_seconds + time.time() - t_run, 1))
                steps_log.write(row)
                window, window_n = {}, 0
            if ckpt_every and state["step"] % int(ckpt_every) == 0:
                checkpoint()
            if max_steps is not None and steps_this_call >= max_steps:
                interrupted = True
                break
        bar.close()
        if interrupted and state["batch"] < sampler.batches_per_epoch:
            checkpoint()
            log.info("stopped after %d steps (max_steps); --resume continues", steps_this_call)
            break
        # ---- end of epoch
        mean = {key: all_reduce_mean(info, v / max(1, count)) for key, v in sums.items()}
        recalls: Dict[str, float] = {}
        if val is not None and info.is_main:
            recalls = validate(stage, val, ns, int(cfg["eval"]["batch_size"]), precision,
                               progress)
        recalls = broadcast_object(info, recalls)
        r5 = recalls.get("5", recalls.get(str(ns[min(1, len(ns) - 1)]), None))
        improved = val is None or (r5 is not None and r5 > state["best_r5"])
        if improved:
            state["best_r5"] = r5 if r5 is not None else state["best_r5"]
            state["best_epoch"] = epoch
            state["not_improved"] = 0
            if info.is_main:
                from safetensors.torch import save_file
                with atomic_directory(out_dir / "best") as tmp:
                    save_file(_state_dict_cpu(stage.model), str(tmp / "model.safetensors"))
                    (tmp / "state.json").write_text(json.dumps(
                        {"epoch": epoch, "step": state["step"], "recalls": recalls}) + "\n")
                    share_permissions(tmp)
        else:
            state["not_improved"] += 1
        elapsed = train_seconds + time.time() - t_run
        entry = {"epoch": epoch, "step": state["step"], **mean,
                 **{f"R@{n}": recalls.get(str(n), "") for n in ns}, "seconds": round(elapsed, 1)}
        state["history"].append(entry)
        if info.is_main:
            epochs_log.write(entry)
            log.info("epoch %d: loss %.4f%s", epoch + 1, mean.get("loss", float("nan")),
                     "".join(f", R@{n} {100 * recalls[str(n)]:.1f}" for n in ns
                             if str(n) in recalls))
            plot_curves(out_dir)
        state["epoch"] += 1
        state["batch"] = 0
        if val is not None and state["not_improved"] >= patience:
            log.info("validation R@5 did not improve for %d epochs: stopping", patience)
            stopped_early = True
        checkpoint()
        if max_steps is not None and steps_this_call >= max_steps:
            break

    finished = state["epoch"] >= epochs or stopped_early
    total_seconds = train_seconds + time.time() - t_run
    summary = {
        "stage": stage.name, "card": stage.card.name, "finished": finished,
        "epochs_done": state["epoch"], "steps": state["step"],
        "best_epoch": state["best_epoch"], "best_val_R@5": state["best_r5"],
        "history": state["history"], "train_seconds": round(total_seconds, 1),
        "world_size": info.world_size, "device": str(info.device),
        "host": socket.gethostname(), "machine": machine_description(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    if finished and info.is_main:
        from safetensors.torch import load_file
        best = out_dir / "best" / "model.safetensors"
        weights = load_file(str(best)) if best.is_file() else _state_dict_cpu(stage.model)
        name = cfg["export_name"] or out_dir.name
        last = state["history"][-1] if state["history"] else {}
        best_entry = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]), last)
        val_text = ", ".join(f"R@{n} {100 * float(best_entry[f'R@{n}']):.1f}%" for n in ns
                             if best_entry.get(f"R@{n}") not in ("", None))
        notes = (f"Trained by `vpr train {stage.name}` (vpr_ros) from card {stage.card.name}: "
                 f"{state['epoch']} epochs, {state['step']} optimiser steps, seed {seed}, "
                 f"{info.world_size} process(es) on {info.device} ({machine_description()}), "
                 f"{total_seconds / 60:.1f} min. Exported epoch "
                 f"{(state['best_epoch'] or 0) + 1} (1-based); "
                 f"validation {val_text or 'none'}")
        card_path = export_model(out_dir, stage, weights, name, notes, "")
        summary["model_card"] = str(card_path)
        atomic_write_json(out_dir / "summary.json", summary)
        share_permissions(out_dir / "summary.json")
        log.info("exported %s", card_path)
    barrier(info)
    return summary


def machine_description() -> str:
    """CPU model and core count (for the record in exported cards)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


class _null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def copy_exported(out_dir: Path, target_dir: Path, name: str) -> None:
    """Copy an exported model (card + weights) into another models folder."""
    src = Path(out_dir) / "model"
    for suffix in (".yaml", ".safetensors"):
        shutil.copy2(src / f"{name}{suffix}", Path(target_dir) / f"{name}{suffix}")
