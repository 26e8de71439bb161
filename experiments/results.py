"""Long-format CSV tables with atomic, resumable appends, one context per table.

Each append rewrites the whole file to a temporary name in the same directory, fsyncs it and
``os.replace``s it over the old one, so a kill at any moment leaves either the old table or the
new one, never a half-written row. Tables are small (one row per measured point), so rewriting
is cheap. The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask,
``0644`` typically), not the ``0600`` of the temporary file.

A table holds one *context* (the model, corpus, settings and machine its rows were measured
with; the columns are named by the caller, e.g. ``experiments.runs.SWEEP_CONTEXT``). Writers pass
``context=`` and a row whose context differs from the rows already in the table raises
:class:`ContextMismatch` instead of being mixed in; readers call :func:`check_single_context`.
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from experiments.atomic import naming


class ContextMismatch(ValueError):
    """A row would mix another context (model, corpus, settings, machine) into a table."""


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back (single-threaded CLI writers).
    old = os.umask(0o022)
    os.umask(old)
    return old


def _cell(v: object) -> str:
    """A value as it reads back from the CSV ('' for missing/NaN), for context comparisons."""
    if v is None:
        return ""
    if isinstance(v, float) and v != v:  # NaN from pandas
        return ""
    return str(v)


def context_of(row: Mapping[str, object], columns: Sequence[str]) -> dict[str, str]:
    return {c: _cell(row.get(c)) for c in columns if c in row}


def describe_context(ctx: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in ctx.items())


def check_context(path: str | os.PathLike, new_rows: Iterable[Mapping[str, object]], columns: Sequence[str],
                  existing: list[dict[str, str]] | None = None) -> None:
    """Raise :class:`ContextMismatch` when ``new_rows`` differ from the rows of ``path`` (or from each
    other) in any of ``columns`` present in the table. An empty or missing table accepts any context."""
    rows = read_rows(path) if existing is None else existing
    new_rows = [dict(r) for r in new_rows]
    ref = rows[0] if rows else (new_rows[0] if new_rows else None)
    if ref is None:
        return
    header = set(ref) if rows else set().union(*(set(r) for r in new_rows))
    cols = [c for c in columns if c in header]
    want = context_of(ref, cols)
    for r in new_rows:
        got = context_of(r, cols)
        diff = {k: (want.get(k, ""), got.get(k, "")) for k in cols if want.get(k, "") != got.get(k, "")}
        if diff:
            what = "; ".join(f"{k}: table has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
            raise ContextMismatch(
                f"{path} holds results of another context ({what}). A table holds one context (model, corpus, "
                f"settings, machine) so that runs never mix: write this run elsewhere (--run NAME or --out-dir "
                f"DIR; runs/<NAME>/ by default)")


def check_single_context(rows: Iterable[Mapping[str, object]], columns: Sequence[str], what: str) -> dict[str, str]:
    """The one context of ``rows``; :class:`ContextMismatch` naming the contexts when there are several."""
    seen: dict[tuple, int] = {}
    ctxs: dict[tuple, dict[str, str]] = {}
    for r in rows:
        ctx = context_of(r, columns)
        key = tuple(sorted(ctx.items()))
        seen[key] = seen.get(key, 0) + 1
        ctxs[key] = ctx
    if len(seen) > 1:
        keys = sorted(seen, key=lambda k: -seen[k])
        varying = [c for c in columns if len({ctxs[k].get(c, "") for k in keys}) > 1]
        listing = "; ".join(f"{seen[k]} row(s) with " + describe_context({c: ctxs[k].get(c, '') for c in varying})
                            for k in keys)
        raise ContextMismatch(f"{what} mixes {len(seen)} contexts ({listing}); refusing to merge them. Split the "
                              f"table by {', '.join(varying)}, or select one context first")
    return next(iter(ctxs.values()), {})


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]], *,
               context: Sequence[str] | None = None) -> None:
    """Atomically replace ``path`` with ``rows``; the header is the union of keys in first-seen order.

    With ``context`` the rows must share one context in those columns (:class:`ContextMismatch`).
    """
    rows = [dict(r) for r in rows]
    if context:
        check_single_context(rows, context, str(path))
    header: list[str] = []
    for r in rows:
        header.extend(k for k in r if k not in header)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise naming(e, path, tmp)   # a full disk's OSError names the table (experiments.atomic)


def append_row(path: str | os.PathLike, row: Mapping[str, object], *, context: Sequence[str] | None = None) -> None:
    """Append one complete row atomically (see module docstring); ``context`` as in :func:`check_context`."""
    old = read_rows(path)
    if context:
        check_context(path, [row], context, existing=old)
    write_rows(path, old + [dict(row)])


def replace_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]],
                 key: Iterable[str], *, context: Sequence[str] | None = None) -> None:
    """Upsert ``rows`` into the table: rows with the same values in ``key`` columns are replaced."""
    key = tuple(key)
    new = [dict(r) for r in rows]
    old = read_rows(path)
    if context:
        check_context(path, new, context, existing=old)
    new_keys = {tuple(str(r.get(k, "")) for k in key) for r in new}
    kept = [r for r in old if tuple(str(r.get(k, "")) for k in key) not in new_keys]
    write_rows(path, kept + new)
