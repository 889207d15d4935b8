"""Shared fixtures, test tiers and where the fixture data lives.

Fixture data: ``VPR_SHARED_DIR`` (default ``<repo>/../shared``) holds ``data/`` and
``reference/``; ``VPR_REFERENCE_DIR`` overrides the reference fixture folder alone, so
the parity tests run on any fixture set of the same format.  When the folder is
missing, the session stops at once with one message naming ``VPR_SHARED_DIR``.

Tiers (markers registered in setup.cfg, applied here by file and fixture so the test
files stay free of tier bookkeeping):

    ros      talks to rclpy nodes over DDS        (files in ROS_FILES, fixture ros_domain)
    launch   goes through the ROS 2 launch system (file or test name contains "launch")
    colcon   builds the package with colcon       (files in COLCON_FILES)
    ddp      starts torchrun / several processes  (files in DDP_FILES)
    slow     takes more than a few seconds here   (SLOW_FILES, SLOW_TESTS, and every test
             of the tiers above)

``make test-fast`` runs ``-m "not slow"``; ``make test`` and CI run everything.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ tiers

ROS_FILES = {"test_ros_node.py", "test_demo.py"}
ROS_FIXTURES = {"ros_domain", "harness_factory"}
COLCON_FILES = {"test_colcon_build.py"}
DDP_FILES = {"test_training_ddp.py"}
# Whole files whose tests mostly take seconds (parity on stored outputs, benchmark baselines).
SLOW_FILES = {"test_parity_selavpr.py", "test_perf_equivalence.py"}
# Single tests of 1.4 s or more on the 2-core development machine (pytest --durations=60);
# test_tiers.py checks that every name here still exists.
SLOW_TESTS = {
    "test_maps.py::test_killed_cli_build_leaves_the_previous_map",
    "test_ros_free.py::test_importing_every_core_module_loads_no_ros",
    "test_ros_free.py::test_no_ros_imports_in_core_sources",
    "test_lint.py::test_flake8_enforces_the_configured_style",
    "test_local_storage.py::test_cli_build_with_int8_local_storage",
    "test_local_storage.py::test_int8_map_is_half_the_size_memory_mapped_and_reranks_like_float16",
    "test_training.py::test_training_run_resume_continues_from_saved_step",
    "test_training.py::test_student_and_selavpr_run_through_the_trainer",
    "test_eval_recall.py::test_eval_recall_cli_end_to_end_on_the_sample",
    "test_eval_recall.py::test_eval_recall_with_reranking_and_with_a_given_map",
    "test_eval_recall.py::test_queries_without_driving_order_are_scored_as_single_frames",
    "test_eval_recall.py::test_eval_recall_with_an_odometry_file",
    "test_eval_recall.py::test_grief_says_the_stream_prior_does_not_fit",
    "test_bag_eval.py::test_offline_bag_eval_on_the_map_drive_is_perfect",
    "test_bag_eval.py::test_cli_bag_from_images_info_and_eval_bag",
    "test_bag_eval.py::test_poses_csv_by_order_and_missing_ground_truth",
    "test_bag_eval.py::test_shifted_ground_truth_gives_the_expected_recall",
    "test_bag_eval.py::test_eval_bag_stream_with_an_odometry_topic",
    "test_checkpoints.py::test_every_manifest_maps_exactly_onto_its_card",
    "test_localizer.py::test_queries_match_a_hand_computed_search_and_recall",
    "test_int8_kernels.py::test_cache_is_reused_and_written_atomically",
    "test_fast_paths.py::test_descriptor_precisions_close_and_batch_invariant",
    "test_fast_paths.py::test_fp32_counts_unchanged_on_reference",
    "test_fast_paths.py::test_bf16_counts_are_exact_for_bf16_similarities_on_reference",
    # the tests of the lead's test_stream.py that use its 28 s module fixture `sample`
    "test_stream.py::test_steady_drive_near_perfect_while_single_frames_are_not",
    "test_stream.py::test_speed_changes_without_odometry",
    "test_stream.py::test_odometry_makes_speed_changes_harmless",
    "test_stream.py::test_kidnap_is_recovered",
    "test_stream.py::test_unordered_places_fall_back_to_single_frame",
    "test_stream.py::test_bad_odometry_is_rejected_and_counted",
    "test_stream.py::test_degenerate_frames_are_never_confident",
    "test_stream.py::test_reset_forgets_and_localizes_globally_again",
    "test_stream.py::test_leaving_the_mapped_route_and_coming_back",
    # the bad-input corpus cases that run `vpr` in subprocesses (model load each)
    "test_bad_input.py::test_bad_image_file",
    "test_bad_input.py::test_pixel_limit_is_an_option_checked_from_the_header",
    "test_bad_input.py::test_large_legal_image_memory_stays_bounded",
    "test_bad_input.py::test_bad_poses_csv",
    "test_bad_input.py::test_binary_poses_csv_of_a_benchmark_dataset",
    "test_bad_input.py::test_corrupt_map_header_in_a_subprocess",
    "test_bad_input.py::test_bad_weights",
    "test_bad_input.py::test_bad_device",
    "test_bad_input.py::test_eval_bag_skips_and_counts_an_undecodable_message",
    "test_bad_input.py::test_disk_full",
    "test_bad_input.py::test_read_only_folder",
    "test_bad_input.py::test_concurrent_map_add_never_loses_a_reported_success",
    "test_bad_input.py::test_lock_names_the_writer_and_readers_do_not_block",
    "test_bad_input.py::test_killed_swap_leaves_a_map_that_opens",
    "test_bad_input.py::test_strace_injected_kill_at_the_swap",
}


def _tiers(item) -> set:
    path = Path(str(item.fspath))
    name = path.name
    test_id = f"{name}::{item.originalname if hasattr(item, 'originalname') else item.name}"
    fixtures = set(getattr(item, "fixturenames", ()))
    tiers = set()
    if name in ROS_FILES or fixtures & ROS_FIXTURES:
        tiers.add("ros")
    if "launch" in name or "launch" in item.name:
        tiers.add("launch")
    if name in COLCON_FILES:
        tiers.add("colcon")
    if name in DDP_FILES:
        tiers.add("ddp")
    if tiers or name in SLOW_FILES or test_id in SLOW_TESTS:
        tiers.add("slow")
    return tiers


def pytest_collection_modifyitems(config, items):
    for item in items:
        for tier in sorted(_tiers(item)):
            item.add_marker(getattr(pytest.mark, tier))


# ------------------------------------------------------------------ fixture data


def shared_dir() -> Path:
    return Path(os.environ.get("VPR_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


def reference_dir() -> Path:
    env = os.environ.get("VPR_REFERENCE_DIR")
    return Path(env).resolve() if env else shared_dir() / "reference"


def pytest_sessionstart(session):
    """Stop at once, with one message, when the shared fixture folder is missing."""
    if not shared_dir().is_dir():
        pytest.exit(f"test fixture folder not found: {shared_dir()}. Put the shared data "
                    f"beside the repository as ../shared or set VPR_SHARED_DIR=/path/to/shared "
                    f"(VPR_REFERENCE_DIR overrides its reference/ part).", returncode=4)


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
def kernels():
    """The native kernels (re-ranking tests); skipped where no C compiler exists."""
    from vpr_ros.accel.int8_kernels import native_kernels
    k = native_kernels(enabled=True)
    if k is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    return k


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


# ------------------------------------------------------------------ shared models and data

TINY_CARD = "scicevpr_tiny_random"


@pytest.fixture(scope="session")
def describer():
    """The seeded random tiny SciceVPR describer on the CPU (batch invariant, so one is
    shared by every test file that does not need another batch size)."""
    from vpr_ros.inference import GlobalDescriber

    return GlobalDescriber(TINY_CARD, device="cpu", batch_size=8)


@pytest.fixture(scope="session")
def sample_database(sample_dir):
    """The shipped sample's database places (benchmark layout), in order."""
    from vpr_ros.maps import benchmark_source

    return benchmark_source(sample_dir, "database")


