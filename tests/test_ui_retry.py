"""The morning after: a nightly run failed in a late stage; Retry in the Prefect UI finishes it.

Real `prefect server` (SQLite) and a real process worker; the deployment comes from
deployments/prefect.yaml; the retry is the exact call the UI's Retry button makes.
"""

import httpx
import yaml

from tasks.config import load_config
from tasks import tracking as mlf
from tests.conftest import ROOT, small_config
from tests.prefect_services import (PrefectServer, create_flow_run, deploy, start_worker, ui_retry,
                                    wait_for_flow_run)


def _stage_runs(cfg_path: str, parent_run_id: str) -> list[tuple[str, str, str]]:
    """(stage run name, cached?, status) for every stage run of the pipeline run, oldest first."""
    cfg = load_config(cfg_path)
    c = mlf.client(cfg.tracking_uri())
    runs = c.search_runs([c.get_run(parent_run_id).info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         order_by=["attributes.start_time ASC"])
    return [(r.info.run_name, r.data.tags["alignflow.cached"], r.info.status) for r in runs
            if "alignflow.cached" in r.data.tags]  # stage runs, not the promotion run nested here too


def test_nightly_schedule_and_ui_retry_redo_only_what_failed(tmp_path):
    data = small_config(tmp_path, **{"launch.retries": 0})  # so the injected fault fails the flow run
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    marker = tmp_path / "fault-update-0"
    marker.write_text("fail once")

    with PrefectServer() as server:
        env = {**server.env, "ALIGNFLOW_HOME": str(ROOT)}
        deploy(env, ROOT / "deployments" / "prefect.yaml", cwd=ROOT)
        dep = httpx.get(f"{server.api_url}/deployments/name/alignment/nightly").json()
        [schedule] = dep["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == "Europe/Berlin" and schedule["active"]

        with start_worker(env, "alignflow-local", cwd=ROOT):
            run = create_flow_run(server.api_url, "alignment/nightly", parameters={
                "config_path": str(cfg_path), "rounds": 1,
                "debug": {"update[0]": {"fail_once_marker": "file://" + str(marker)}}})
            wait_for_flow_run(server.api_url, run["id"], {"FAILED"}, timeout=900, fail_fast=False)
            assert not marker.exists()  # the fault fired

            ui_retry(server.api_url, run["id"])
            done = wait_for_flow_run(server.api_url, run["id"], {"COMPLETED"}, timeout=900)
    assert done["id"] == run["id"] and done["run_count"] >= 2

    # The retry continued the same MLflow run (tagged with the flow-run id).
    cfg = load_config(cfg_path)
    c = mlf.client(cfg.tracking_uri())
    [parent] = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                             filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
    stages = _stage_runs(str(cfg_path), parent.info.run_id)
    before = ["data_prep", "sft", "reward_model", "evaluate[sft]", "generate[0]", "score[0]"]
    first, retry = stages[: len(before) + 1], stages[len(before) + 1:]
    assert first == [(s, "false", "FINISHED") for s in before] + [("update[0]", "false", "FAILED")]
    # Second attempt: everything before the failure skipped through its manifest, no job launched;
    # the failed stage and those after it ran.
    assert retry == [(s, "true", "FINISHED") for s in before] + [
        ("update[0]", "false", "FINISHED"), ("evaluate[policy]", "false", "FINISHED")]
    assert parent.info.status == "FINISHED"
