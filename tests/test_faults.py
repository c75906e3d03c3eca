"""Faults: what is lost (nothing) and what is redone (only what must be).

These run a short pipeline prefix (data_prep -> sft) through the real stage task, so each
fault costs seconds, not a whole pipeline.
"""

import json

import pytest
import yaml
from prefect import flow

from stages.common import store
from tasks.config import load_config
from tasks import tracking as mlf
from tasks.launch import StageBadInput
from tasks.stage import configured
from tests.conftest import small_config


@flow(name="prefix")
def prefix(config_path: str, upto: str = "sft", sft_debug: dict | None = None) -> dict:
    cfg = load_config(config_path)
    tracking = mlf.start_pipeline_run(cfg, "test-prefix", "prefix", 0)
    stage = configured(cfg)
    data = stage("data_prep", cfg, {}, tracking)
    out = {"data_prep": data}
    if upto == "sft":
        out["sft"] = stage("sft", cfg, {"data": data}, tracking, debug=sft_debug)
    return out


def _config(tmp_path, **overrides):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp_path, **overrides)))
    return path


def _stage_runs(cfg_path, stage):
    cfg = load_config(cfg_path)
    c = mlf.client(cfg.tracking_uri())
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`alignflow.stage` = '{stage}'")


def test_corrupted_checkpoint_is_produced_again(tmp_path, prefect_harness):
    cfg_path = _config(tmp_path)
    first = prefix(str(cfg_path))
    sft = first["sft"].artifact
    weights = str(tmp_path / "store" / sft.uri.split("/store/", 1)[1] / "checkpoint" / "model.safetensors")
    blob = bytearray(open(weights, "rb").read())
    blob[-10:] = b"\xff" * 10  # same size, other bytes: only the hash can tell
    open(weights, "wb").write(bytes(blob))

    second = prefix(str(cfg_path))
    assert not second["data_prep"].launched, "data_prep was intact and must not rerun"
    assert second["sft"].launched, "the corrupted sft output must be produced again"
    assert second["sft"].uri == sft.uri  # same key, same place
    assert second["sft"].artifact.digest == sft.digest  # deterministic: the same bytes again
    assert store.sha256_file(weights) == sft.file("checkpoint/model.safetensors").sha256


def test_divergence_fails_without_manifest_and_is_not_retried(tmp_path, prefect_harness):
    cfg_path = _config(tmp_path)
    with pytest.raises(StageBadInput, match=r"sft: loss is nan at step 5"):
        prefix(str(cfg_path), sft_debug={"nan_loss_at_step": 5})
    runs = _stage_runs(cfg_path, "sft")
    assert [r.info.status for r in runs] == ["FAILED"]  # one attempt: exit 2 is not retried
    sft_dirs = list((tmp_path / "store" / "test-arith" / "sft").iterdir())
    assert len(sft_dirs) == 1 and not (sft_dirs[0] / store.MANIFEST).exists()
    # what came before is intact and reusable
    assert store.try_read_artifact("file://" + str(next((tmp_path / "store" / "test-arith" / "data_prep").iterdir())))


def _role_files(tmp_path, case: str) -> dict:
    """data.sft/preference/prompts/eval as local files in the public formats, one of them broken by `case`."""
    def user(q):
        return {"role": "user", "content": q}

    def assistant(a):
        return {"role": "assistant", "content": a}

    q = [f"What is {i} plus 1?" for i in range(20)]
    rows = {
        "sft": [{"messages": [user(q[i]), assistant(f"#### {i + 1}")]} for i in range(20)],
        "preference": [{"prompt": q[i], "chosen": [user(q[i]), assistant(f"#### {i + 1}")],
                        "rejected": [user(q[i]), assistant(f"#### {i + 2}")]} for i in range(20)],
        "prompts": [{"question": q[i], "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(20)],
        "eval": [{"question": q[i], "answer": f"#### {i + 1}"} for i in range(5)],
    }
    if case == "empty":
        rows["eval"] = []
    if case == "no_assistant_turn":
        rows["sft"][7]["messages"] = [user(q[7])]
    if case == "chosen_is_rejected":
        rows["preference"][3]["rejected"] = rows["preference"][3]["chosen"]
    roles = {}
    for role, role_rows in rows.items():
        path = tmp_path / f"{role}.jsonl"
        if not (case == "missing_file" and role == "prompts"):
            path.write_text("".join(json.dumps(r) + "\n" for r in role_rows))
        roles[role] = {"path": str(path)} | ({"columns": {"prompt": "question"}} if role in ("prompts", "eval") else {})
    if case == "missing_column":
        roles["prompts"]["columns"] = {"prompt": "question", "answer": "solution"}
    return roles


@pytest.mark.parametrize("case, expected", [
    ("missing_column", r"data\.prompts \(.*prompts\.jsonl\): no column 'solution' \(data\.prompts\.columns\.answer\)"),
    ("empty", r"data\.eval.path|data\.eval \(.*eval\.jsonl\): the file is empty"),
    ("missing_file", r"data\.prompts\.path: file not found: .*prompts\.jsonl"),
    ("no_assistant_turn", r"data\.sft \(.*sft\.jsonl\): row \d+: no assistant turn"),
    ("chosen_is_rejected", r"data\.preference \(.*preference\.jsonl\): row \d+: chosen equals rejected"),
])
def test_bad_dataset_fails_before_any_job(tmp_path, prefect_harness, case, expected):
    from flows.alignment import alignment

    cfg_path = _config(tmp_path, **{"data.source": "datasets", **{f"data.{r}": d for r, d in _role_files(tmp_path, case).items()}})
    with pytest.raises(Exception, match=expected):
        alignment(config_path=str(cfg_path))
    assert not (tmp_path / "store").exists(), "no job may start on a bad dataset"


def test_a_rerun_marks_reused_stages_skipped_and_curves_keep_their_steps(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cfg_path = _config(tmp_path)
    first = prefix(str(cfg_path))
    again = prefix(str(cfg_path), return_state=True)
    assert not again.result()["sft"].launched  # the flow still gets the StageResult

    # Prefect: each reused stage's task run is Completed, named Skipped, its message the output it reused.
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[again.state_details.flow_run_id])))
    states = {r.name: r.state for r in runs}
    assert {name: (s.type.value, s.name) for name, s in states.items()} == {
        "data_prep": ("COMPLETED", "Skipped"), "sft": ("COMPLETED", "Skipped")}
    assert first["sft"].uri in states["sft"].message

    # MLflow: the loss curve has points at its logging steps only; the result is `summary/loss`.
    c = mlf.client(load_config(cfg_path).tracking_uri())
    launched, skipped = sorted(_stage_runs(cfg_path, "sft"), key=lambda r: r.data.tags["alignflow.cached"])
    loss = c.get_metric_history(launched.info.run_id, "loss")
    assert sorted(m.step for m in loss) == [10, 20]  # sft.log_every 10, sft.steps 20
    [summary] = c.get_metric_history(launched.info.run_id, "summary/loss")
    assert summary.value == max(loss, key=lambda m: m.step).value
    assert all(k.startswith("summary/") for k in skipped.data.metrics) and "summary/loss" in skipped.data.metrics
