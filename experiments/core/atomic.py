"""Atomic writes: a file or directory appears complete under its name, or not at all.

    with atomic_file("model.gguf") as tmp:     # a unique temporary name beside the target
        write_somehow(tmp)                      # open(tmp, "wb"), gguf.GGUFWriter(tmp), ...
    # now: tmp's data fsynced, given an ordinary mode, renamed to model.gguf, the directory fsynced

    with atomic_dir("saved/m", overwrite=False) as tmp:    # the same for a directory
        write_file(tmp / "a.safetensors", data)

The temporary path is made by :mod:`tempfile` in the target's own directory (so the rename never
crosses a filesystem and two writers never share a name). On any error inside the block or while
finishing, the temporary file or directory is removed and the error propagates: a full disk, a
kill or a crash leaves either no target or the previous one, never a half-written one, and a
rerun starts clean. (A ``kill -9`` cannot run the clean-up: it leaves a hidden ``.<name>.*``
temporary beside the target, never the target.) An ``OSError`` that names no file (``write``,
``flush`` or ``close`` on a full disk) is raised again naming the target, so the command line's
one ``error:`` line can say where (``experiments.__main__``).

Modes follow the umask as ``open()`` and ``mkdir()`` do (``0o666``/``0o777`` less the umask,
typically ``0644``/``0755``), not :mod:`tempfile`'s private ``0600``/``0700``.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask (Linux: read from /proc, no change; elsewhere: set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir()`` gives a new directory: ``0o777`` less the umask."""
    return 0o777 & ~current_umask()


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data (or a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """:func:`fsync_path` for a directory, where a filesystem that cannot sync directories is not an error."""
    with contextlib.suppress(OSError):
        fsync_path(path)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (a plain write: use it inside :func:`atomic_file`/:func:`atomic_dir`)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def naming(error: BaseException, target: str | os.PathLike,
           temporary: str | os.PathLike | None = None) -> BaseException:
    """``error`` itself, or for an ``OSError`` that names no file (or only the temporary one) the same
    error naming ``target``: what a full disk during ``write``/``close`` raises says where."""
    if not isinstance(error, OSError) or error.errno is None:
        return error
    name = error.filename
    if name is not None and (temporary is None or not str(name).startswith(str(temporary))):
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(target))


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; after the block, publish it as ``target`` (replacing
    any file there) or, on any error, remove it. See the module docstring."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        named = naming(e, target, tmp)
        if named is e:
            raise
        raise named from e


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` atomically (:func:`atomic_file`), with an ordinary file mode (the umask)."""
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary directory beside ``target``; after the block, fsync every file in it
    and rename it to ``target`` (an existing ``target`` is a ``FileExistsError`` unless ``overwrite``,
    then it is replaced as a whole: it stays in place if the new one cannot take its name). On any error
    the temporary directory is removed. See the module docstring."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        for p in sorted(tmp.rglob("*")):
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_dir(tmp)
        if os.path.lexists(target):
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "already exists; choose another directory", str(target))
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, trash / "old")
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(trash / "old", target)
                trash.rmdir()
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        named = naming(e, target, tmp)
        if named is e:
            raise
        raise named from e
