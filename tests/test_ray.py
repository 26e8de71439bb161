"""Sweeps on Ray (``--executor ray``, experiments.run.executors.RayExecutor) give the serial runner's table.

A tiny random Llama (as in test_cli.py) and one local Ray instance with 2 CPUs and no dashboard,
started once for the module (Ray takes seconds to start). The serial reference runs with one torch
thread, as each Ray point does with ``--cpus-per-point 1``, so the rows must agree in every column
but the timings: values, provenance and context alike. Covered: the CLI joining a cluster
(``--ray-address``) and starting its own local instance; Ctrl-C and ``kill -9`` of the driver, each
losing no finished row, then a resume to the complete table without duplicates; a point that
raises and a point whose worker dies (retried, then recorded as failed while the others finish, then
retried by the next run); each worker loading the model once; bad options; the default path never
importing Ray, and a clear error when it is missing.
"""
import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

from experiments.run.executors import PointsFailed, RayExecutor, failed_path, init_ray, ray_runtime_env
from experiments.run.point import measure_point
from experiments.run.sweep import run_sweeps
from experiments.run.sweep_config import load_sweep
from tests.tiny_model import build_tiny

REPO = Path(__file__).resolve().parent.parent
SWEEP = """\
name: tiny
settings: {seqlen: 32, eval_tokens: 1024, calib_samples: 4, calib_seqlen: 32, seed: 0}
points:
  - {method: dense}
  - {method: rtn, bits: 4, group_size: 32}
  - {method: rtn, bits: 3, group_size: 32}
  - {method: gptq, bits: 3, group_size: 32}
  - {method: wanda, pattern: "2:4"}
  - {method: sparsegpt, pattern: "2:4"}
  - {method: whitened_svd, ratio: 0.5}
  - {method: combo, steps: [{method: sparsegpt, pattern: "2:4"}, {method: gptq, bits: 4, group_size: 32}]}
"""
N_POINTS = 8
# Columns that differ between two runs of the same points by nature: how long they took and when.
TIMING = {"compress_seconds", "eval_seconds", "eval2_seconds", "timestamp"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, text file, sweep file): a random Llama with a word-level tokenizer."""
    return build_tiny(tmp_path_factory.mktemp("tiny_ray"), SWEEP)


@contextlib.contextmanager
def cpu_backends():
    """The modules' CPU backends, not the Triton interpreter that conftest switches on for the kernel
    tests (the backend choice reads TRITON_INTERPRET at call time): what a user on a CPU runs."""
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance for the module (2 CPUs, no dashboard, a small object store); this process is
    also a driver. Under ``make test`` (``-n 2``) each xdist worker that runs one of these tests starts its
    own: ``--dist loadgroup`` would keep them on one worker, but it silently does not group on pytest 9.2
    (pytest-dev/pytest-xdist#1386)."""
    with cpu_backends():   # Ray's processes, and so its workers, inherit this environment
        init_ray("local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning",
                 object_store_memory=200 * 2**20, runtime_env=ray_runtime_env())
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _sweep_kwargs(tiny, out):
    model, text, sweep = tiny
    return dict(sweeps=[load_sweep(sweep)], model=str(model), text_file=str(text), out_dir=out, progress=False,
                log=lambda s: None)


@pytest.fixture(scope="module")
def serial_rows(tiny, tmp_path_factory):
    """The serial runner's table, with one torch thread (what a Ray point gets with 1 CPU)."""
    out = tmp_path_factory.mktemp("serial")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cpu_backends():
            [path] = run_sweeps(**_sweep_kwargs(tiny, out))
    finally:
        torch.set_num_threads(threads)
    return rows(path)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env.pop("TRITON_INTERPRET", None)   # the modules' CPU backends, as a user on a CPU would run
    return env


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments", *map(str, args)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_args(tiny, out, *extra):
    model, text, sweep = tiny
    return ["run", sweep, "--model", model, "--text-file", text, "--out-dir", out, "--no-progress", *extra]


