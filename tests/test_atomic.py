"""experiments.core.atomic: a file or directory appears complete under its name or not at all; a failure
(a full disk, simulated: the writer raises OSError(ENOSPC) after writing some bytes) leaves neither the
target nor a temporary beside it, names the target, and a rerun succeeds; modes follow the umask."""
import errno
import os
import stat

import pytest

from experiments.core.atomic import atomic_dir, atomic_file, write_file


def _full_disk(path, data):
    """A write that stores half of ``data`` and then finds the disk full (write() names no file)."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_file_failure_leaves_nothing_and_names_the_target(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(OSError) as e:
        with atomic_file(target) as tmp:
            _full_disk(tmp, b"x" * 1000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:   # the rerun
        write_file(tmp, b"complete")
    assert target.read_bytes() == b"complete" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_file_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_dir_failure_leaves_nothing_and_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(OSError) as e:
        with atomic_dir(target) as tmp:
            write_file(tmp / "a", b"a")
            _full_disk(tmp / "b", b"b" * 100)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []

    with atomic_dir(target) as tmp:
        write_file(tmp / "a", b"first")
    with pytest.raises(FileExistsError):
        with atomic_dir(target) as tmp:
            write_file(tmp / "a", b"second")
    with pytest.raises(OSError):
        with atomic_dir(target, overwrite=True) as tmp:
            _full_disk(tmp / "a", b"second")
    assert (target / "a").read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["d"]
    with atomic_dir(target, overwrite=True) as tmp:
        write_file(tmp / "a", b"second")
    assert (target / "a").read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_failed_rename_restores_the_previous_directory(tmp_path, monkeypatch):
    target = tmp_path / "d"
    with atomic_dir(target) as tmp:
        write_file(tmp / "a", b"first")
    real = os.rename

    def rename(src, dst):
        if str(dst) == str(target) and ".tmp-" in str(src):
            raise OSError(errno.EIO, "injected")
        return real(src, dst)
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="injected"):
        with atomic_dir(target, overwrite=True) as tmp:
            write_file(tmp / "a", b"second")
    assert (target / "a").read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_modes_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "f") as tmp:
            write_file(tmp, b"x")
        with atomic_dir(tmp_path / "d") as tmp:
            write_file(tmp / "x", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "d" / "x").stat().st_mode) == 0o666 & ~umask
