"""Local stage jobs forked from a warm job server (stages/common/job_server.py) instead of started cold.

One server per (interpreter, environment): it is started on the first job that needs it, lives as
long as this process (it and every job under it get SIGTERM when this process dies) and is reused by
every later job with the same environment, so that the imports happen once per flow process, not
once per job and rank. A server that cannot start is reported once and the job starts cold.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import IO

from stages.common.runtime import LAUNCHED_AT_ENV

READY_TIMEOUT_S = 180.0
MAX_SERVERS = 2  # one per distinct job environment; beyond this the oldest idle one is stopped

_lock = threading.Lock()
_servers: dict[str, "_Server"] = {}


class WarmJob:
    """A job forked by the server: `pid`, `stdout` and `wait()` as subprocess.Popen has them."""

    def __init__(self, conn: socket.socket, stdout: IO[str], on_end=lambda: None):
        self._conn = conn
        self._on_end = on_end
        self._replies = conn.makefile("r")
        self.stdout = stdout
        self.pid = int(json.loads(self._replies.readline())["pid"])
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            line = self._replies.readline()
            self.returncode = int(json.loads(line)["exit"]) if line else -9  # the server died: so did the job
            self._replies.close()
            self._conn.close()
            self._on_end()
        return self.returncode


class _Server:
    def __init__(self, python: str, env: dict[str, str], cwd: Path):
        self.dir = tempfile.mkdtemp(prefix="alignflow-jobserver-")
        self.socket_path = os.path.join(self.dir, "s")
        self.error: str | None = None
        self.ready = threading.Event()
        self.running = 0  # jobs started and not yet waited for: stopping the server would kill them
        # Started from a thread that lives as long as this process: the parent-death signal follows
        # the thread that started the child, and a task's worker thread may end before the flow does.
        threading.Thread(target=self._run, args=(python, env, cwd), daemon=True, name="alignflow-jobserver").start()

    def _run(self, python: str, env: dict[str, str], cwd: Path) -> None:
        try:
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "TERM", "--", python, "-m", "stages.common.job_server",
                 "--socket", self.socket_path],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                text=True, errors="replace", start_new_session=True)
        except OSError as err:
            self.error = str(err)
            self.ready.set()
            return
        lines = []
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
            elif not self.ready.is_set():
                lines.append(line)
        self.error = f"the job server exited ({self.proc.wait()}): {''.join(lines[-20:])}"
        self.ready.set()  # a waiting start() sees the error

    def start(self, module: str, args: list[str], nproc: int, env: dict[str, str], cwd: Path) -> WarmJob:
        if not self.ready.wait(READY_TIMEOUT_S) or self.error:
            raise RuntimeError(self.error or f"the job server was not ready in {READY_TIMEOUT_S:.0f}s")
        read_fd, write_fd = os.pipe()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.socket_path)
            request = json.dumps({"module": module, "args": args, "nproc": nproc, "env": env,
                                  "cwd": str(cwd)}).encode()
            socket.send_fds(conn, [struct.pack("!Q", len(request))], [write_fd])
            conn.sendall(request)
        except OSError:
            conn.close()
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the job holds the only write end: EOF on read_fd when the job ends
        return WarmJob(conn, open(read_fd, "r", errors="replace", buffering=1), on_end=self._job_ended)

    def _job_ended(self) -> None:
        with _lock:
            self.running -= 1

    def stop(self) -> None:
        with contextlib.suppress(AttributeError, ProcessLookupError):
            self.proc.terminate()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
            os.rmdir(self.dir)


def start_job(module: str, args: list[str], nproc: int, python: str, env: dict[str, str], cwd: Path) -> WarmJob:
    """`torchrun --nproc_per_node NPROC -m MODULE ARGS`, forked from the server for (python, env), which
    is started if need be.
    Raises RuntimeError if the server cannot start (the caller then starts the job cold)."""
    tag, server = _server_for(python, env, cwd, reserve=True)
    try:
        return server.start(module, args, nproc, env, cwd)
    except (RuntimeError, OSError):
        with _lock:
            server.running -= 1
            if _servers.get(tag) is server and not server.running:
                _servers.pop(tag).stop()
        raise


def _server_for(python: str, env: dict[str, str], cwd: Path, reserve: bool) -> tuple[str, _Server]:
    """The server for (python, env), started (in the background) if there is none; `reserve` counts a
    job on it, under the lock, so that no other thread stops it as idle from here on."""
    server_env = {k: v for k, v in env.items() if k != LAUNCHED_AT_ENV}  # the one per-job variable
    tag = hashlib.sha256(json.dumps([python, sorted(server_env.items())]).encode()).hexdigest()
    with _lock:
        server = _servers.get(tag)
        if server is None or server.error:
            if server is not None:
                _servers.pop(tag).stop()
            idle = [t for t, s in _servers.items() if not s.running]
            while idle and len(_servers) >= MAX_SERVERS:
                _servers.pop(idle.pop(0)).stop()
            server = _servers[tag] = _Server(python, server_env, cwd)
        server.running += reserve
    return tag, server


def start_server(python: str, env: dict[str, str], cwd: Path) -> None:
    """Start the server for jobs with this environment now, without waiting for it."""
    _server_for(python, env, cwd, reserve=False)


@atexit.register
def stop_all() -> None:
    with _lock:
        while _servers:
            _servers.popitem()[1].stop()
