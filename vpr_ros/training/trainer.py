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

import contextlib
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
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import atomic_directory, atomic_write_json, atomic_write_text
from ..device import resolve_precision
from ..errors import CheckpointError, ConfigError
from ..preprocess import load_image, preprocess
from .config import (TrainConfig, dump_config, resolve_card_spec, resolve_path,
                     resolve_sources)
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


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based) for the configured schedule."""
    o = cfg.optim
    base = o.lr
    warm = o.warmup_steps
    if warm and step < warm:
        return base * (step + 1) / warm
    if o.schedule == "constant":
        return base
    if o.schedule == "step":
        period = max(1, o.step_epochs * steps_per_epoch)
        return base * o.step_gamma ** (step // period)
    total = max(1, o.epochs * steps_per_epoch - warm)
    t = min(1.0, (step - warm) / total)
    return o.min_lr + (base - o.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen (check freeze.*)")
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


# --------------------------------------------------------------------------- validation

@torch.no_grad()
def describe_paths(stage, paths: List[Path], batch_size: int, precision: torch.dtype,
                   progress: bool = False, fn=None) -> np.ndarray:
    """The stage model's output for image files, in eval mode: ``fn(x)`` (default
    ``stage.describe``: the global descriptors) per batch, concatenated as float32."""
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
                d = (fn or stage.describe)(x.to(stage.device))
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

def selection_metric(cfg) -> Tuple[str, str]:
    """(recall key, name) of the validation recall that picks the best epoch: R@5 (else
    the second of ``eval.recall_ns``), or the re-ranked R@1 with ``eval.rerank_k``."""
    if cfg.eval.rerank_k:
        return "1", f"re-ranked R@1 (first stage top {cfg.eval.rerank_k})"
    ns = [int(n) for n in cfg.eval.recall_ns]
    key = "5" if 5 in ns else str(ns[min(1, len(ns) - 1)])
    return key, f"R@{key}"


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
    from ..plotting import pyplot, save_png

    plt = pyplot()
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
    target = save_png(fig, out_dir / "curves.png", dpi=100)
    share_permissions(target)
    return target


def _read_csv(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# --------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, out_dir, resume: bool = False, progress: bool = True,
          max_steps: Optional[int] = None) -> dict:
    """Run one training stage; returns the summary dict (also written to summary.json).

    ``max_steps`` stops after that many optimiser steps in this call (tests, smoke runs);
    the checkpoint written at the stop lets ``resume=True`` continue.
    """
    out_dir = Path(out_dir).absolute()
    info = setup_distributed(cfg.device)
    try:
        return TrainingRun(cfg, out_dir, info, resume, progress, max_steps).run()
    finally:
        cleanup(info)


class TrainingRun:
    """One call of :func:`train`, in named steps: prepare the output folder, build the
    stage, data, optimiser and logs, then epochs of optimiser steps, each epoch ending
    with validation, the best-weights copy and a checkpoint; finally the export."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, info: DistInfo, resume: bool,
                 progress: bool, max_steps: Optional[int]):
        self.cfg, self.out_dir, self.info = cfg, out_dir, info
        self.resume, self.progress, self.max_steps = resume, progress, max_steps
        self.ns = [int(n) for n in cfg.eval.recall_ns]
        self.steps_this_call = 0
        self.stopped_early = False

    # -- setup -----------------------------------------------------------------------
    def run(self) -> dict:
        self.prepare_output()
        self.build_stage()
        self.build_data()
        self.build_optimisation()
        self.load_state()
        self.open_logs()
        self.t_run = time.time()
        self.train_seconds = float(self.state.get("train_seconds", 0.0))
        while self.state["epoch"] < self.cfg.optim.epochs and not self.stopped_early:
            if not self.run_epoch():
                break                                  # stopped inside the epoch (max_steps)
            self.end_epoch()
            if self.max_steps is not None and self.steps_this_call >= self.max_steps:
                break
        return self.finish()

    def prepare_output(self) -> None:
        cfg, out_dir = self.cfg, self.out_dir
        if self.resume:
            check_resumable(out_dir / "checkpoint")
        seed_everything(cfg.seed, cfg.deterministic)
        self.precision = resolve_precision(cfg.precision, self.info.device)
        if self.info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if not self.resume:
                for stale in ("steps.csv", "epochs.csv"):
                    (out_dir / stale).unlink(missing_ok=True)
            atomic_write_text(out_dir / "config.yaml", dump_config(cfg))
            share_permissions(out_dir / "config.yaml")

    def build_stage(self) -> None:
        self.stage = stage_class(self.cfg.stage)(self.cfg, self.info.device)
        log.info("%s", self.stage.summary())

    def build_data(self) -> None:
        cfg, d, info = self.cfg, self.cfg.data, self.info
        base = Path(cfg.base_dir) if cfg.base_dir else Path.cwd()
        k = d.images_per_place
        self.places = load_train_places(resolve_sources(cfg, d.train), base, k)
        self.val = (load_validation_set(resolve_sources(cfg, d.val), base, cfg.eval.radius_m)
                    if d.val else None)
        log.info("training set: %d places, %d images; validation: %s", len(self.places),
                 self.places.num_images,
                 f"{len(self.val.queries)} queries / {len(self.val.database)} database"
                 if self.val else "none")
        self.first_stage = None
        if cfg.mining.model:
            from .first_stage import FirstStage

            if info.enabled:
                raise ConfigError("mining.model trains in one process (no torchrun)")
            self.first_stage = FirstStage(resolve_card_spec(cfg, cfg.mining.model),
                                          resolve_path(cfg, cfg.mining.weights)
                                          if cfg.mining.weights else None, self.places,
                                          self.val if cfg.eval.rerank_k else None,
                                          self.progress, device=str(info.device))
            self.stage.mining_descriptors = self.first_stage.images
        sampler_args = (len(self.places), d.places_per_batch, cfg.seed, d.batches_per_epoch,
                        info.rank, info.world_size, self.places.positions(),
                        d.avoid_near_places_m)
        if cfg.mining.neighbour_places:
            from .first_stage import NeighbourBatchSampler

            self.sampler = NeighbourBatchSampler(self.first_stage.places,
                                                 cfg.mining.neighbour_places, *sampler_args)
        else:
            self.sampler = PlaceBatchSampler(*sampler_args)
        self.loader = make_train_loader(self.places, self.sampler, k,
                                        self.stage.card.input_size, d.augment.as_dict(),
                                        d.num_workers)
        self.accum = cfg.optim.grad_accum
        self.steps_per_epoch = max(1, self.sampler.batches_per_epoch // self.accum)

    def build_optimisation(self) -> None:
        info = self.info
        self.module = self.stage.train_module
        if info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [info.device.index] if info.device.type == "cuda" else None
            self.module = DDP(self.module, device_ids=ids, broadcast_buffers=False)
        self.optimizer = make_optimizer(self.cfg, self.stage.trainable_parameters())
        self.scaler = (torch.amp.GradScaler("cuda") if self.precision == torch.float16
                       else None)

    def load_state(self) -> None:
        self.ckpt_dir = self.out_dir / "checkpoint"
        self.state = {"stage": self.stage.name, "card": self.stage.card.name, "epoch": 0,
                      "batch": 0, "step": 0, "best_r5": -1.0, "best_epoch": None,
                      "not_improved": 0, "history": [], "train_seconds": 0.0}
        if self.resume:
            self.state = load_checkpoint(self.ckpt_dir, self.stage, self.optimizer, self.scaler)
            log.info("resuming at epoch %d, batch %d, step %d", self.state["epoch"],
                     self.state["batch"], self.state["step"])

    def open_logs(self) -> None:
        self.steps_log = self.epochs_log = None
        if not self.info.is_main:
            return
        metric_cols = list(self.stage.metric_names)
        self.steps_log = CsvLog(self.out_dir / "steps.csv",
                                ["step", "epoch", "lr", "loss"] + metric_cols + ["seconds"],
                                append=self.resume)
        self.epochs_log = CsvLog(self.out_dir / "epochs.csv",
                                 ["epoch", "step", "loss"] + metric_cols
                                 + [f"R@{n}" for n in self.ns] + ["seconds"],
                                 append=self.resume)

    def elapsed(self) -> float:
        return self.train_seconds + (time.time() - self.t_run)

    def checkpoint(self) -> None:
        self.state["train_seconds"] = self.elapsed()
        if self.info.is_main:
            save_checkpoint(self.ckpt_dir, self.stage, self.optimizer, self.scaler, self.state)
        barrier(self.info)

    # -- one epoch -------------------------------------------------------------------
    def run_epoch(self) -> bool:
        """Optimiser steps over one epoch; False when it stopped early for ``max_steps``
        (a checkpoint was written so that --resume continues)."""
        from tqdm import tqdm

        epoch, state = self.state["epoch"], self.state
        self.sampler.set_epoch(epoch, state["batch"])
        self.module.train()
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.window: Dict[str, float] = {}
        self.window_n = 0
        bar = tqdm(total=len(self.sampler),
                   desc=f"{self.stage.name} epoch {epoch + 1}/{self.cfg.optim.epochs}",
                   disable=not (self.progress and self.info.is_main), leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        micro = 0
        interrupted = False
        for images, labels, image_ids in self.loader:
            last_micro = (micro + 1) % self.accum == 0
            lr = learning_rate(self.cfg, state["step"], self.steps_per_epoch)
            self.stage.batch_image_ids = image_ids
            value = self.forward_backward(images, labels, lr, last_micro)
            micro += 1
            bar.update(1)
            if not last_micro:
                continue
            self.optimizer_step()
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            self.log_step(lr)
            ckpt_every = self.cfg.log.checkpoint_every_steps
            if ckpt_every and state["step"] % ckpt_every == 0:
                self.checkpoint()
            if self.max_steps is not None and self.steps_this_call >= self.max_steps:
                interrupted = True
                break
        bar.close()
        if interrupted and state["batch"] < self.sampler.batches_per_epoch:
            self.checkpoint()
            log.info("stopped after %d steps (max_steps); --resume continues",
                     self.steps_this_call)
            return False
        return True

    def forward_backward(self, images, labels, lr: float, last_micro: bool) -> float:
        """One micro-batch: forward, loss, backward (gradients accumulate); returns the loss."""
        from ..device import autocast_context

        info, state = self.info, self.state
        # Dropout etc. seeded per (epoch, batch, rank): a resumed run repeats it exactly.
        torch.manual_seed((((self.cfg.seed * 1_000_003 + state["epoch"]) * 1_000_003
                            + state["batch"]) * 64 + info.rank) % (2**63))
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sync_ctx = (self.module.no_sync() if info.enabled and not last_micro
                    else contextlib.nullcontext())
        with sync_ctx:
            with autocast_context(info.device, self.precision):
                outputs = self.module(images)
            outputs, labels = self.stage.gather(outputs, labels, info)
            loss, metrics = self.stage.compute_loss(outputs, labels)
            scaled = loss / self.accum
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
        state["batch"] += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {state['step']}; lower "
                                     "optim.lr or use precision fp32")
        for key, v in {"loss": value, **metrics}.items():
            self.sums[key] = self.sums.get(key, 0.0) + v
            self.window[key] = self.window.get(key, 0.0) + v
        self.count += 1
        self.window_n += 1
        return value

    def optimizer_step(self) -> None:
        """Clip, step (through the grad scaler under fp16), clear the gradients."""
        scaler, optimizer, clip = self.scaler, self.optimizer, self.cfg.optim.clip_grad_norm
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.stage.trainable_parameters(), clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.steps_this_call += 1

    def log_step(self, lr: float) -> None:
        """Every ``log.every_steps`` steps: the mean of the window as one steps.csv row."""
        step = self.state["step"]
        if step % max(1, self.cfg.log.every_steps) != 0 or not self.info.is_main:
            return
        row = {key: v / self.window_n for key, v in self.window.items()}
        row.update(step=step, epoch=self.state["epoch"], lr=lr,
                   seconds=round(self.elapsed(), 1))
        self.steps_log.write(row)
        self.window, self.window_n = {}, 0

    # -- end of epoch ----------------------------------------------------------------
    def end_epoch(self) -> None:
        info, state, epoch = self.info, self.state, self.state["epoch"]
        mean = {key: all_reduce_mean(info, v / max(1, self.count))
                for key, v in self.sums.items()}
        recalls = self.validate_epoch()
        self.keep_best(epoch, recalls)
        entry = {"epoch": epoch, "step": state["step"], **mean,
                 **{f"R@{n}": recalls.get(str(n), "") for n in self.ns},
                 "seconds": round(self.elapsed(), 1)}
        state["history"].append(entry)
        if info.is_main:
            self.epochs_log.write(entry)
            log.info("epoch %d: loss %.4f%s", epoch + 1, mean.get("loss", float("nan")),
                     "".join(f", R@{n} {100 * recalls[str(n)]:.1f}" for n in self.ns
                             if str(n) in recalls))
            plot_curves(self.out_dir)
        state["epoch"] += 1
        state["batch"] = 0
        if self.val is not None and state["not_improved"] >= self.cfg.optim.patience:
            log.info("validation R@5 did not improve for %d epochs: stopping",
                     self.cfg.optim.patience)
            self.stopped_early = True
        self.checkpoint()

    def validate_epoch(self) -> Dict[str, float]:
        """Validation Recall@N on the main process, shared with all processes."""
        recalls: Dict[str, float] = {}
        if self.val is not None and self.info.is_main:
            if self.cfg.eval.rerank_k:
                from .first_stage import rerank_validate

                fs = self.first_stage
                recalls = rerank_validate(self.stage, self.val, fs.val_db, fs.val_q,
                                          self.cfg.eval.rerank_k, self.ns,
                                          self.cfg.eval.batch_size, self.precision,
                                          self.progress)
                log.info("validation: first stage R@1 %.1f, re-ranked (K=%d) R@1 %.1f",
                         100 * recalls["first_1"], self.cfg.eval.rerank_k, 100 * recalls["1"])
            else:
                recalls = validate(self.stage, self.val, self.ns, self.cfg.eval.batch_size,
                                   self.precision, self.progress)
        return broadcast_object(self.info, recalls)

    def selection_recall(self, recalls: Dict[str, float]) -> Optional[float]:
        """The validation recall that picks the best epoch: R@5 (else the second N), or the
        re-ranked R@1 with ``eval.rerank_k`` (re-ranking keeps R@K; it changes R@1).  The
        state and summary keep their historical key ``best_r5`` / ``best_val_R@5`` for it,
        with ``best_val_metric`` naming what it is (:func:`selection_metric`)."""
        return recalls.get(selection_metric(self.cfg)[0])

    def keep_best(self, epoch: int, recalls: Dict[str, float]) -> None:
        """Copy the weights to ``best/`` when the selection recall improved (or without
        validation)."""
        from safetensors.torch import save_file

        state = self.state
        score = self.selection_recall(recalls)
        improved = self.val is None or (score is not None and score > state["best_r5"])
        if not improved:
            state["not_improved"] += 1
            return
        state["best_r5"] = score if score is not None else state["best_r5"]
        state["best_epoch"] = epoch
        state["not_improved"] = 0
        if self.info.is_main:
            with atomic_directory(self.out_dir / "best") as tmp:
                save_file(_state_dict_cpu(self.stage.model), str(tmp / "model.safetensors"))
                (tmp / "state.json").write_text(json.dumps(
                    {"epoch": epoch, "step": state["step"], "recalls": recalls}) + "\n")
                share_permissions(tmp)

    # -- the end ---------------------------------------------------------------------
    def finish(self) -> dict:
        state, info, stage = self.state, self.info, self.stage
        finished = state["epoch"] >= self.cfg.optim.epochs or self.stopped_early
        summary = {
            "stage": stage.name, "card": stage.card.name, "finished": finished,
            "epochs_done": state["epoch"], "steps": state["step"],
            "best_epoch": state["best_epoch"], "best_val_R@5": state["best_r5"],
            # what picked the epoch (eval.rerank_k: the re-ranked R@1, kept under that key)
            "best_val_metric": selection_metric(self.cfg)[1],
            "history": state["history"], "train_seconds": round(self.elapsed(), 1),
            "world_size": info.world_size, "device": str(info.device),
            "host": socket.gethostname(), "machine": machine_description(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "command": " ".join(sys.argv),
        }
        if finished and info.is_main:
            summary["model_card"] = str(self.export())
            atomic_write_json(self.out_dir / "summary.json", summary)
            share_permissions(self.out_dir / "summary.json")
            log.info("exported %s", summary["model_card"])
        barrier(info)
        return summary

    def export(self) -> Path:
        """The best epoch's weights (or the last) as a model card + safetensors."""
        from safetensors.torch import load_file

        state, stage, ns, info = self.state, self.stage, self.ns, self.info
        best = self.out_dir / "best" / "model.safetensors"
        weights = load_file(str(best)) if best.is_file() else _state_dict_cpu(stage.model)
        name = self.cfg.export_name or self.out_dir.name
        last = state["history"][-1] if state["history"] else {}
        best_entry = next((h for h in state["history"] if h["epoch"] == state["best_epoch"]),
                          last)
        val_text = ", ".join(f"R@{n} {100 * float(best_entry[f'R@{n}']):.1f}%" for n in ns
                             if best_entry.get(f"R@{n}") not in ("", None))
        notes = (f"Trained by `vpr train {stage.name}` (vpr_ros) from card {stage.card.name}: "
                 f"{state['epoch']} epochs, {state['step']} optimiser steps, "
                 f"seed {self.cfg.seed}, {info.world_size} process(es) on {info.device} "
                 f"({machine_description()}), {self.elapsed() / 60:.1f} min. Exported epoch "
                 f"{(state['best_epoch'] or 0) + 1} (1-based); "
                 f"validation {val_text or 'none'}")
        return export_model(self.out_dir, stage, weights, name, notes, "")


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


def copy_exported(out_dir: Path, target_dir: Path, name: str) -> None:
    """Copy an exported model (card + weights) into another models folder."""
    src = Path(out_dir) / "model"
    for suffix in (".yaml", ".safetensors"):
        shutil.copy2(src / f"{name}{suffix}", Path(target_dir) / f"{name}{suffix}")
