"""Atomic writes: whole files or none, with the permissions of a plain write."""

import os
import stat

import pytest

from epviz.atomic import atomic_write, atomic_write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_new_file_gets_the_umask_mode_not_the_temporary_files(tmp_path):
    old = os.umask(0o022)
    try:
        written = atomic_write_text(tmp_path / "sub" / "table.csv", "a,b\n")
    finally:
        os.umask(old)
    assert written.read_text() == "a,b\n"
    assert mode(written) == 0o644, "readable by the group and others, as open(..., 'w') would make it"


def test_a_replaced_file_keeps_its_mode(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and mode(target) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")

    def fail(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]
