"""Benchmarks of vpr_ros (speed and scale evidence; see README.md here).

A package so that tests import the baselines they check (``from benchmarks import
bench_rerank``) without touching ``sys.path``.  Run a benchmark from the repository root as
``python -m benchmarks.run_all`` (or ``python benchmarks/run_all.py``).
"""
