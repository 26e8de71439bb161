"""``make lab`` opens JupyterLab on notebooks/ with the project's kernel, and the server answers.

The test asks make for the exact command (``make -n``; the venv counts as installed), starts it on a
free port of 127.0.0.1 with a known token and every Jupyter state directory in a temporary one,
polls the REST API, and stops the server.
"""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, token: str, method: str = "GET", body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
        return r.status, json.loads(raw) if raw else None


def _kernel_argv(server_pid: int) -> list[str] | None:
    """argv of the server's child process running ipykernel, from /proc (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            argv = (stat.parent / "cmdline").read_bytes().decode().split("\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == server_pid and any("ipykernel" in a for a in argv):
            return argv
    return None


def test_make_lab_serves_the_notebooks_with_the_venv_kernel(tmp_path):
    venv, port, token = Path(sys.prefix), _free_port(), "test-token-" + os.urandom(8).hex()
    dry = subprocess.run(["make", "-s", "-n", "-o", str(venv / ".installed-stamp"), "lab",
                          f"VENV={venv}", f"LAB_PORT={port}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    cmd = shlex.split(dry.stdout.replace("\\\n", " ").strip().splitlines()[-1])
    assert cmd[0] == f"{venv}/bin/python" and "jupyterlab" in cmd, cmd

    env = {**os.environ, **{k: str(tmp_path / k.lower()) for k in (
        "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR")}}
    env.pop("TRITON_INTERPRET", None)
    server = subprocess.Popen(cmd + ["--no-browser", f"--IdentityProvider.token={token}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "server.log", "w"),
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 90, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status = _get(f"{base}/api/status", token)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        log = (tmp_path / "server.log").read_text()
        assert status is not None and status[0] == 200, f"server did not answer on {base}:\n{log[-3000:]}"
        _, contents = _get(f"{base}/api/contents", token)
        names = {item["name"] for item in contents["content"]}
        assert "00_kernels_tour.ipynb" in names, names  # rooted at notebooks/
        # The default kernel runs on the venv's Python (the server's own, which has the project).
        _, specs = _get(f"{base}/api/kernelspecs", token)
        _, kernel = _get(f"{base}/api/kernels", token, "POST", {"name": specs["default"]})
        argv, deadline = None, time.monotonic() + 60
        while argv is None and time.monotonic() < deadline:
            argv = _kernel_argv(server.pid)
            time.sleep(0.2)
        assert argv is not None, "no kernel process started"
        assert argv[0] == f"{venv}/bin/python", argv
        _get(f"{base}/api/kernels/{kernel['id']}", token, "DELETE")
        try:  # without the token the server refuses
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
            raise AssertionError("the server answered without its token")
        except urllib.error.HTTPError as e:
            assert e.code == 403
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
