"""A training job killed with SIGKILL resumes from its last save, and ends where an
uninterrupted run ends (same weights, bit for bit, in fp32 at the same thread count)."""

import json
import signal
import subprocess
import time

from stages.common import store
from stages.common.config import parse_config
from stages.common.runtime import StageSpec
from tasks.launch import PROJECT_ROOT, job_env, kill_tree, run_job, torchrun_command
from tasks.stage import stage_params
from tests.conftest import small_config


def write_spec(cfg, stage: str, name: str, inputs: dict[str, str]) -> str:
    out = store.join(cfg.storage_root(), cfg.pipeline, stage, name)
    spec = StageSpec(stage=stage, key=name, pipeline=cfg.pipeline, inputs=inputs, output=out,
                     params=stage_params(stage, cfg, None), code_version=store.code_version(stage))
    store.write_json(store.join(out, store.SPEC), spec.to_json())
    return store.join(out, store.SPEC)


def test_sigkilled_sft_resumes_from_last_save(tmp_path):
    cfg = parse_config(small_config(tmp_path, **{"sft.steps": 40, "sft.save_every": 10, "sft.log_every": 5}))
    env = job_env(2)
    logs: list[str] = []
    run_job(torchrun_command("data_prep", write_spec(cfg, "data_prep", "d", {}), 2), timeout_s=300,
            log_line=logs.append, env=env)
    data_uri = store.join(cfg.storage_root(), cfg.pipeline, "data_prep", "d")

    # Reference: uninterrupted.
    run_job(torchrun_command("sft", write_spec(cfg, "sft", "whole", {"data": data_uri}), 2), timeout_s=300,
            log_line=logs.append, env=env)
    whole = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, "sft", "whole"))

    # Interrupted: SIGKILL the whole job (torchrun and workers) once a resume point exists.
    spec = write_spec(cfg, "sft", "killed", {"data": data_uri})
    out_dir = tmp_path / "store" / cfg.pipeline / "sft" / "killed"
    proc = subprocess.Popen(torchrun_command("sft", spec, 2), cwd=PROJECT_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out_dir / "_resume" / "latest.json").exists():
        assert proc.poll() is None, "the job ended before its first resume point"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid, first_signal=signal.SIGKILL)  # as if the node died: no grace
    proc.wait()
    assert not (out_dir / store.MANIFEST).exists()  # killed: no output exists
    saved_step = json.loads((out_dir / "_resume" / "latest.json").read_text())["step"]
    assert 10 <= saved_step < 40

    relaunch: list[str] = []
    run_job(torchrun_command("sft", spec, 2), timeout_s=300, log_line=relaunch.append, env=env)
    assert any(f"resumed from step {saved_step}" in line for line in relaunch), "\n".join(relaunch)
    assert not any("sft step 5/40" in line for line in relaunch)  # did not start over
    resumed = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, "sft", "killed"))
    assert not (out_dir / "_resume").exists()  # cleaned once the output is complete
    assert resumed.file("checkpoint/model.safetensors").sha256 == whole.file("checkpoint/model.safetensors").sha256
