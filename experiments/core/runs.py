"""Where results go: committed *reference* tables under ``results/``, each user's runs under ``runs/``.

    results/                 reference tables (committed): sweep_*.csv, latency_*.csv, decode_*.csv, ...
    results/quick/           the quick-mode reference tables
    runs/<NAME>/             one run (ignored by git): the same layout, ``quick/`` for --quick
    runs/<NAME>/quick/compare_reference.csv   how the run's numbers compare with the reference

Commands that measure (``run``, ``latency``, ``roofline``, ``reproduce``, the benchmarks) write into
a run directory, never into ``results/``: ``--out-dir DIR`` when given, else ``runs/<NAME>`` with
``--run NAME``, else the default run name (:func:`default_run_name`: ``local`` for the default model
and corpus, ``local-<model>-<text>`` otherwise, so another model or text never lands in the default
run's tables). ``runs/`` is resolved against the repository (or ``$TKR_RUNS_DIR``), never against the
current directory, so every command and notebook finds the same run from anywhere.

A run replaces the reference only through ``python -m experiments promote`` (an explicit command,
whole tables at a time, so a reference table never mixes two runs).

Every table holds one context (:data:`SWEEP_CONTEXT`, :data:`MEASURE_CONTEXT`): the writers refuse
a row of another context (``experiments.core.results.ContextMismatch``), the readers refuse or separate
tables that mix several.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "results"
RUNS_ENV = "TKR_RUNS_DIR"
DEFAULT_RUN = "local"

# Columns that make up one sweep table's context: what was compressed and evaluated, with which
# settings, on which machine. Perplexity of calibrated points moves by ~0.5-3.4% between CPU kinds
# (docs/reproduce.md), so the machine is part of it. Not settings that vary per point (calib_samples is 0 for
# uncalibrated points).
SWEEP_CONTEXT = ("model", "corpus", "calibration_text", "evaluation_text", "quick", "seqlen",
                 "eval_token_budget", "seed", "device_type", "device", "torch")
# Context columns added after the reference tables were committed (the evaluation text's hash; issue 24: the
# second evaluation text, the dense reference's top-k, the bootstrap method, the task). Rows older than them
# have them empty, which matches any value; the non-empty cells of a table must agree
# (experiments.core.results.check_context, added=). (text_sha256 was a SWEEP_CONTEXT column: a table older
# than it accepted one new row and then refused the next, its old rows' empty cells against the new hash.)
SWEEP_CONTEXT_ADDED = ("text_sha256", "evaluation_text2", "text2_sha256", "eval2_windows", "kl_topk", "bootstrap",
                       "task_text", "task_items")
# Columns of a sweep table that every measured row holds as a number: a row where one is empty or not a
# number (a line cut by a copy or an editor, a junk row written back) is damaged, never "finished"
# (experiments.core.results.read_table).
SWEEP_NUMERIC = ("ppl", "nll", "eval_tokens", "seqlen", "eval_token_budget", "seed", "bytes", "bits_per_weight",
                 "compress_seconds", "eval_seconds")
# What must agree between a run and the reference for their perplexities to be comparable.
COMPARABLE_CONTEXT = ("model", "corpus", "calibration_text", "evaluation_text", "quick", "seqlen",
                      "eval_token_budget", "seed")
# Timings (latency, decode, benchmarks): the machine and the torch build.
MEASURE_CONTEXT = ("device_type", "device", "torch")
# Files of a run that are not result tables (not promoted, not compared).
RUN_META = ("compare_reference.csv", "steps.json")


def runs_root() -> Path:
    """``$TKR_RUNS_DIR`` if set, else ``<repository>/runs`` (never relative to the current directory)."""
    env = os.environ.get(RUNS_ENV)
    return Path(env).expanduser().resolve() if env else REPO / "runs"


def _slug(s: str, max_len: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-.")
    return s[-max_len:] or "x"


def default_run_name(model: str = "default", text_file: str | os.PathLike | None = None,
                     source: str = "austen") -> str:
    """``local`` for the default model and corpus; ``local-<model>-<text or source>`` otherwise."""
    parts = [DEFAULT_RUN]
    if model not in ("default", None):
        m = Path(str(model))
        parts.append(_slug(m.stem if m.suffix == ".gguf" else (m.name or str(model))))
    if text_file is not None:
        parts.append(_slug(Path(text_file).stem))
    elif source not in ("austen", None):
        parts.append(_slug(source))
    return "-".join(parts)


PLAIN_NAME_RULE = "letters, digits, '.', '_', '-'; no path separator, no '..'"


def is_plain_name(name: object) -> bool:
    """A name that is safe as one path component: starts with a letter or digit, then letters, digits,
    ``.``, ``_``, ``-``; no ``..`` (so never ``/``, ``\\``, ``.``, ``..``, a hidden name or an empty one)."""
    return (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None
            and ".." not in name)


def check_run_name(name: str) -> str:
    if not is_plain_name(name):
        raise ValueError(f"--run {name!r} must be a plain directory name ({PLAIN_NAME_RULE}), "
                         f"e.g. --run intel-test; it becomes {runs_root()}/<NAME>")
    return name


def is_reference(path: str | os.PathLike) -> bool:
    """Is ``path`` the reference results directory or inside it?"""
    p = Path(path).expanduser().resolve()
    ref = REFERENCE.resolve()
    return p == ref or ref in p.parents


def run_root(*, out_dir: str | os.PathLike | None = None, run: str | None = None, model: str = "default",
             text_file: str | os.PathLike | None = None, source: str = "austen") -> Path:
    """The run directory of a measuring command (see module docstring); never the reference."""
    if out_dir is not None and run is not None:
        raise ValueError("give either --run NAME or --out-dir DIR, not both")
    if out_dir is not None:
        root = Path(out_dir).expanduser().resolve()
    else:
        root = runs_root() / check_run_name(run or default_run_name(model, text_file, source))
    if is_reference(root):
        raise ValueError(f"--out-dir {str(out_dir)!r} is the committed reference results directory {REFERENCE}: "
                         f"runs write elsewhere (default {runs_root()}/{DEFAULT_RUN}) and replace the reference "
                         f"only through `python -m experiments promote --run NAME`")
    return root


def _reference_message(option: str, path: str | os.PathLike) -> str:
    return (f"{option} {str(path)!r} is in the committed reference results directory {REFERENCE}: only "
            f"`python -m experiments promote` writes there; measurements go to a run directory (default "
            f"{runs_root()}/{DEFAULT_RUN}) and replace the reference only through "
            f"`python -m experiments promote --run NAME`")


def refuse_reference(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` (a table a command is about to write) unless it lies in the reference ``results/``."""
    if is_reference(Path(path).expanduser().resolve().parent):
        raise ValueError(_reference_message(option, path))
    return Path(path)


