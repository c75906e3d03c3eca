"""The morning after, in a real browser: a nightly run failed in a late stage; Retry in the Prefect UI finishes it.

Real `prefect server` (SQLite, its UI on) and a real process worker; the deployment comes from
deployments/prefect.yaml. Headless Chromium (Debian's `chromium` + `chromium-driver`, through
Selenium) opens the failed run's page, clicks Retry and confirms, and after the retry reads the
task-run list on the page: the stages that were reused say Skipped. Then MLflow: the parent run
keeps both attempts of the night.
"""

import contextlib
import os
import shutil
import time

import httpx
import pytest
import yaml

from tasks.config import load_config
from tasks import tracking as mlf
from tests.conftest import ROOT, small_config
from tests.prefect_services import PrefectServer, create_flow_run, deploy, start_worker, wait_for_flow_run

BEFORE_THE_FAULT = ["data_prep", "sft", "reward_model", "evaluate[sft]", "generate[0]", "score[0]"]


@contextlib.contextmanager
def chromium():
    """A headless Chromium driven by Selenium; skipped without one, failed if ALIGNFLOW_REQUIRE_BROWSER=1."""
    driver_path, browser_path = shutil.which("chromedriver"), shutil.which("chromium")
    if not (driver_path and browser_path):
        message = "headless Chromium needs Debian's chromium and chromium-driver (apt-get install)"
        if os.environ.get("ALIGNFLOW_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _click_retry_and_confirm(driver, wait) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    wait.until(EC.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Retry']"))).click()
    wait.until(EC.element_to_be_clickable(
        (By.XPATH, "//div[contains(@class, 'p-modal__footer')]//button[normalize-space()='Retry']"))).click()


