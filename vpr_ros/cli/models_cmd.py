"""`vpr models`: the model cards that are available and whether their weights are."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list model cards",
                              description="List the model cards: name, architecture, "
                                          "descriptor size, input size and weights status.")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (on the last line)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models.cards import default_card_name, default_rerank_card_name, list_cards, models_dir

    cards = list_cards()
    default = default_card_name()
    default_rerank = default_rerank_card_name()
    rows = []
    for c in cards:
        rows.append({
            "name": c.name,
            "architecture": c.architecture,
            "descriptor_dim": c.descriptor_dim,
            "local_shape": list(c.local_shape) if c.local_shape else None,
            "input_size": list(c.input_size),
            "weights": c.weights_status(),
            "default": c.name == default,
            "default_rerank": c.name == default_rerank,
            "inferred": c.inferred,
            "description": c.description,
        })
    if args.json:
        print(json.dumps({"models_dir": str(models_dir()), "default": default,
                          "default_rerank": default_rerank, "models": rows}))
        return 0
    header = ("NAME", "ARCHITECTURE", "DIM", "INPUT", "WEIGHTS")
    table = [header] + [(r["name"] + (" *" if r["default"] else "")
                         + (" +" if r["default_rerank"] else ""), r["architecture"],
                         str(r["descriptor_dim"]), "x".join(map(str, r["input_size"])),
                         r["weights"] + (" [settings inferred]" if r["inferred"] else ""))
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"\n* default model, + default re-ranker (--rerank without --rerank-model).  "
          f"Cards folder: {models_dir()}")
    return 0
