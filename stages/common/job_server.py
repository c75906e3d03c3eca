"""A warm job server: imports what the stages use once, then forks each local stage job from itself.

A stage job started cold pays ~6-10 s before its first step on 2 cores: torchrun imports torch,
then every rank imports torch, transformers (which pulls in torch._dynamo), DeepSpeed, pyarrow and
MLflow again. This server does those imports once per flow process; a job is then a fork of it
that runs torchrun's own launcher (`elastic_launch`, c10d rendezvous on a free local port, the
ranks forked from the warm process) on the stage module (`python -m MODULE ARGS` in each rank), in a session of its own, with the
job's environment, its output on the pipe the client passed. Each job is still its own process tree,
with its own exit code; nothing is shared between jobs but the imported code.

    python -m stages.common.job_server --socket PATH      (tasks/warm_jobs.py starts it)

Protocol on the Unix socket, one job per connection: the client sends an 8-byte length with the
write end of its output pipe attached (SCM_RIGHTS), then that many bytes of JSON
{"module", "args", "nproc", "env", "cwd"}; the server answers `{"pid": N}\\n` once the job runs and
`{"exit": CODE}\\n` when it ends (a signal's death as -SIGNUM, as subprocess reports it). A client
that hangs up early gets its job stopped (SIGTERM to the job's process group).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys
import uuid

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get `sig` when the process that forked this one ends (Linux prctl)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def preload() -> None:
    """Import every stage module (and through them torch, transformers, DeepSpeed, pyarrow, fsspec,
    datasets, MLflow) without running anything: no tensor op, no thread, no CUDA context, so that a
    fork starts clean."""
    import importlib
    import inspect
    import pkgutil

    import torch

    import stages

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")  # as make_engine

    import deepspeed  # noqa: F401  imported by make_engine on first use; its import alone is ~1.5 s
    # deepspeed.initialize's ZeRO optimizer check imports its Muon module, whose torch.compile
    # decorators import inductor: ~1.8 s of every training job's set-up, unless imported here.
    with contextlib.suppress(ImportError):
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401  the first metrics flush
    # ... opens the tracking store, whose modules (SQLAlchemy and its SQLite dialect, or the REST
    # client) were ~0.5 s of imports at the end of every job.
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import sqlalchemy.dialects.sqlite  # noqa: F401
    from torch.distributed.launcher.api import elastic_launch  # noqa: F401
    import transformers

    for info in pkgutil.iter_modules(stages.__path__):
        if not info.name.startswith("_") and info.name != "common":
            importlib.import_module(f"stages.{info.name}")
    # The architectures the pipeline builds and loads; transformers imports a model's module lazily.
    for arch in ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen2ForSequenceClassification",
                 "LlamaForSequenceClassification"):
        getattr(transformers, arch)
    # torch's rendezvous records each step with inspect.stack(), whose first call in a process maps
    # every loaded module to its file (~0.13 s with these imports): once here, inherited by each job.
    inspect.getmodule(inspect.currentframe())


def rank_main(module: str, args: list[str]) -> None:
    """One rank of a warm job: what `python -m MODULE ARGS` runs, in this forked process."""
    import runpy

    import torch

    die_with_parent(signal.SIGTERM)
    # The thread pool is sized on first use; set it from the job's environment, as a fresh process would.
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.environ["ALIGNFLOW_FORKED_RANK"] = "1"  # runtime.main returns instead of os._exit (see there)
    sys.argv = [module, *args]
    # run_module executes the module afresh as __main__ either way; the copy that preload imported
    # would only make it warn ("found in sys.modules ... unpredictable behaviour") in every job's log.
    sys.modules.pop(module, None)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def launch(module: str, args: list[str], nproc: int) -> int:
    """torchrun --standalone --nproc_per_node=N --max-restarts=0, with the ranks forked from here."""
    import tempfile

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's log folder (its ranks' error files) is removed with the job; the error is printed.
    with tempfile.TemporaryDirectory(prefix="alignflow-elastic-") as log_dir:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                              start_method="fork", logs_specs=DefaultLogsSpecs(log_dir=log_dir))
        try:
            elastic_launch(config, rank_main)(module, args)
        except ChildFailedError as err:
            print(err, file=sys.stderr, flush=True)
            return 1
    return 0


def _job_child(request: dict, out_fd: int, listener: socket.socket, conns: list[socket.socket]) -> None:
    """In the forked job process: become the job described by `request`; never returns."""
    code = 1
    try:
        os.setsid()  # its own process group, as the cold launcher's start_new_session
        die_with_parent(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        listener.close()
        for c in conns:
            c.close()
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["ALIGNFLOW_WARM_JOB"] = "1"
        code = launch(request["module"], list(request["args"]), int(request["nproc"]))
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("client hung up")
        data += chunk
    return data


def serve(path: str) -> None:
    preload()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    jobs: dict[int, socket.socket] = {}  # pid -> its client's connection
    print("ready", flush=True)
    while True:
        for key, _ in selector.select(timeout=0.05):
            if key.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    header, fds, _, _ = socket.recv_fds(conn, 8, 1)
                    request = json.loads(_read_exact(conn, struct.unpack("!Q", header)[0]))
                except (ConnectionError, OSError, ValueError, struct.error):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _job_child(request, fds[0], listener, [c for c in jobs.values()] + [conn])
                os.close(fds[0])
                jobs[pid] = conn
                selector.register(conn, selectors.EVENT_READ, pid)
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            else:  # a client hung up before its job ended: stop the job
                with contextlib.suppress(OSError, KeyError, ValueError):
                    os.killpg(key.data, signal.SIGTERM)
                selector.unregister(key.fileobj)
        while jobs:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = jobs.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError, KeyError, ValueError):
                selector.unregister(conn)
            with contextlib.suppress(OSError, KeyError, ValueError):
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    serve(parser.parse_args().socket)
