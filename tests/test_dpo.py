"""The DPO variant of the pipeline, small, through Prefect's real engine:
data_prep -> sft -> reward_model -> evaluate[sft] -> dpo -> evaluate[policy] -> register -> promote."""

import pytest
from mlflow.tracking import MlflowClient

from stages.common import store
from tasks.config import load_config
from tasks.status import VALID, survey

DPO = {"method": "dpo", "dpo.steps": 40, "dpo.batch_size": 16, "dpo.lr": 0.001, "dpo.warmup_steps": 2,
       "dpo.log_every": 10, "dpo.eval_fraction": 0.2}


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, prefect_harness):
    from flows.alignment import alignment
    from tests.conftest import small_config
    import yaml

    tmp = tmp_path_factory.mktemp("dpo")
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(small_config(tmp, **DPO)))
    return path, alignment(config_path=str(path))


def test_dpo_pipeline_trains_the_policy_from_sft(dpo_run):
    path, s = dpo_run
    cfg = load_config(path)
    entries = survey(cfg)
    assert [e.label for e in entries] == ["data_prep", "sft", "reward_model", "evaluate[sft]", "dpo",
                                          "evaluate[policy]"]
    assert all(e.state == VALID for e in entries) and s["stages_launched"] == 6 and s["rounds"] == 0
    dpo = store.read_artifact(entries[4].uri)
    assert s["policy_checkpoint_uri"] == store.join(dpo.uri, "checkpoint")
    assert dpo.manifest["inputs"]["sft"]["uri"] == entries[1].uri  # the reference is the SFT model
    names = [f.path for f in dpo.files_under("checkpoint")]
    assert "checkpoint/model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    # Held-out pairs: the trained policy prefers the chosen response more often than not.
    assert dpo.metrics["eval_reward_accuracy"] > 0.6, dpo.metrics
    assert dpo.metrics["eval_margin"] > 0


def test_dpo_policy_is_registered_with_its_lineage(dpo_run):
    path, s = dpo_run
    cfg = load_config(path)
    client = MlflowClient(cfg.tracking_uri())
    mv = client.get_model_version(s["registered_model"], s["model_version"])
    assert mv.tags["lineage.dpo"] == s["policy_checkpoint_uri"].split("/")[-2]
    assert mv.tags["promotion"] in ("accepted", "rejected") and mv.tags["promotion_reason"]
    history = client.get_metric_history(client.search_runs(
        [client.get_run(s["mlflow_run_id"]).info.experiment_id],
        filter_string="attributes.run_name = 'dpo'")[0].info.run_id, "loss")
    assert sorted({m.step for m in history}) == [10, 20, 30, 40]  # every point is a step of the curve
