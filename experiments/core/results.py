"""Long-format CSV tables with atomic, resumable appends, one context per table.

Each append rewrites the whole file to a temporary name in the same directory, fsyncs it and
``os.replace``s it over the old one, so a kill at any moment leaves either the old table or the
new one, never a half-written row. Tables are small (one row per measured point), so rewriting
is cheap. The file gets the mode a plain ``open()`` would give it (``0o666`` less the umask,
``0644`` typically), not the ``0600`` of the temporary file.

Reading validates every row (:func:`read_table`): a row with another number of cells than the header,
a last line without its line end (a file cut by a copy, an editor or a full disk), or a cell of a
``numeric`` column that is empty or not a number, is *damaged*: a warning names the file and line
(stderr, once per process), and the row is left out of what the readers get, so a resumed sweep never
counts it as finished. The writers that rewrite a table (:func:`append_row`, :func:`replace_rows`)
never write a damaged row back: before the first rewrite that leaves damaged lines out, the table as
it was is copied to ``<table>.damaged-<timestamp>`` beside it, so nothing is lost.

A table holds one *context* (the model, corpus, settings and machine its rows were measured
with; the columns are named by the caller, e.g. ``experiments.core.runs.SWEEP_CONTEXT``). Writers pass
``context=`` and a row whose context differs from the rows already in the table raises
:class:`ContextMismatch` instead of being mixed in; readers call :func:`check_single_context`.

New columns join old tables without invalidating their rows: a row appended with a column the table
lacks adds it to the header, and the older rows read it as empty. A context column added later (e.g.
``experiments.core.runs.SWEEP_CONTEXT_ADDED``) is passed as ``added_context=`` / ``added=``: an empty
cell (a row older than the column) matches any value, and the non-empty cells must all agree. Passed
as an ordinary context column instead, the first append would pass (the table lacks the column) and
every later one would fail against the old rows' empty cells.
"""
from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from experiments.core.atomic import copy_file, current_umask, naming


class ContextMismatch(ValueError):
    """A row would mix another context (model, corpus, settings, machine) into a table."""


@dataclass(frozen=True)
class DamagedRow:
    """A line of a table that is not a complete row (:func:`read_table`)."""
    line: int       # 1-based line number in the file where the row starts
    reason: str
    text: str       # the raw line(s), as in the file


@dataclass
class Table:
    header: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    damaged: list[DamagedRow] = field(default_factory=list)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_table(path: str | os.PathLike, *, numeric: Sequence[str] = ()) -> Table:
    """Parse ``path`` into its valid rows and its damaged lines (see the module docstring); no warning.

    A row is damaged when its cell count differs from the header's, when it is the last line and the
    file does not end with a line end (the file was cut in it), or when a column of ``numeric`` present
    in the header is empty or not a number. A cut header (the file's only line, without a line end) is
    a damaged line 1 and the table has no rows.
    """
    path = Path(path)
    if not path.exists():
        return Table()
    with path.open(newline="") as f:
        text = f.read()
    lines = io.StringIO(text).readlines()  # split as the csv reader splits (line_num counts these)
    ends_cleanly = text.endswith(("\n", "\r"))
    reader = csv.reader(io.StringIO(text))
    table = Table()
    prev = 0
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            table.damaged.append(DamagedRow(prev + 1, f"not CSV from here on ({e})", "".join(lines[prev:])))
            break
        start, prev = prev + 1, reader.line_num
        raw = "".join(lines[start - 1:prev])
        last = prev >= len(lines)
        if not table.header:
            if not record:
                continue
            if last and not ends_cleanly:
                table.damaged.append(DamagedRow(start, "cut: the header line has no end", raw))
                break
            table.header = record
            continue
        if not record:
            continue  # a blank line (csv.DictReader skips them too)
        reason = None
        if len(record) != len(table.header):
            reason = f"{len(record)} of {len(table.header)} columns"
        elif last and not ends_cleanly:
            reason = "cut: the line has no end"
        else:
            row = dict(zip(table.header, record))
            bad = next((c for c in numeric if c in row and not _is_number(row[c])), None)
            if bad is not None:
                reason = f"column {bad}={row[bad]!r} is not a number"
        if reason is None:
            table.rows.append(dict(zip(table.header, record)))
        else:
            table.damaged.append(DamagedRow(start, reason, raw))
    return table


_warned: set[tuple[str, int, str]] = set()


def warn_damaged(path: str | os.PathLike, damaged: Iterable[DamagedRow]) -> None:
    """One ``warning:`` line on stderr per damaged line (once per process for the same line)."""
    for d in damaged:
        key = (str(Path(path).resolve()), d.line, d.text)
        if key in _warned:
            continue
        _warned.add(key)
        snippet = d.text.strip()
        snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
        print(f"warning: {path} line {d.line}: damaged row ({d.reason}: {snippet!r}); it is not read and does not "
              f"count as measured (a sweep measures its point again)", file=sys.stderr)


def read_rows(path: str | os.PathLike, *, numeric: Sequence[str] = ()) -> list[dict[str, str]]:
    """The valid rows of ``path`` (:func:`read_table`); damaged lines are reported (:func:`warn_damaged`)."""
    table = read_table(path, numeric=numeric)
    warn_damaged(path, table.damaged)
    return table.rows


