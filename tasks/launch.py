"""Launch a stage as a job: torchrun in its own process group, output streamed line by line.

A timeout kills the whole process tree (torchrun and every worker), never leaving orphans.
Deterministic failures (exit 2 in the stage) are recognised from the stage's marker line,
since torchrun reports any failed worker as exit 1.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Callable, Protocol

import psutil

from stages.common.runtime import BAD_INPUT_MARKER, LAUNCHED_AT_ENV

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class StageJobError(RuntimeError):
    """A stage job failed; retried by the task. Carries the tail of the job's log."""

    def __init__(self, message: str, exit_code: int | None, tail: list[str]):
        self.exit_code = exit_code
        self.tail = tail
        super().__init__(message + "\n--- last lines of the job's log ---\n" + "".join(tail))


class StageBadInput(StageJobError):
    """The stage rejected its input or config: rerunning it unchanged cannot help."""


class StageTimeout(StageJobError):
    pass


def torchrun_command(stage: str, spec_uri: str, nproc_per_node: int, python: str | None = None) -> list[str]:
    return [
        python or sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={nproc_per_node}", "--max-restarts=0",
        "-m", f"stages.{stage}", "--spec", spec_uri,
    ]


def job_env(nproc_per_node: int = 1, extra: dict[str, str] | None = None, python: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::UserWarning")
    # DeepSpeed compiles a small communication op once; keep it in the project's cache, one
    # directory per interpreter: a build is tied to its environment, and jobs from two
    # environments sharing one directory would rebuild it in turn (~1 min each).
    interpreter = os.path.abspath(python or sys.executable)
    tag = hashlib.sha256(interpreter.encode()).hexdigest()[:8]
    env.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".alignflow" / "torch_extensions" / tag))
    env.update(extra or {})
    return env


def kill_tree(pid: int, grace_s: float = 5.0, first_signal: int = signal.SIGTERM) -> None:
    """Stop a job and every process under it.

    torchrun starts each worker in a session of its own, so killing torchrun's process group
    alone would orphan the workers: collect all descendants first, then signal every group.
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    groups = {pid}
    for p in procs:
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    for sig in dict.fromkeys((first_signal, signal.SIGKILL)):
        for g in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
        if not procs:
            return


def start_cold(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """`cmd` as a new process in a session of its own, its output on a pipe.

    The job gets SIGTERM if this process dies (setpriv's parent-death signal): a SIGKILLed flow
    process leaves no job behind that writes on to the store (torchrun stops its workers on SIGTERM).
    """
    return subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                            env=env or job_env(), cwd=PROJECT_ROOT, text=True, errors="replace", bufsize=1)


class Job(Protocol):
    """What run_job needs of a started job: subprocess.Popen, or tasks.warm_jobs.WarmJob."""

    pid: int
    stdout: IO[str]

    def wait(self) -> int: ...


def run_job(cmd: list[str], *, timeout_s: float, log_line: Callable[[str], None],
            env: dict[str, str] | None = None, tail_lines: int = 80,
            on_start: Callable[[psutil.Process], None] = lambda proc: None,
            start: Callable[[dict[str, str]], Job] | None = None) -> None:
    """Run `cmd` to completion or raise StageJobError / StageBadInput / StageTimeout.

    `start(env)` starts the job another way than `start_cold(cmd, env)` (forked by the warm job server);
    `cmd` then only names it in messages.
    """
    env = dict(env or job_env(), **{LAUNCHED_AT_ENV: repr(time.time())})
    proc = start(env) if start else start_cold(cmd, env)
    with contextlib.suppress(psutil.NoSuchProcess):
        on_start(psutil.Process(proc.pid))
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    bad_input = False
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                line = ""
            if line is None:
                break
            if line:
                tail.append(line)
                bad_input |= BAD_INPUT_MARKER in line
                log_line(line.rstrip("\n"))
            if time.monotonic() > deadline:
                kill_tree(proc.pid)
                proc.wait()
                raise StageTimeout(f"job timed out after {timeout_s:.0f}s and was killed: {' '.join(cmd)}", None,
                                   list(tail))
        code = proc.wait()
    finally:
        # Reap anything the job left behind (a worker that outlived torchrun).
        kill_tree(proc.pid, grace_s=1.0)
    if code == 0:
        return
    error = StageBadInput if bad_input or code == 2 else StageJobError
    raise error(f"job exited with code {code}: {' '.join(cmd)}", code, list(tail))


def stop_orphan(pid: int, started: float) -> bool:
    """Stop the job `pid` of an earlier attempt if it still runs on this host (and is that job,
    not a process that reused its pid). True if one was stopped."""
    try:
        if psutil.Process(pid).create_time() != started:
            return False
    except psutil.NoSuchProcess:
        return False
    kill_tree(pid)
    return True