def _task_run_badges(driver, wait, name: str) -> list[str]:
    """The state badges the run page's Task Runs tab shows for the task runs named `name`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "input[placeholder='Search by run name']"))
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.DELETE)
    search.send_keys(name)

    def listed(d):
        items = d.find_elements(By.CSS_SELECTOR, ".task-run-list-item")
        names = [i.find_element(By.CSS_SELECTOR, ".task-run-list-item__breadcrumbs a").text.strip() for i in items]
        if not names or not all(name in n for n in names):  # the list still shows the previous search
            return False
        return [i.find_element(By.CSS_SELECTOR, ".state-badge").text.strip()
                for i, n in zip(items, names) if n == name]

    return sorted(wait.until(listed))


def _metric_steps(c, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in c.get_metric_history(run_id, name)}


def _stage_runs(c, parent_run_id: str) -> list[tuple[str, str, str]]:
    """(stage run name, cached?, status) for every stage run of the pipeline run, oldest first."""
    runs = c.search_runs([c.get_run(parent_run_id).info.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                         order_by=["attributes.start_time ASC"])
    return [(r.info.run_name, r.data.tags["alignflow.cached"], r.info.status) for r in runs
            if "alignflow.cached" in r.data.tags]  # stage runs, not the promotion run nested here too


def test_nightly_run_retried_from_the_ui_in_a_browser(tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    data = small_config(tmp_path, **{"launch.retries": 0})  # so the injected fault fails the flow run
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_path)
    marker = tmp_path / "fault-update-0"
    marker.write_text("fail once")

    with chromium() as driver, PrefectServer(extra_env={"PREFECT_SERVER_UI_ENABLED": "true"}) as server:
        env = {**server.env, "ALIGNFLOW_HOME": str(ROOT)}
        deploy(env, ROOT / "deployments" / "prefect.yaml", cwd=ROOT)
        dep = httpx.get(f"{server.api_url}/deployments/name/alignment/nightly").json()
        [schedule] = dep["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == "Europe/Berlin" and schedule["active"]
        assert schedule["schedule"]["timezone"] in dep["description"]  # the UI shows the cron without it

        with start_worker(env, "alignflow-local", cwd=ROOT):
            run = create_flow_run(server.api_url, "alignment/nightly", parameters={
                "config_path": str(cfg_path), "rounds": 1,
                "debug": {"update[0]": {"fail_once_marker": "file://" + str(marker)}}})
            wait_for_flow_run(server.api_url, run["id"], {"FAILED"}, timeout=900, fail_fast=False)
            assert not marker.exists()  # the fault fired

            c = mlf.client(cfg.tracking_uri())
            [parent] = c.search_runs([c.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                     filter_string=f"tags.`prefect.flow_run_id` = '{run['id']}'")
            assert parent.info.status == "FAILED"  # the failed attempt, on the parent run
            assert _metric_steps(c, parent.info.run_id, "attempt_failed") == {1: 1.0}
            assert "stages.update" in parent.data.tags["alignflow.attempt_1.error"]

            # The page re-renders as it polls the API: an element found a moment ago may be gone.
            wait = WebDriverWait(driver, 60, ignored_exceptions=(NoSuchElementException,
                                                                 StaleElementReferenceException))
            driver.get(f"{server.api_url.removesuffix('/api')}/runs/flow-run/{run['id']}")
            _click_retry_and_confirm(driver, wait)
            done = wait_for_flow_run(server.api_url, run["id"], {"COMPLETED"}, timeout=900)
            time.sleep(2)  # task-run states reach the API through events, a moment after the flow run's
            driver.refresh()
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".state-badge").text.strip() == "Completed")
            driver.find_element(By.CSS_SELECTOR, "li.p-tab#task-runs").click()
            # On the page: each stage before the fault ran once (attempt 1) and was reused (attempt 2).
            for name in BEFORE_THE_FAULT:
                assert _task_run_badges(driver, wait, name) == ["Completed", "Skipped"], name
            assert _task_run_badges(driver, wait, "update[0]") == ["Completed", "Failed"]
    assert done["id"] == run["id"] and done["run_count"] == 2

    # The retry continued the same MLflow run (tagged with the flow-run id), in the model-training view.
    assert c.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = c.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    stages = _stage_runs(c, parent.info.run_id)
    first, retry = stages[: len(BEFORE_THE_FAULT) + 1], stages[len(BEFORE_THE_FAULT) + 1:]
    assert first == [(s, "false", "FINISHED") for s in BEFORE_THE_FAULT] + [("update[0]", "false", "FAILED")]
    # Second attempt: everything before the failure skipped through its manifest, no job launched;
    # the failed stage and those after it ran.
    assert retry == [(s, "true", "FINISHED") for s in BEFORE_THE_FAULT] + [
        ("update[0]", "false", "FINISHED"), ("evaluate[policy]", "false", "FINISHED")]

    # The parent run keeps the night: each attempt at its step, the totals over both.
    run_id = parent.info.run_id
    assert _metric_steps(c, run_id, "attempt_stages_launched") == {1: 6, 2: 2}
    assert _metric_steps(c, run_id, "attempt_stages_skipped") == {1: 0, 2: 6}
    assert _metric_steps(c, run_id, "attempt_failed") == {1: 1, 2: 0}
    walls = _metric_steps(c, run_id, "attempt_wall_seconds")
    assert sorted(walls) == [1, 2] and all(w > 0 for w in walls.values())
    night = parent.data.metrics
    assert night["wall_seconds"] == pytest.approx(walls[1] + walls[2], abs=0.02)
    assert (night["attempts"], night["failed_attempts"], night["stages_launched"], night["stages_skipped"]) == (
        2, 1, 8, 6)

    # Every curve of a stage run has points at its own steps only: update[0]'s at its optimizer steps.
    update = c.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{run_id}' and attributes.run_name = 'update[0]' "
        "and attributes.status = 'FINISHED'"))[0]
    steps = int(update.data.metrics["summary/optimizer_steps"])
    curves = [k for k in update.data.metrics if not k.startswith("summary/")]
    assert "loss" in curves and "summary/loss" in update.data.metrics
    for name in curves:
        assert set(_metric_steps(c, update.info.run_id, name)) <= set(range(1, steps + 1)), name
