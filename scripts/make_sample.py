#!/usr/bin/env python3
"""Copy the shipped demo sample out of a Nordland dataset folder in the benchmark layout.

The sample is the last ``--count`` places of the sequence (summer database, winter
queries), which the demo model never sees in training (see models/demo_tiny.yaml).
Usage::

    python scripts/make_sample.py ../shared/data/nordland64_summer_winter_part1 \
        samples/nordland_mini
"""

import argparse
import csv
import shutil
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("source", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--count", type=int, default=200)
    args = ap.parse_args()
    for split, csv_name in (("database", "poses_database.csv"), ("queries", "poses_queries.csv")):
        rows = list(csv.DictReader(open(args.source / csv_name)))
        rows = rows[-args.count:]
        out_img = args.dest / "images" / "test" / split
        out_img.mkdir(parents=True, exist_ok=True)
        for row in rows:
            shutil.copy2(args.source / "images" / "test" / split / row["filename"],
                         out_img / row["filename"])
        with open(args.dest / csv_name, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
