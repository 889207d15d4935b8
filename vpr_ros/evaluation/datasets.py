"""Moved to :mod:`vpr_ros.datasets` (maps and evaluation both read the benchmark layout,
and maps must not import evaluation).  This re-export keeps ``from .datasets import ...``
in evaluation modules working until they import :mod:`vpr_ros.datasets` directly."""

from ..datasets import (IMAGE_EXTENSIONS, SPLITS, BenchmarkSplit, list_images,  # noqa: F401
                        read_ground_truth, read_split, split_folder, utm_from_name)