@pytest.fixture(scope="session")
def sample_queries(sample_dir):
    """The shipped sample's query images (benchmark layout), in order."""
    from vpr_ros.maps import benchmark_source

    return benchmark_source(sample_dir, "queries")


@pytest.fixture()
def ros_domain(monkeypatch):
    """Isolate DDS traffic of one test: random domain id, localhost discovery only."""
    domain = random.Random(os.getpid() ^ id(monkeypatch)).randint(1, 101)
    monkeypatch.setenv("ROS_DOMAIN_ID", str(domain))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    monkeypatch.setenv("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return domain


# ------------------------------------------------ shared re-ranking scenarios (exact paths)

def official_mnn_counts(query, cands) -> list:
    """The official algorithm: per candidate the whole float32 matrix, torch.argmax both
    ways (first index on ties), the mutual pairs counted."""
    import numpy as np
    import torch

    q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(-1, np.shape(query)[-1])
    out = []
    for c in cands:
        c = torch.as_tensor(np.asarray(c, dtype=np.float32)).reshape(-1, q.shape[1])
        sim = c @ q.T
        out.append(int((sim.argmax(1)[sim.argmax(0)] == torch.arange(q.shape[0])).sum()))
    return out


# (query h, w), (candidate h, w), channels: maps that do not fill the kernels' tiles
RERANK_ODD_SHAPES = [((1, 1), (1, 1), 2), ((1, 1), (7, 9), 3), ((5, 3), (1, 1), 4),
                     ((61, 61), (61, 61), 15), ((9, 8), (17, 5), 129), ((3, 67), (2, 33), 128),
                     ((8, 8), (9, 9), 1), ((11, 12), (5, 13), 130)]


def rerank_odd_shape_maps(shape):
    """Random maps of one of RERANK_ODD_SHAPES: float32 query, float16 candidates."""
    import numpy as np

    (qh, qw), (ch, cw), c = shape
    rng = np.random.default_rng(qh * 100 + ch + c)
    return (rng.standard_normal((qh, qw, c)).astype(np.float32),
            rng.standard_normal((3, ch, cw, c)).astype(np.float16))


def rerank_tie_maps(seed: int):
    """Repeated points (flat image regions), a place seen again and coarsely rounded values:
    exact ties in both directions."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(13, 11, 6, generator=g), dim=-1)
    cands = F.normalize(torch.randn(4, 13, 11, 6, generator=g), dim=-1)
    q[:3] = q[0]
    q[5, 2:9] = q[5, 2]
    cands[:, 3:7] = cands[:, 3:4]
    cands[1] = q
    cands[2, :, :5] = q[:, :5]
    cands[3] = torch.round(cands[3] * 2) / 2              # many exactly equal values
    return q, cands


def rerank_extreme_maps():
    """Very different norms, an all-zero map (all ties), a map too small for codes (1e-36),
    the query itself, a 1e20 map."""
    import numpy as np

    rng = np.random.default_rng(7)
    q = rng.standard_normal((20, 20, 16)).astype(np.float32)
    q *= rng.uniform(0.01, 30.0, (20, 20, 1)).astype(np.float32)
    cands = [rng.standard_normal((20, 20, 16)).astype(np.float32) * 1e-3,
             np.zeros((20, 20, 16), np.float32),
             rng.standard_normal((20, 20, 16)).astype(np.float32) * 1e-36,
             q.copy(),
             rng.standard_normal((20, 20, 16)).astype(np.float32) * 1e20]
    cands[0][4, 4] = 0.0
    return q, cands


def selavpr_reference_sets(reference: Path):
    """(file name, local features (N, P, C) tensor, official counts (N, N)) of every SelaVPR
    fixture set in ``reference``; at least one must exist."""
    import numpy as np
    import torch

    files = sorted(reference.glob("selavpr*_outputs.npz"))
    assert files, f"no SelaVPR fixtures in {reference}"
    for path in files:
        data = np.load(path)
        yield path.name, torch.from_numpy(data["local_feats"]), data["mutual_nn_counts"]