def refuse_reference_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """``path`` (a directory or file a command is about to create) unless it is the reference ``results/``
    or lies in it: nothing but ``promote`` writes there."""
    if is_reference(path):
        raise ValueError(_reference_message(option, path))
    return Path(path)


def mode_dir(root: str | os.PathLike, quick: bool) -> Path:
    """Quick tables live under ``<root>/quick/`` so quick and full results never mix."""
    return Path(root) / "quick" if quick else Path(root)


def reference_dir(quick: bool) -> Path:
    return mode_dir(REFERENCE, quick)


# ------------------------------------------------------------------------------------------- lock

LOCK_NAME = ".run.lock"
LOCK_INFO = ".run.lock.info"


class RunInUse(ValueError):
    """Another process holds the run directory (exit status 2, one ``error:`` line, like bad input)."""


def _lock_owner(directory: Path) -> str:
    """``pid N on HOST, since T: COMMAND`` from the holder's info file (best effort: it may not be written yet)."""
    for _ in range(20):  # the holder writes its info right after taking the lock
        try:
            info = json.loads((directory / LOCK_INFO).read_text())
            command = str(info.get("command", ""))
            command = command if len(command) <= 200 else command[:197] + "..."
            return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}: {command}"
        except (OSError, ValueError, AttributeError):
            time.sleep(0.05)
    return f"its pid and host are not recorded in {directory / LOCK_INFO}"