def assert_same_rows(got, want):
    """Same points, no duplicates, equal in every column but the timings (order free)."""
    ids = [r["point_id"] for r in got]
    assert len(ids) == len(set(ids)), f"duplicate rows: {sorted(ids)}"
    assert sorted(ids) == sorted(r["point_id"] for r in want)
    by_id = {r["point_id"]: r for r in want}
    for r in got:
        w = by_id[r["point_id"]]
        assert set(r) == set(w), (r["point"], set(r) ^ set(w))
        diff = {c: (w[c], r[c]) for c in r if c not in TIMING and r[c] != w[c]}
        assert not diff, f"{r['point']}: (serial, ray) differ in {diff}"


def test_cli_ray_run_equals_serial_run(tiny, serial_rows, ray_address, tmp_path):
    assert len(serial_rows) == N_POINTS
    r = cli(*run_args(tiny, tmp_path, "--executor", "ray", "--ray-address", ray_address, "--cpus-per-point", 1))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "sweep_tiny.csv")   # stdout: only the table written
    assert_same_rows(rows(tmp_path / "sweep_tiny.csv"), serial_rows)
    assert not failed_path(tmp_path / "sweep_tiny.csv").exists()


# Defined here, shipped to the workers by value (register_pickle_by_value below).
def _flaky_measure(run, sweep, pid, spec, settings, windows, calib, *, progress=True):
    if spec.method == "wanda":
        raise RuntimeError("injected failure of the wanda point")
    if spec.method == "sparsegpt":
        os._exit(3)   # the worker dies, as if killed or out of memory
    return measure_point(run, sweep, pid, spec, settings, windows, calib, progress=progress)


