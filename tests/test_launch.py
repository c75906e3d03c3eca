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


# --- jobs forked from the warm job server (tasks/warm_jobs.py, stages/common/job_server.py) ---------

PROBE = textwrap.dedent("""
    import os, sys, time
    warm = "torch" in sys.modules  # imported by the server before this rank was forked
    print(f"rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']} warm={warm} "
          f"threads={os.environ['OMP_NUM_THREADS']} args={sys.argv[1:]}", flush=True)
    open(os.path.join(os.environ["PROBE_DIR"], f"rank-{os.environ['RANK']}.pid"), "w").write(str(os.getpid()))
    action = sys.argv[1]
    if action == "hang":
        time.sleep(600)
    if action == "bad-input" and os.environ["RANK"] == "1":
        print("ALIGNFLOW_BAD_INPUT: probe: no such column", file=sys.stderr, flush=True)
        sys.exit(2)
    if action == "fail" and os.environ["RANK"] == "0":
        raise RuntimeError("probe failed")
""")


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory):
    """A job environment whose PYTHONPATH has the probe module; one warm server serves the tests below."""
    from tasks import warm_jobs

    root = tmp_path_factory.mktemp("warm")
    (root / "warm_probe.py").write_text(PROBE)
    env = job_env(2)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env["PYTHONPATH"]])
    env["PROBE_DIR"] = str(root)
    yield env, root
    warm_jobs.stop_all()


def _warm(action: str, env: dict):
    from tasks.launch import PROJECT_ROOT
    from tasks.warm_jobs import start_job

    return lambda job_env_: start_job("warm_probe", [action], 2, sys.executable, job_env_, PROJECT_ROOT)


def test_warm_job_runs_every_rank_forked_from_the_server(probe_env):
    env, _ = probe_env
    lines = []
    run_job(["warm_probe", "ok"], timeout_s=300, log_line=lines.append, env=env, start=_warm("ok", env))
    ranks = sorted(line for line in lines if line.startswith("rank "))
    threads = env["OMP_NUM_THREADS"]
    assert ranks == [f"rank {r}/2 warm=True threads={threads} args=['ok']" for r in range(2)]


def test_warm_job_failures_keep_their_meaning(probe_env):
    env, _ = probe_env
    with pytest.raises(StageBadInput, match="no such column"):
        run_job(["warm_probe", "bad-input"], timeout_s=300, log_line=lambda s: None, env=env,
                start=_warm("bad-input", env))
    with pytest.raises(StageJobError, match="exited with code 1") as err:
        run_job(["warm_probe", "fail"], timeout_s=300, log_line=lambda s: None, env=env, start=_warm("fail", env))
    assert not isinstance(err.value, StageBadInput)
    assert "probe failed" in str(err.value)


def test_warm_job_timeout_kills_its_ranks(probe_env):
    env, root = probe_env
    for r in range(2):
        (root / f"rank-{r}.pid").unlink(missing_ok=True)
    with pytest.raises(StageTimeout):
        run_job(["warm_probe", "hang"], timeout_s=8, log_line=lambda s: None, env=env, start=_warm("hang", env))
    pids = [int((root / f"rank-{r}.pid").read_text()) for r in range(2)]
    deadline = time.time() + 10
    while time.time() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    assert not any(map(_alive, pids)), "a rank of a warm job outlived the job's timeout"


def test_a_server_that_cannot_start_is_an_error_the_caller_can_fall_back_on(tmp_path):
    from tasks.launch import PROJECT_ROOT
    from tasks.warm_jobs import start_job

    with pytest.raises((RuntimeError, OSError)):
        start_job("stages.sft", ["--spec", "x"], 1, str(tmp_path / "no-python"), job_env(1), PROJECT_ROOT)


def test_the_job_server_is_started_early_only_when_the_run_will_launch_jobs(tmp_path):
    """prestart_job_server: with no data_prep output in the store, the whole chain will run; with one
    (a rerun), nothing is started before a job needs it; never with launch.warm_start: false."""
    from conftest import small_config
    from stages.common import store
    from tasks import warm_jobs
    from tasks.config import parse_config
    from tasks.spec import stage_spec
    from tasks.stage import prestart_job_server

    warm_jobs.stop_all()
    cfg = parse_config(small_config(tmp_path))
    assert not prestart_job_server(parse_config(small_config(tmp_path, **{"launch.warm_start": False})))
    assert prestart_job_server(cfg) and len(warm_jobs._servers) == 1
    warm_jobs.stop_all()
    output = stage_spec("data_prep", cfg, {}, None).output
    store.filesystem(output, {})[0].makedirs(store.filesystem(output, {})[1], exist_ok=True)
    store.write_manifest(output, stage="data_prep", key="k", inputs={}, files=[], params={}, code="c", metrics={})
    assert not prestart_job_server(cfg) and not warm_jobs._servers
