"""Atomic writes: complete outputs or the old ones, never a half-written file or folder."""

import os
import stat

import pytest

from vpr_ros.atomic import (DIR_MODE, FILE_MODE, atomic_directory, atomic_write_json,
                            atomic_write_text)


def test_file_replaced_whole_and_readable_by_others(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    from vpr_ros.atomic import atomic_path

    target = tmp_path / "report.json"
    atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_directory_swapped_in_only_on_success(tmp_path):
    target = tmp_path / "map"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    assert stat.S_IMODE(target.stat().st_mode) == DIR_MODE
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("2")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["map"]


def test_stale_temporary_folder_of_a_killed_build_is_removed(tmp_path):
    stale = tmp_path / ".map.tmp-dead"
    stale.mkdir()
    with atomic_directory(tmp_path / "map") as tmp:
        (tmp / "x").write_text("ok")
    assert not stale.exists()


def test_refuses_to_overwrite_when_asked(tmp_path):
    (tmp_path / "map").mkdir()
    with pytest.raises(FileExistsError):
        with atomic_directory(tmp_path / "map", overwrite=False):
            pass
