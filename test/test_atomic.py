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


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_dead_processes_go_those_of_live_ones_stay(tmp_path):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        (tmp_path / f".map.tmp-{dead}-abc").mkdir()
        (tmp_path / f".map.old-{dead}").mkdir()
        (tmp_path / f".map.tmp-{live.pid}-xyz").mkdir()
        (tmp_path / f".map.old-{live.pid}").mkdir()
        (tmp_path / "map").mkdir()                         # so the .old is not restored
        with atomic_directory(tmp_path / "map") as tmp:
            (tmp / "x").write_text("ok")
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["map", f".map.tmp-{live.pid}-xyz", f".map.old-{live.pid}"])
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_swap_with_and_without_rename_exchange(tmp_path, monkeypatch, exchange):
    import vpr_ros.atomic as atomic

    if not exchange:
        monkeypatch.setattr(atomic, "_exchange_supported", False)
    target = tmp_path / "map"
    for text in ("1", "2"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text(text)
    assert (target / "a").read_text() == "2"
    assert sorted(os.listdir(tmp_path)) == ["map"]


def test_exchange_swaps_two_folders_in_one_call(tmp_path):
    from vpr_ros.atomic import exchange

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "in_a").write_text("")
    (tmp_path / "b").mkdir()
    if not exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not offered on this file system")
    assert os.listdir(tmp_path / "b") == ["in_a"] and os.listdir(tmp_path / "a") == []


def test_reader_restores_a_map_left_missing_between_two_renames(tmp_path):
    from vpr_ros.atomic import recover

    old = tmp_path / f".map.old-{_dead_pid()}"
    old.mkdir()
    (old / "a").write_text("old")
    assert recover(tmp_path / "map", wait_s=0)
    assert (tmp_path / "map" / "a").read_text() == "old" and not old.exists()
    assert not recover(tmp_path / "other", wait_s=0)


def test_output_errors_name_the_path(tmp_path, monkeypatch):
    import errno

    from vpr_ros.atomic import atomic_path
    from vpr_ros.errors import OutputError

    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(OutputError, match=f"cannot write {target}: No space left on device; "
                                          "the disk is full"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.bin"]
