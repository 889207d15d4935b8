"""`vpr train teacher|student|selavpr`: train a model from a YAML recipe.

    vpr train teacher --config config/train/teacher_b.yaml --out runs/teacher_b
    vpr train student --config config/train/student_b.yaml --out runs/student_b \
        --set optim.lr=5e-5 --set data.places_per_batch=32
    vpr train teacher --config ... --out runs/teacher_b --resume

Several processes (CPU: gloo, GPUs: nccl, one GPU per process)::

    torchrun --nproc_per_node=N -m vpr_ros.cli.main train teacher --config ... --out ...
"""

from __future__ import annotations

import argparse
import json
import sys

from ..training.config import STAGES


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the teacher, the distilled student or SelaVPR",
        description="Train one stage from a YAML config (see docs/training.md). "
                    "--set KEY=VALUE (repeatable) overrides config keys (e.g. --set "
                    "optim.lr=5e-5); KEY=VALUE words right after the stage work too.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("stage", choices=STAGES, help="what to train")
    p.add_argument("--config", required=True, help="training config (YAML)")
    p.add_argument("--out", default=None,
                   help="output folder (default runs/<export_name or stage_config>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint (same epoch/batch/step)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimiser steps (a checkpoint is written; "
                        "--resume continues)")
    p.add_argument("--shared-dir", default=None, metavar="DIR",
                   help="folder that ${VPR_SHARED_DIR} stands for in the config's data paths "
                        "(default: $VPR_SHARED_DIR, else shared/ beside the repository)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--set", dest="set_overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides (directly after the stage)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import run as run_training

    summary = run_training(args.config, stage=args.stage, out_dir=args.out, resume=args.resume,
                           overrides=list(args.overrides) + list(args.set_overrides),
                           progress=not args.no_progress,
                           max_steps=args.max_steps, shared_dir=args.shared_dir)
    if args.json:
        # one write per line: under torchrun every rank shares this stdout, and print()'s
        # separate writes of text and newline let two ranks' lines run together
        sys.stdout.write(json.dumps({k: v for k, v in summary.items()}, default=str) + "\n")
        sys.stdout.flush()
    else:
        best = summary.get("best_val_R@5")
        print(f"{summary['stage']}: {summary['epochs_done']} epochs, {summary['steps']} steps, "
              f"{summary['train_seconds'] / 60:.1f} min"
              + (f", best val {summary.get('best_val_metric', 'R@5')} {100 * best:.1f}%"
                 if best is not None and best >= 0 else "")
              + (f"; model: {summary['model_card']}" if summary.get("model_card") else
                 " (not finished: --resume continues)"))
    return 0
