"""Long-format CSV tables under ``results/`` with atomic, resumable appends.

Each append rewrites the whole file to a temporary name in the same directory, fsyncs it and
``os.replace``s it over the old one, so a kill at any moment leaves either the old table or the
new one, never a half-written row. Tables are small (one row per measured point), so rewriting
is cheap.
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]]) -> None:
    """Atomically replace ``path`` with ``rows``; the header is the union of keys in first-seen order."""
    rows = [dict(r) for r in rows]
    header: list[str] = []
    for r in rows:
        header.extend(k for k in r if k not in header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_row(path: str | os.PathLike, row: Mapping[str, object]) -> None:
    """Append one complete row atomically (see module docstring)."""
    write_rows(path, read_rows(path) + [dict(row)])


def replace_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]],
                 key: Iterable[str]) -> None:
    """Upsert ``rows`` into the table: rows with the same values in ``key`` columns are replaced."""
    key = tuple(key)
    new = [dict(r) for r in rows]
    new_keys = {tuple(str(r.get(k, "")) for k in key) for r in new}
    kept = [r for r in read_rows(path) if tuple(str(r.get(k, "")) for k in key) not in new_keys]
    write_rows(path, kept + new)