def check_run_dir_free(directory: str | os.PathLike) -> None:
    """:class:`RunInUse` when another process holds ``directory`` now (creates nothing): lets a run fail
    at its start instead of after loading its model. :func:`run_dir_lock` decides; this only tells early."""
    from filelock import FileLock, Timeout
    directory = Path(directory)
    if not (directory / LOCK_NAME).is_file():
        return
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUse(_in_use(directory)) from None
    lock.release()


def _in_use(directory: Path) -> str:
    return (f"run directory {directory} is in use by another run ({_lock_owner(directory)}); wait for it to "
            f"finish, or write this run elsewhere with --run NAME or --out-dir DIR")


@contextlib.contextmanager
def run_dir_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold ``directory`` (a run directory, or its ``quick/``) for one writer, for the whole block.

    A ``filelock.FileLock`` on ``<directory>/.run.lock``, taken without waiting: a second process
    gets :class:`RunInUse` naming the directory and the holder (pid, host, start time and command,
    which the holder writes to ``<directory>/.run.lock.info``). The operating system releases the lock
    when the holder ends in any way, ``kill -9`` included, so a killed run never blocks the next one; the
    lock file stays behind (empty), the info file is removed on a normal exit and rewritten by the next
    holder otherwise.
    """
    from filelock import FileLock, Timeout

    from experiments.core.atomic import current_umask

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(directory / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUse(_in_use(directory)) from None
    info = directory / LOCK_INFO
    try:
        tmp = info.with_name(f"{info.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "command": " ".join(sys.argv)}) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, info)
        yield directory
    finally:
        info.unlink(missing_ok=True)
        lock.release()


# ------------------------------------------------------------------------------------------ steps

def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts and file contents (``Path`` parts, also inside lists, are read)."""
    h = hashlib.sha256()

    def add(p: Any) -> None:
        if isinstance(p, Path):
            h.update(p.name.encode())
            h.update(p.read_bytes() if p.is_file() else b"<missing>")
        elif isinstance(p, (list, tuple)) and any(isinstance(x, (Path, list, tuple)) for x in p):
            for x in p:
                add(x)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")

    for p in parts:
        add(p)
    return h.hexdigest()[:16]


class Steps:
    """Finished steps of a run (``<dir>/steps.json``): a step whose inputs digest matches is skipped.

    A step is recorded only after it finished, so an interrupted step runs again (and resumes at its
    own granularity: sweep points, latency points, decode rows).
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / "steps.json"

    def _load(self) -> dict[str, dict]:
        """The recorded steps; ``{}`` when there is no file. Anything but what :meth:`record` writes (an
        object of step name -> object with a string ``inputs``) is a ValueError naming the file: a damaged
        record must neither crash a command nor count a step as finished (``promote`` reads it)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not a record of finished steps ({e}); {self._fix}") from e
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{self.path}: not valid JSON ({e}); {self._fix}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{self.path} holds a JSON {type(data).__name__}, not an object of finished steps; "
                             f"{self._fix}")
        for step, entry in data.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("inputs"), str):
                raise ValueError(f"{self.path}: step {step!r} is recorded as {json.dumps(entry)[:80]}, not an "
                                 f"object with its inputs digest; {self._fix}")
        return data

    @property
    def _fix(self) -> str:
        return ("it is written by `python -m experiments reproduce`: delete it to have every step run again "
                "(each resumes from its own finished rows), and `promote` needs a finished run")

    def done(self, step: str, inputs: str) -> bool:
        return self._load().get(step, {}).get("inputs") == inputs

    def record(self, step: str, inputs: str, seconds: float, **extra: Any) -> None:
        from experiments.core.atomic import current_umask  # same file mode rule as the tables
        data = self._load()
        data[step] = {"inputs": inputs, "seconds": round(seconds, 1),
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, self.path)

    def all(self) -> Mapping[str, dict]:
        return self._load()
