"""Stage jobs: own process group, streamed output, timeouts kill the group, exit 2 not retried."""

import os
import sys
import textwrap
import time

import pytest

from tasks.launch import StageBadInput, StageJobError, StageTimeout, job_env, run_job, torchrun_command


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_streams_lines_in_order():
    lines = []
    run_job([sys.executable, "-c", "import time\nfor i in range(5): print('line', i, flush=True); time.sleep(0.05)"],
            timeout_s=30, log_line=lines.append)
    assert lines == [f"line {i}" for i in range(5)]


def test_timeout_kills_the_whole_group(tmp_path):
    pidfile = tmp_path / "pids"
    script = textwrap.dedent(f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pidfile)!r}, "w").write(f"{{os.getpid()}} {{child.pid}}")
        print("started", flush=True)
        time.sleep(600)
    """)
    started = time.time()
    with pytest.raises(StageTimeout, match="timed out after 3s") as err:
        run_job([sys.executable, "-c", script], timeout_s=3, log_line=lambda s: None)
    assert time.time() - started < 30
    assert "started" in "".join(err.value.tail)
    parent, child = map(int, pidfile.read_text().split())
    deadline = time.time() + 5
    while time.time() < deadline and (_alive(parent) or _alive(child)):
        time.sleep(0.1)
    assert not _alive(parent) and not _alive(child), "a process of the job outlived the timeout"


def test_failure_carries_log_tail():
    with pytest.raises(StageJobError, match="exited with code 3") as err:
        run_job([sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], timeout_s=30,
                log_line=lambda s: None)
    assert not isinstance(err.value, StageBadInput)
    assert "about to fail" in str(err.value)


def test_bad_input_through_real_torchrun(tmp_path):
    """A stage that cannot read its spec exits 2; torchrun reports 1, the marker still tells."""
    cmd = torchrun_command("sft", "file://" + str(tmp_path / "missing-spec.json"), nproc_per_node=2)
    lines = []
    with pytest.raises(StageBadInput) as err:
        run_job(cmd, timeout_s=120, log_line=lines.append, env=job_env(2))
    assert "missing-spec.json" in str(err.value)


def test_timeout_kills_torchrun_workers(tmp_path):
    """torchrun puts each worker in its own session: the kill must still reach them."""
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import os, time
        open({str(tmp_path)!r} + f"/worker-{{os.environ['RANK']}}.pid", "w").write(str(os.getpid()))
        print("worker up", flush=True)
        time.sleep(600)
    """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    with pytest.raises(StageTimeout):
        run_job(cmd, timeout_s=8, log_line=lambda s: None, env=job_env(2))
    pids = [int((tmp_path / f"worker-{r}.pid").read_text()) for r in range(2)]
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    assert not any(map(_alive, pids)), "a torchrun worker outlived the job's timeout"
