"""The whole pipeline, small, on s3:// (moto's server on loopback), through Prefect's real engine.

One module-scoped run (with a transient fault injected into a late stage) and one rerun
that must launch nothing.
"""

import json
import os

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.common import store
from stages.common.rollouts import SCORED_SCHEMA
from tests.conftest import small_config

STAGES_PER_RUN = 4 + 3 * 2 + 1  # data_prep, sft, reward_model, eval[sft]; 2 rounds x 3; eval[policy]


@pytest.fixture(scope="module")
def s3_pipeline(tmp_path_factory, s3_server, prefect_harness):
    from flows.alignment import alignment

    tmp = tmp_path_factory.mktemp("s3pipe")
    bucket = s3_server.bucket()
    data = small_config(tmp, **{"storage.root": f"s3://{bucket}/runs", "storage.s3_endpoint_url": s3_server.endpoint})
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    marker = f"s3://{bucket}/faults/score-1"
    opts = {"client_kwargs": {"endpoint_url": s3_server.endpoint}}
    fs, path = store.filesystem(marker, opts)
    fs.pipe_file(path, b"fail once")

    work = tmp / "work"  # the jobs' scratch folders (inherited by every job through the environment)
    os.environ["ALIGNFLOW_WORK_DIR"] = str(work)
    try:
        first = alignment(config_path=str(config), debug={"score[1]": {"fail_once_marker": marker}})
        second = alignment(config_path=str(config))
    finally:
        del os.environ["ALIGNFLOW_WORK_DIR"]
    return {"first": first, "second": second, "config": data, "opts": opts, "bucket": bucket, "marker": marker,
            "work": work}


def test_no_working_directory_is_left(s3_pipeline):
    jobs = s3_pipeline["work"] / "alignflow-jobs"
    assert jobs.is_dir()  # the jobs used it
    assert list(jobs.iterdir()) == []  # every job removed its own, the failed attempt of score[1] too


def test_summary(s3_pipeline):
    s = s3_pipeline["first"]
    for key in ("sft_accuracy", "policy_accuracy", "eval_prompts", "rounds", "policy_checkpoint_uri",
                "mlflow_run_id", "registered_model", "model_version"):
        assert key in s, key
    assert s["rounds"] == 2 and s["eval_prompts"] == 40
    assert 0.0 <= s["policy_accuracy"] <= 1.0
    assert s["policy_checkpoint_uri"].startswith(f"s3://{s3_pipeline['bucket']}/runs/test-arith/update/")
    assert s["stages_launched"] == STAGES_PER_RUN and s["stages_skipped"] == 0


def test_every_stage_has_a_manifest_in_s3(s3_pipeline):
    fs, _ = store.filesystem(f"s3://{s3_pipeline['bucket']}", s3_pipeline["opts"])
    manifests = fs.glob(f"{s3_pipeline['bucket']}/runs/test-arith/*/*/{store.MANIFEST}")
    stages = sorted(p.split("/")[-3] for p in manifests)
    assert stages == sorted(["data_prep", "sft", "reward_model", "evaluate", "evaluate"]
                            + ["generate", "score", "update"] * 2)
    # Checkpoints are safetensors, never pickles.
    policy = store.read_artifact(s3_pipeline["first"]["policy_checkpoint_uri"].rsplit("/", 1)[0], s3_pipeline["opts"])
    names = [f.path for f in policy.files_under("checkpoint")]
    assert "checkpoint/model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_scored_rollouts_follow_the_schema(s3_pipeline, tmp_path):
    fs, _ = store.filesystem(f"s3://{s3_pipeline['bucket']}", s3_pipeline["opts"])
    [score_dir] = [p.rsplit("/", 1)[0] for p in fs.glob(f"{s3_pipeline['bucket']}/runs/test-arith/score/*/{store.MANIFEST}")
                   if json.loads(fs.cat_file(p))["params"]["round"] == 0]
    art = store.read_artifact("s3://" + score_dir, s3_pipeline["opts"])
    parts = [store.download(art, f.path, tmp_path, s3_pipeline["opts"]) for f in art.files_under("scored")]
    table = pq.read_table(parts[0]).to_pylist() + pq.read_table(parts[1]).to_pylist()
    assert len(parts) == 2  # one part per rank
    assert pq.read_schema(parts[0]).names[: len(SCORED_SCHEMA)] == SCORED_SCHEMA.names
    cfg = s3_pipeline["config"]["rl"]
    assert len(table) == cfg["prompts_per_round"] * cfg["samples_per_prompt"]
    for r in table:
        assert len(r["response_logprobs"]) == len(r["response_token_ids"]) == len(r["ref_logprobs"])
        assert r["reward"] in (0.0, 1.0)
        assert all(lp <= 0 for lp in r["response_logprobs"])


