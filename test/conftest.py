"""Shared fixtures: where the fixture data lives, and DDS isolation for ROS tests.

``VPR_SHARED_DIR`` (default ``<repo>/../shared``) holds ``data/`` and ``reference/``;
``VPR_REFERENCE_DIR`` overrides the reference fixture folder alone, so the parity
tests run on any fixture set of the same format.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("VPR_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


def reference_dir() -> Path:
    env = os.environ.get("VPR_REFERENCE_DIR")
    return Path(env).resolve() if env else shared_dir() / "reference"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test fixture folder missing: {path} (set VPR_SHARED_DIR / VPR_REFERENCE_DIR)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference() -> Path:
    return _require(reference_dir())


@pytest.fixture(scope="session")
def nordland_dir() -> Path:
    return _require(shared_dir() / "data" / "nordland64_summer_winter_part1")


@pytest.fixture(scope="session")
def grief_dir() -> Path:
    return _require(shared_dir() / "data" / "grief_michigan_seasons")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The sample dataset the package itself ships (a copy with attribution)."""
    return _require(REPO_ROOT / "samples" / "nordland_mini")


@pytest.fixture()
def ros_domain(monkeypatch):
    """Isolate DDS traffic of one test: random domain id, localhost discovery only."""
    domain = random.Random(os.getpid() ^ id(monkeypatch)).randint(1, 101)
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return domain
