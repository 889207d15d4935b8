#!/usr/bin/env python3
"""Write the ViT backbone of a trained vpr_ros model as a backbone-only weights file.

The training stages read such a file like a DINOv2 pretrain (``init_weights``): the
backbone is loaded, everything else (SelaVPR adapters, GeM, LocalAdapt) keeps its seeded
start.  Used by ``make demo-reranker`` to start the demo re-ranker from the shipped demo
model's backbone:

    python scripts/export_backbone.py models/demo_tiny.safetensors \
        runs/demo_tiny_backbone.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="weights file of a vpr_ros model (safetensors)")
    p.add_argument("out", help="backbone-only safetensors file to write")
    args = p.parse_args(argv)

    from safetensors.torch import save_file

    from vpr_ros.atomic import atomic_path
    from vpr_ros.errors import VprError
    from vpr_ros.models.checkpoint import read_checkpoint

    try:
        state, _ = read_checkpoint(args.source)
    except VprError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backbone = {k[len("backbone."):]: v.contiguous() for k, v in state.items()
                if k.startswith("backbone.")}
    if not backbone:
        print(f"error: {args.source} has no backbone.* tensors", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        save_file(backbone, str(tmp))
    print(f"{len(backbone)} backbone tensors -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