def test_transient_fault_was_retried(s3_pipeline):
    fs, path = store.filesystem(s3_pipeline["marker"], s3_pipeline["opts"])
    assert not fs.exists(path)  # the injected fault fired once
    client = MlflowClient(s3_pipeline["config"]["tracking"]["uri"])
    parent = s3_pipeline["first"]["mlflow_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.`alignflow.stage` = 'score'")
    statuses = sorted((r.info.run_name, r.info.status) for r in runs)
    assert statuses == [("score[0]", "FINISHED"), ("score[1]", "FAILED"), ("score[1]", "FINISHED")]


def test_mlflow_runs_and_registry(s3_pipeline):
    s = s3_pipeline["first"]
    client = MlflowClient(s3_pipeline["config"]["tracking"]["uri"])
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["policy_accuracy"] == pytest.approx(s["policy_accuracy"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    sft = [r for r in children if r.info.run_name == "sft"][0]
    assert "summary/loss" in sft.data.metrics and "summary/tokens_per_s" in sft.data.metrics
    assert len(client.get_metric_history(sft.info.run_id, "loss")) >= 2  # a curve, logged by rank 0
    update = [r for r in children if r.info.run_name == "update[0]"][0]
    assert {"kl", "clip_frac", "summary/ratio_dev_first"} <= update.data.metrics.keys()
    assert update.data.metrics["summary/optimizer_steps"] > 0
    assert update.data.metrics["summary/ratio_dev_first"] < 1e-4  # the first minibatch is on-policy

    mv = client.get_model_version(s["registered_model"], s["model_version"])
    assert mv.tags["checkpoint_uri"] == s["policy_checkpoint_uri"]  # an MLflow model, its checkpoint's URI a tag
    for tag in ("pipeline", "config_digest", "data_digest", "policy_key", "sft_key", "reward_model_key"):
        assert mv.tags.get(tag), tag


def test_no_secret_leaks(s3_pipeline):
    secret = "testing-secret"  # AWS_SECRET_ACCESS_KEY set by the s3_server fixture
    fs, _ = store.filesystem(f"s3://{s3_pipeline['bucket']}", s3_pipeline["opts"])
    for p in fs.glob(f"{s3_pipeline['bucket']}/runs/**/_*.json"):
        assert secret not in fs.cat_file(p).decode(), p
    client = MlflowClient(s3_pipeline["config"]["tracking"]["uri"])
    parent = client.get_run(s3_pipeline["first"]["mlflow_run_id"])
    for run in client.search_runs([parent.info.experiment_id]):
        assert secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)


def test_rerun_launches_nothing(s3_pipeline):
    first, second = s3_pipeline["first"], s3_pipeline["second"]
    assert second["stages_launched"] == 0 and second["stages_skipped"] == STAGES_PER_RUN
    assert second["policy_checkpoint_uri"] == first["policy_checkpoint_uri"]
    assert second["policy_accuracy"] == first["policy_accuracy"]
    assert second["model_version"] == first["model_version"]  # registered once per checkpoint
    assert second["champion_version"] == first["champion_version"]  # nothing moved


def test_first_policy_is_champion_only_if_it_beats_its_sft_model(s3_pipeline):
    s = s3_pipeline["first"]
    client = MlflowClient(s3_pipeline["config"]["tracking"]["uri"])
    version = client.get_model_version(s["registered_model"], s["model_version"])
    assert version.tags["lineage.update"]  # traceable back through its rounds
    if s["policy_accuracy"] > s["sft_accuracy"]:  # promote.margin is 0
        assert s["promotion"] == "accepted" and s["champion_version"] == s["model_version"]
        champion = client.get_model_version_by_alias(s["registered_model"], "champion")
        assert str(champion.version) == s["model_version"] and champion.tags["promotion"] == "accepted"
    else:  # a policy that learned nothing over its SFT model is not crowned
        assert s["promotion"] == "rejected" and "does not beat its SFT model" in s["promotion_reason"]
        assert s["champion_version"] is None and version.tags["promotion"] == "rejected"


def _night_reports() -> list[str]:
    """The night reports (Prefect markdown artifacts) of this module's runs, oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["night-test-arith"])),
                                      sort=ArtifactSort.CREATED_DESC, limit=2)
    return [a.data for a in reversed(found)]


def test_night_report_artifact(s3_pipeline):
    first, second = _night_reports()  # the run with the fault, then the rerun
    s = s3_pipeline["first"]
    labels = ["data_prep", "sft", "reward_model", "evaluate[sft]", "generate[0]", "score[0]", "update[0]",
              "generate[1]", "score[1]", "update[1]", "evaluate[policy]"]
    rows = [line for line in first.splitlines() if line.startswith("| ") and "`" in line]
    assert [r.split(" | ")[0][2:] for r in rows] == labels
    assert all(" | launched | " in r for r in rows)
    assert f"{STAGES_PER_RUN} stages launched, 0 skipped" in first
    assert f"0 stages launched, {STAGES_PER_RUN} skipped" in second
    assert second.count("skipped (output in the store)") == STAGES_PER_RUN
    assert f"| SFT | {s['sft_accuracy']:.4f} | {s['sft_mean_reward']:.4f} |" in first
    assert f"| policy | {s['policy_accuracy']:.4f} | {s['policy_mean_reward']:.4f} |" in first
    assert f"v{s['model_version']}: **{s['promotion'].upper()}**" in first and s["promotion_reason"] in first


def test_night_plots_on_the_parent_run(s3_pipeline, tmp_path):
    from tasks import report
    from tasks import tracking as mlf
    from tasks.stage import StageResult

    client = MlflowClient(s3_pipeline["config"]["tracking"]["uri"])
    for night in ("first", "second"):
        run_id = s3_pipeline[night]["mlflow_run_id"]
        assert sorted(a.path for a in client.list_artifacts(run_id, "plots")) == ["plots/losses.png", "plots/rounds.png"]
        for name in ("losses.png", "rounds.png"):
            png = client.download_artifacts(run_id, f"plots/{name}", str(tmp_path / night))
            with open(png, "rb") as fh:
                assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # The rerun launched nothing, yet plots the loss curves of the jobs that trained on the first night.
    parent = client.get_run(s3_pipeline["first"]["mlflow_run_id"])
    sft_run = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'sft'"))[0]
    history = sorted(client.get_metric_history(sft_run.info.run_id, "loss"), key=lambda m: m.step)
    opts = s3_pipeline["opts"]
    sft = store.read_artifact(store.join(f"s3://{s3_pipeline['bucket']}/runs/test-arith/sft",
                                         sft_run.data.tags["alignflow.key"]), opts)
    rm_key = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.run_name = 'reward_model'"))[0]
    rm = store.read_artifact(store.join(f"s3://{s3_pipeline['bucket']}/runs/test-arith/reward_model",
                                        rm_key.data.tags["alignflow.key"]), opts)
    rerun = mlf.Tracking(s3_pipeline["config"]["tracking"]["uri"], parent.info.experiment_id,
                         s3_pipeline["second"]["mlflow_run_id"])
    curves = report.loss_curves(rerun, {"sft": StageResult(sft, False), "reward_model": StageResult(rm, False)})
    assert curves["sft"] == ([m.step for m in history], [m.value for m in history]) and len(history) >= 2
    assert len(curves["reward_model"][0]) >= 2


def test_status_of_the_store(s3_pipeline, tmp_path):
    import subprocess
    import sys

    from tasks.config import load_config
    from tasks.status import INVALID, VALID, WAITING, render, survey

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(s3_pipeline["config"]))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "status", str(config)], capture_output=True, text=True,
                         check=True, cwd=store.__file__.rsplit("/stages/", 1)[0]).stdout
    assert f"a run now would launch 0 stage(s) and skip {STAGES_PER_RUN}" in out
    cfg = load_config(config)
    entries = survey(cfg)
    assert [e.state for e in entries] == [VALID] * STAGES_PER_RUN
    policy_uri = s3_pipeline["first"]["policy_checkpoint_uri"].rsplit("/", 1)[0]
    assert entries[-2].label == "update[1]" and entries[-2].uri == policy_uri
    assert entries[-2].size == sum(f["size"] for f in store.read_artifact(policy_uri, s3_pipeline["opts"]).manifest["files"])

    # A checkpoint file whose bytes changed (same size): that stage is invalid, what follows waits for it.
    fs, base = store.filesystem(policy_uri, s3_pipeline["opts"])
    path = f"{base}/checkpoint/config.json"
    original = fs.cat_file(path)
    fs.pipe_file(path, original.replace(b"{", b" ", 1) if original.startswith(b"{") else original[::-1])
    try:
        entries = survey(cfg)
    finally:
        fs.pipe_file(path, original)
    by_label = {e.label: e for e in entries}
    assert by_label["update[1]"].state == INVALID and "checkpoint/config.json" in by_label["update[1]"].why
    assert by_label["evaluate[policy]"].state == WAITING and by_label["evaluate[policy]"].why == "after update[1]"
    assert sum(e.state == VALID for e in entries) == STAGES_PER_RUN - 2
    assert render(cfg, entries).endswith("would launch 2 stage(s) and skip 9, starting with update[1]")