def test_failed_points_are_listed_apart_and_retried_by_the_next_run(tiny, serial_rows, ray_address, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        ex = RayExecutor(max_retries=1, measure=_flaky_measure, log=lambda s: None)
        with pytest.raises(PointsFailed, match=r"2 point\(s\) failed") as e:
            run_sweeps(**_sweep_kwargs(tiny, tmp_path), executor=ex)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    table = tmp_path / "sweep_tiny.csv"
    assert e.value.paths == [table]
    done = rows(table)
    assert sorted(r["point"] for r in done) == sorted(r["point"] for r in serial_rows
                                                      if r["method"] not in ("wanda", "sparsegpt"))
    assert_same_rows(done, [r for r in serial_rows if r["point_id"] in {d["point_id"] for d in done}])
    failed = {r["point"]: r for r in rows(failed_path(table))}
    assert set(failed) == {"wanda-2:4", "sparsegpt-2:4"}
    assert failed["wanda-2:4"]["error"] == "RuntimeError: injected failure of the wanda point"
    assert failed["wanda-2:4"]["attempts"] == "1"                 # an exception is not retried
    assert failed["sparsegpt-2:4"]["attempts"] == "2"             # a dead worker is, max_retries times
    assert "died" in failed["sparsegpt-2:4"]["error"].lower() or "crash" in failed["sparsegpt-2:4"]["error"].lower()
    assert failed["wanda-2:4"]["model"] == serial_rows[0]["model"]  # the context columns of the table

    # The next run measures exactly the failed points, and the failed list goes away.
    ex = RayExecutor(log=lambda s: None)
    run_sweeps(**_sweep_kwargs(tiny, tmp_path), executor=ex)
    assert len(ex.worker_info) == 2
    assert_same_rows(rows(table), serial_rows)
    assert not failed_path(table).exists() and not failed_path(table).parent.exists()


def test_each_worker_loads_the_model_once(tiny, ray_address, tmp_path):
    # Workers outlive a run (they belong to this process's Ray job), so earlier tests' workers hold the
    # tiny model already: the same model under a path no worker has loaded yet.
    model, text, sweep = tiny
    (tmp_path / "model").symlink_to(model, target_is_directory=True)
    ex = RayExecutor(log=lambda s: None)
    run_sweeps(**_sweep_kwargs((tmp_path / "model", text, sweep), tmp_path / "out"), executor=ex)
    pids = [w["pid"] for w in ex.worker_info]
    assert len(pids) == N_POINTS and len(set(pids)) <= 2, pids   # 2 CPUs: at most 2 workers at a time
    loads = [w["pid"] for w in ex.worker_info if w["loaded_model"]]
    assert sorted(loads) == sorted(set(pids)), "a worker loaded the model more than once, or not first"


def _stop_after_new_rows(args, table, sig, n_before):
    """Start ``python -m experiments *args``; send ``sig`` once the table has more than ``n_before`` rows."""
    # Ctrl-C as a terminal sends it: to a process whose SIGINT is not ignored. A child inherits an ignored
    # SIGINT, and Python then leaves it ignored; under make test another test in this xdist worker can
    # leave SIGINT ignored here (the driver then finished every point and exited 0 in 3 of 4 CI runs).
    proc = subprocess.Popen([sys.executable, "-m", "experiments", *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if table.exists() and len(rows(table)) > n_before:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep finished before it could be stopped; make it longer"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err, len(rows(table))


def test_ctrl_c_then_kill_9_of_the_driver_then_resume_completes_the_table(tiny, serial_rows, ray_address, tmp_path):
    # Ctrl-C once the first row is saved. On a loaded machine (make test's -n 2 with a Ray instance per
    # xdist worker) the starved driver can take every finished point in one burst and exit 0 before
    # the signal lands: then the sweep outran the signal and nothing was tested, so the scenario is run
    # again on a fresh table (at most 3 times). Ctrl-C itself ignored would end the same way each time.
    for attempt in range(3):
        out_dir = tmp_path / f"attempt{attempt}"
        table = out_dir / "sweep_tiny.csv"
        join = run_args(tiny, out_dir, "--executor", "ray", "--ray-address", ray_address)
        rc, out, err, n_interrupted = _stop_after_new_rows(join, table, signal.SIGINT, 0)
        if not (rc == 0 and n_interrupted == N_POINTS):
            break
    assert rc == 130, err
    assert "interrupted; finished points are saved" in err and out == ""
    assert 1 <= n_interrupted < N_POINTS

    rc, _, _, n_killed = _stop_after_new_rows(join, table, signal.SIGKILL, n_interrupted)
    assert rc == -signal.SIGKILL
    assert n_interrupted < n_killed < N_POINTS

    # Resume without --ray-address: the default, a local Ray instance of this command's own.
    r = cli(*run_args(tiny, out_dir, "--executor", "ray"))
    assert r.returncode == 0, r.stderr
    assert f"{n_killed} point(s) already in" in r.stderr
    assert_same_rows(rows(table), serial_rows)


@pytest.mark.parametrize("extra, match", [
    (["--cpus-per-point", "2"], r"--cpus-per-point only apply with --executor ray"),
    (["--executor", "ray", "--cpus-per-point", "0"], r"--cpus-per-point 0 must be an integer >= 1"),
    (["--executor", "ray", "--gpus-per-point", "-1"], r"--gpus-per-point -1.0 must be a number >= 0"),
    (["--executor", "ray", "--gpus-per-point", "1.5"], r"a fraction of one GPU \(<= 1\) or a whole number"),
    (["--executor", "ray", "--device", "cuda", "--gpus-per-point", "0"], r"needs --gpus-per-point > 0"),
    (["--executor", "ray", "--gpus-per-point", "1"], r"reserves GPUs that --device cpu does not use"),
], ids=["ray-option-without-ray", "cpus", "gpus", "gpus-fraction", "cuda-without-gpus", "gpus-on-cpu"])
def test_bad_executor_options_exit_2_before_anything_runs(tiny, tmp_path, capsys, extra, match):
    from experiments.__main__ import main
    assert main([*map(str, run_args(tiny, tmp_path)), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert __import__("re").search(match, err), err
    assert not list(tmp_path.iterdir())


def test_missing_ray_is_one_setup_error(tiny, tmp_path, capsys, monkeypatch):
    from experiments.__main__ import main
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    assert main([*map(str, run_args(tiny, tmp_path)), "--executor", "ray"]) == 1
    err = capsys.readouterr().err
    assert "needs Ray" in err and "pip install -e '.[ray]'" in err and len(err.strip().splitlines()) == 1, err


def test_the_serial_path_never_imports_ray():
    code = ("import sys; import experiments.__main__, experiments.run.sweep, experiments.run.executors as e; "
            "e.make_executor('serial').check_device('cpu'); assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------- network exposure of a local instance

def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:300]
    return ""


def _descendants(pid: int) -> dict[int, str]:
    """pid -> command line of ``pid`` and every process below it (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return {}
        out = {}
        for p in procs:
            with contextlib.suppress(psutil.Error):
                out[p.pid] = " ".join(p.cmdline())[:300] or p.name()
        return out
    parent, names = {}, {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                names[int(d.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in names and p not in out:
            out[p] = _cmdline(p) or names[p]
            todo += [c for c, pp in parent.items() if pp == p]
    return out


def _proc_listen_sockets() -> dict[int, str]:
    """socket inode -> local IP of every TCP socket in LISTEN state (/proc/net/tcp, tcp6)."""
    import ipaddress
    out = {}
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                f = line.split()
                if f[3] != "0A":   # TCP_LISTEN
                    continue
                hexip = f[1].split(":")[0]
                raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::-1] for i in range(0, len(hexip), 8))
                out[int(f[9])] = str(ipaddress.ip_address(raw))
    return out


def _listening(pids: dict[int, str]) -> set[tuple[str, int, str]]:
    """(local IP, pid, command line) of every listening TCP socket the processes ``pids`` hold."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = set()
    if psutil is not None:
        for pid, name in pids.items():
            with contextlib.suppress(psutil.Error):
                for c in psutil.Process(pid).net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        found.add((c.laddr.ip, pid, name))
        return found
    sockets = _proc_listen_sockets()
    for pid, name in pids.items():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                        found.add((sockets[int(link[8:-1])], pid, name))
    return found


def _loopback(ip: str) -> bool:
    import ipaddress
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or bool(mapped and mapped.is_loopback)


TWO_POINTS = """\
name: two
settings: {seqlen: 32, eval_tokens: 256, calib_samples: 2, calib_seqlen: 32, seed: 0}
points:
  - {method: dense}
  - {method: rtn, bits: 4, group_size: 32}
"""


def test_a_local_ray_instance_listens_on_loopback_only(tiny, tmp_path):
    """``--executor ray`` without ``--ray-address`` starts Ray itself: while its sweep runs, no process it
    started (GCS, raylet, workers, agents, the driver) listens on an address other than loopback, and
    there is no dashboard. Sampled every 0.2 s from the start of the command to its end."""
    model, text, _ = tiny
    (tmp_path / "two.yaml").write_text(TWO_POINTS)
    args = ["run", tmp_path / "two.yaml", "--model", model, "--text-file", text, "--out-dir", tmp_path / "run",
            "--no-progress", "--executor", "ray"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments", *map(str, args)], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[tuple[str, int, str]] = set()
    try:
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            seen |= _listening(_descendants(proc.pid))
            time.sleep(0.2)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert len(rows(tmp_path / "run" / "sweep_two.csv")) == 2
    names = {name for _, _, name in seen}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), \
        f"the sampling did not see Ray's servers listening (saw {sorted(seen)}): nothing was checked"
    exposed = sorted(s for s in seen if not _loopback(s[0]))
    assert not exposed, f"listening on a non-loopback address: {exposed}"
    assert not any("dashboard/dashboard.py" in n for n in names), "a dashboard was started"


def test_the_fixture_instance_listens_on_loopback_only(ray_address):
    """The same for a local instance started in this process by init_ray (what the other tests join)."""
    assert ray_address.startswith("127.0.0.1:"), ray_address
    seen = _listening(_descendants(os.getpid()))
    assert any("gcs_server" in n for _, _, n in seen), seen
    assert not [s for s in seen if not _loopback(s[0])], seen