def _keep_damaged_copy(path: Path) -> Path:
    """Copy ``path`` as it is to ``<path>.damaged-<timestamp>`` (atomically, never over another copy)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for i in range(1000):
        dst = path.with_name(f"{path.name}.damaged-{stamp}" + (f"-{i}" if i else ""))
        if not dst.exists():
            break
    copy_file(path, dst)
    return dst


def _keep_copy_if_damaged(path: Path, table: Table) -> None:
    """Before a rewrite that leaves ``table``'s damaged lines out: report them and keep the file as it is."""
    if table.damaged:
        warn_damaged(path, table.damaged)
        copy = _keep_damaged_copy(path)
        print(f"warning: kept a copy of {path} with its damaged line(s) in {copy}; the rewritten table leaves "
              f"them out", file=sys.stderr)


def rows_for_rewrite(path: str | os.PathLike, *, numeric: Sequence[str] = ()) -> list[dict[str, str]]:
    """The valid rows of ``path``, for a writer about to replace it: if some lines are damaged, they are
    reported and the table as it is now is first copied to ``<path>.damaged-<timestamp>``."""
    table = read_table(path, numeric=numeric)
    _keep_copy_if_damaged(Path(path), table)
    return table.rows


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


_FIX = ("A table holds one context (model, corpus, settings, machine) so that runs never mix: write this run "
        "elsewhere (--run NAME or --out-dir DIR; runs/<NAME>/ by default)")


def _check_added(path: str | os.PathLike, rows: list[Mapping[str, object]], new_rows: list[Mapping[str, object]],
                 added: Sequence[str]) -> None:
    """The ``added`` context columns: every non-empty cell of ``rows`` + ``new_rows`` agrees (module docstring)."""
    diffs = []
    for c in added:
        seen = list(dict.fromkeys(v for v in (_cell(r.get(c)) for r in [*rows, *new_rows]) if v != ""))
        if len(seen) > 1:
            diffs.append(f"{c}: table has {seen[0]!r}, this run has {seen[1]!r}")
    if diffs:
        raise ContextMismatch(f"{path} holds results of another context ({'; '.join(diffs)}). {_FIX}")


def check_context(path: str | os.PathLike, new_rows: Iterable[Mapping[str, object]], columns: Sequence[str],
                  existing: list[dict[str, str]] | None = None, added: Sequence[str] = ()) -> None:
    """Raise :class:`ContextMismatch` when ``new_rows`` differ from the rows of ``path`` (or from each
    other) in any of ``columns`` present in the table, or in a non-empty cell of an ``added`` column
    (module docstring). An empty or missing table accepts any context."""
    rows = read_rows(path) if existing is None else existing
    new_rows = [dict(r) for r in new_rows]
    _check_added(path, rows, new_rows, added)
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
            raise ContextMismatch(f"{path} holds results of another context ({what}). {_FIX}")


def check_single_context(rows: Iterable[Mapping[str, object]], columns: Sequence[str], what: str,
                         added: Sequence[str] = ()) -> dict[str, str]:
    """The one context of ``rows``; :class:`ContextMismatch` naming the contexts when there are several
    (in ``columns``, or in the non-empty cells of an ``added`` column: module docstring)."""
    rows = list(rows)
    for c in added:
        vals = list(dict.fromkeys(v for v in (_cell(r.get(c)) for r in rows) if v != ""))
        if len(vals) > 1:
            raise ContextMismatch(f"{what} mixes {len(vals)} contexts ({c}: {', '.join(map(repr, vals))}); "
                                  f"refusing to merge them. Select one context first")
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
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header, restval="")
            w.writeheader()
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise naming(e, path, tmp)   # a full disk's OSError names the table (experiments.core.atomic)


def append_row(path: str | os.PathLike, row: Mapping[str, object], *, context: Sequence[str] | None = None,
               numeric: Sequence[str] = (), unique: str | None = None, added_context: Sequence[str] = ()) -> bool:
    """Append one complete row atomically (see module docstring); ``context`` and ``added_context`` as
    ``columns`` and ``added`` in :func:`check_context`, ``numeric`` as in :func:`read_table` (damaged
    rows are left out, after a copy). With ``unique`` (a column), a row whose value there is already in
    the table is not appended: returns False."""
    path = Path(path)
    table = read_table(path, numeric=numeric)
    if unique is not None and any(r.get(unique) == _cell(row.get(unique)) for r in table.rows):
        return False
    if context or added_context:
        check_context(path, [row], context or (), existing=table.rows, added=added_context)
    _keep_copy_if_damaged(path, table)
    write_rows(path, table.rows + [dict(row)])
    return True


def replace_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, object]],
                 key: Iterable[str], *, context: Sequence[str] | None = None, numeric: Sequence[str] = (),
                 added_context: Sequence[str] = ()) -> None:
    """Upsert ``rows`` into the table: rows with the same values in ``key`` columns are replaced."""
    path = Path(path)
    key = tuple(key)
    new = [dict(r) for r in rows]
    table = read_table(path, numeric=numeric)
    if context or added_context:
        check_context(path, new, context or (), existing=table.rows, added=added_context)
    new_keys = {tuple(str(r.get(k, "")) for k in key) for r in new}
    kept = [r for r in table.rows if tuple(str(r.get(k, "")) for k in key) not in new_keys]
    _keep_copy_if_damaged(path, table)
    write_rows(path, kept + new)
