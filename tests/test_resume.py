"""A training job killed with SIGKILL resumes from its last save, and ends where an
uninterrupted run ends (same weights, bit for bit, in fp32 at the same thread count)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.common import store
from tasks.config import parse_config
from stages.common.runtime import StageSpec
from tasks.launch import PROJECT_ROOT, job_env, kill_tree, run_job, torchrun_command
from tasks.spec import code_version, stage_params
from tests.conftest import small_config


def write_spec(cfg, stage: str, name: str, inputs: dict[str, str], round_idx: int | None = None,
               debug: dict | None = None) -> str:
    out = store.join(cfg.storage_root(), cfg.pipeline, stage, name)
    spec = StageSpec(stage=stage, key=name, pipeline=cfg.pipeline, inputs=inputs, output=out,
                     params=stage_params(stage, cfg, round_idx).model_dump(mode="json"), code_version=code_version(stage),
                     debug=debug or {})
    store.write_json(store.join(out, store.SPEC), spec.to_json())
    return store.join(out, store.SPEC)


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_sigkilled_training_job_resumes_from_last_save(tmp_path, stage):
    steps = {f"{s}.{k}": v for s in ("sft", "dpo") for k, v in (("steps", 40), ("save_every", 10), ("log_every", 5))}
    cfg = parse_config(small_config(tmp_path, **steps, **{"dpo.batch_size": 16}))
    work = tmp_path / "work"
    env = job_env(2, {"ALIGNFLOW_WORK_DIR": str(work)})
    logs: list[str] = []
    run_job(torchrun_command("data_prep", write_spec(cfg, "data_prep", "d", {}), 2), timeout_s=300,
            log_line=logs.append, env=env)
    inputs = {"data": store.join(cfg.storage_root(), cfg.pipeline, "data_prep", "d")}
    if stage == "dpo":  # DPO trains from SFT, its reference
        run_job(torchrun_command("sft", write_spec(cfg, "sft", "s", inputs), 2), timeout_s=300,
                log_line=logs.append, env=env)
        inputs["sft"] = store.join(cfg.storage_root(), cfg.pipeline, "sft", "s")

    # Reference: uninterrupted.
    run_job(torchrun_command(stage, write_spec(cfg, stage, "whole", inputs), 2), timeout_s=300,
            log_line=logs.append, env=env)
    whole = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, stage, "whole"))

    # Interrupted: SIGKILL the whole job (torchrun and workers) once a resume point exists.
    spec = write_spec(cfg, stage, "killed", inputs)
    out_dir = tmp_path / "store" / cfg.pipeline / stage / "killed"
    proc = subprocess.Popen(torchrun_command(stage, spec, 2), cwd=PROJECT_ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out_dir / "_resume" / "latest.json").exists():
        assert proc.poll() is None, "the job ended before its first resume point"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid, first_signal=signal.SIGKILL)  # as if the node died: no grace
    proc.wait()
    assert not (out_dir / store.MANIFEST).exists()  # killed: no output exists
    left = sorted(p.name for p in (work / "alignflow-jobs").iterdir())
    assert left == [f"{cfg.pipeline}-{stage}-killed-r0", f"{cfg.pipeline}-{stage}-killed-r1"]  # SIGKILL: no cleanup
    saved_step = json.loads((out_dir / "_resume" / "latest.json").read_text())["step"]
    assert 10 <= saved_step < 40

    relaunch: list[str] = []
    run_job(torchrun_command(stage, spec, 2), timeout_s=300, log_line=relaunch.append, env=env)
    assert any(f"resumed from step {saved_step}" in line for line in relaunch), "\n".join(relaunch)
    assert not any(f"{stage} step 5/40" in line for line in relaunch)  # did not start over
    resumed = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, stage, "killed"))
    assert not (out_dir / "_resume").exists()  # cleaned once the output is complete
    assert not any((work / "alignflow-jobs").iterdir())  # the relaunch removed the killed job's folders, then its own
    assert resumed.file("checkpoint/model.safetensors").sha256 == whole.file("checkpoint/model.safetensors").sha256


# --- update and generate: the inputs come from real jobs of the stages before them ----------------

RL_OVERRIDES = {"rl.algorithm": "ppo", "rl.reward": "reward_model", "rl.prompts_per_round": 16,
                "rl.samples_per_prompt": 4, "rl.epochs": 2, "rl.minibatch_size": 4, "rl.save_every": 2,
                "generate.backend": "hf", "generate.chunk_prompts": 2}


def run_stage(cfg, stage: str, name: str, inputs: dict[str, str], logs: list[str], **spec_kw) -> str:
    run_job(torchrun_command(stage, write_spec(cfg, stage, name, inputs, **spec_kw), 2), timeout_s=300,
            log_line=logs.append, env=job_env(2))
    return store.join(cfg.storage_root(), cfg.pipeline, stage, name)


def kill_once(cfg, stage: str, name: str, inputs: dict[str, str], ready: str, **spec_kw):
    """Launch a job and SIGKILL its whole process tree once `ready` (under its output) exists."""
    spec = write_spec(cfg, stage, name, inputs, **spec_kw)
    out_dir = Path(cfg.storage.root) / cfg.pipeline / stage / name
    proc = subprocess.Popen(torchrun_command(stage, spec, 2), cwd=PROJECT_ROOT, env=job_env(2),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out_dir / ready).exists():
        assert proc.poll() is None, f"the {stage} job ended before {ready} existed"
        assert time.time() < deadline
        time.sleep(0.02)
    kill_tree(proc.pid, first_signal=signal.SIGKILL)
    proc.wait()
    assert not (out_dir / store.MANIFEST).exists()  # killed: no output exists
    return out_dir


@pytest.fixture(scope="module")
def rl_inputs(tmp_path_factory):
    """data_prep, sft and reward_model outputs of the small config (PPO, reward model's reward)."""
    cfg = parse_config(small_config(tmp_path_factory.mktemp("rl"), **RL_OVERRIDES))
    logs: list[str] = []
    data = run_stage(cfg, "data_prep", "d", {}, logs)
    sft = run_stage(cfg, "sft", "s", {"data": data}, logs)
    rm = run_stage(cfg, "reward_model", "rm", {"data": data, "sft": sft}, logs)
    return cfg, {"data": data, "sft": sft, "reward_model": rm}


def test_reward_model_is_the_same_every_time(rl_inputs):
    """Same spec, same weights: the new scalar head starts from the seed, not from whatever torch's global
    generator holds (a nightly rerun that retrains it must give the same rewards)."""
    cfg, up = rl_inputs
    again = run_stage(cfg, "reward_model", "rm-again", {"data": up["data"], "sft": up["sft"]}, [])
    first, second = store.read_artifact(up["reward_model"]), store.read_artifact(again)
    assert first.file("checkpoint/model.safetensors").sha256 == second.file("checkpoint/model.safetensors").sha256
    assert first.metrics["eval_accuracy"] == second.metrics["eval_accuracy"]


def rollout_rows(uri: str) -> tuple[list[str], list[dict]]:
    art = store.read_artifact(uri)
    files = [f.path for f in art.files_under("rollouts")]
    _, base = store.filesystem(uri)
    return files, [row for f in files for row in pq.read_table(str(Path(base) / f)).to_pylist()]


def test_sigkilled_generate_skips_uploaded_chunks(rl_inputs):
    cfg, up = rl_inputs
    inputs, logs = {"policy": up["sft"], "data": up["data"]}, []
    whole = run_stage(cfg, "generate", "whole", inputs, logs, round_idx=0)

    out_dir = kill_once(cfg, "generate", "killed", inputs, "_resume/generate-rank0.json", round_idx=0,
                        debug={"pause_after_chunk_s": 3})
    recorded = json.loads((out_dir / "_resume" / "generate-rank0.json").read_text())["chunks"]
    assert 1 <= len(recorded) < 4  # 8 prompts per rank, 2 per chunk

    relaunch: list[str] = []
    resumed = run_stage(cfg, "generate", "killed", inputs, relaunch, round_idx=0)
    for chunk in recorded:
        assert any(f"({chunk['path']}) was completed by an earlier attempt: skipped" in line for line in relaunch), \
            "\n".join(relaunch)
    assert not (out_dir / "_resume").exists()
    files, rows = rollout_rows(resumed)
    assert files == [f"rollouts/part-{r:05d}-{c:05d}.parquet" for r in range(2) for c in range(4)]
    assert (files, rows) == rollout_rows(whole)


def test_sigkilled_ppo_update_resumes_from_last_save(rl_inputs):
    cfg, up = rl_inputs
    logs: list[str] = []
    value = {"value": up["reward_model"]}
    rollouts = run_stage(cfg, "generate", "g", {"policy": up["sft"], "data": up["data"]}, logs, round_idx=0)
    scored = run_stage(cfg, "score", "s", {"rollouts": rollouts, "reference": up["sft"], "data": up["data"],
                                           "reward_model": up["reward_model"], **value}, logs, round_idx=0)
    inputs = {"policy": up["sft"], "scored": scored, **value}
    whole = store.read_artifact(run_stage(cfg, "update", "whole", inputs, logs, round_idx=0))
    total = whole.metrics["optimizer_steps"]
    assert total == 2 * 64 // 4  # rewards of the reward model differ: no group dropped

    out_dir = kill_once(cfg, "update", "killed", inputs, "_resume/latest.json", round_idx=0)
    saved_step = json.loads((out_dir / "_resume" / "latest.json").read_text())["step"]
    assert 2 <= saved_step < total

    relaunch: list[str] = []
    resumed = store.read_artifact(run_stage(cfg, "update", "killed", inputs, relaunch, round_idx=0))
    assert any(f"resumed from step {saved_step}" in line for line in relaunch), "\n".join(relaunch)
    assert not (out_dir / "_resume").exists()
    assert resumed.metrics["optimizer_steps"] == total
    for f in ("checkpoint/model.safetensors", "value/model.safetensors"):  # policy and value model
        assert resumed.file(f).sha256 == whole.file(f).sha256, f
