"""One writer per output key (tasks/lease.py), on file:// and s3:// (moto).

The lease itself: one creator wins, a live holder is waited for, an expired or dead holder is
taken over, the heartbeat keeps it alive. Then through the stage task: a crashed holder's lease
is taken over, a live holder is waited for, and two flows started at once on the same config
launch each stage once in all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.common import store
from tasks import lease
from tests.conftest import small_config


@pytest.fixture(params=["file", "s3"])
def output(request, tmp_path):
    if request.param == "file":
        return "file://" + str(tmp_path / "store" / "p" / "stage" / "k1"), {}
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.bucket()}/p/stage/k1", {"client_kwargs": {"endpoint_url": s3.endpoint}}


def holder(name: str) -> dict:
    return lease.owner(flow_run=name)


def read_lease(out, opts) -> dict | None:
    found = lease.lease_object(out, opts).read()
    return found and found[0]


def test_one_creator_wins_and_the_other_waits_until_release(output):
    out, opts = output
    first = lease.acquire(out, opts, holder("a"), ttl_s=30)
    assert not first.waited and read_lease(out, opts)["owner"]["flow_run"] == "a"
    waiting = threading.Event()
    got: list[lease.Lease] = []
    second = threading.Thread(target=lambda: got.append(
        lease.acquire(out, opts, holder("b"), ttl_s=30, poll_s=0.1, on_wait=lambda held: waiting.set())))
    second.start()
    assert waiting.wait(30)
    assert read_lease(out, opts)["owner"]["flow_run"] == "a" and not got  # still a's, b waits
    first.release()
    second.join(30)
    assert got and got[0].waited and read_lease(out, opts)["owner"]["flow_run"] == "b"
    got[0].release()
    assert read_lease(out, opts) is None


def test_expired_lease_is_taken_over_once(output):
    out, opts = output
    crashed = {"lease_id": "old", "owner": {"host": "elsewhere", "pid": 1, "pid_started": 0.0, "flow_run": "dead"},
               "ttl_s": 30, "expires_at": time.time() - 1}
    assert lease.lease_object(out, opts).create(crashed) is not None
    seen: list[dict] = []
    takers: list[lease.Lease] = []
    loser_waits = threading.Event()
    threads = [threading.Thread(target=lambda n=n: takers.append(
        lease.acquire(out, opts, holder(n), ttl_s=30, poll_s=0.1, on_takeover=seen.append,
                      on_wait=lambda held: loser_waits.set()))) for n in "xy"]
    for t in threads:
        t.start()
    assert loser_waits.wait(30)  # one took it over, the other waits for that one
    deadline = time.monotonic() + 30
    while not takers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(takers) == 1 and seen and all(s["lease_id"] == "old" for s in seen)
    assert read_lease(out, opts)["lease_id"] == takers[0].record["lease_id"]
    takers[0].release()
    for t in threads:
        t.join(30)
    assert len(takers) == 2 and takers[1].waited
    takers[1].release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(output):
    out, opts = output
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = {"lease_id": "gone", "owner": {**lease.owner(), "pid": proc.pid, "pid_started": 0.0},
            "ttl_s": 600, "expires_at": time.time() + 600}  # not expired: its holder is gone
    lease.lease_object(out, opts).create(dead)
    taken = lease.acquire(out, opts, holder("new"), ttl_s=30)
    assert read_lease(out, opts)["owner"]["flow_run"] == "new"
    taken.release()


def test_heartbeat_keeps_a_live_lease(output):
    out, opts = output
    held = lease.acquire(out, opts, holder("a"), ttl_s=1.5)
    first_expiry = held.record["expires_at"]
    time.sleep(2.0)  # past the first expiry: only the heartbeat keeps it
    assert read_lease(out, opts)["expires_at"] > first_expiry
    assert not lease.holder_is_gone(read_lease(out, opts)) and not held.lost
    held.release()
    assert read_lease(out, opts) is None


def test_a_lost_lease_is_noticed_and_not_released(output):
    out, opts = output
    held = lease.acquire(out, opts, holder("a"), ttl_s=0.6)
    obj = lease.lease_object(out, opts)
    record, token = obj.read()
    assert obj.replace({**record, "lease_id": "thief"}, token) is not None  # another writer took it
    time.sleep(0.6)
    assert held.lost
    held.release()  # conditional: leaves the thief's lease in place
    assert read_lease(out, opts)["lease_id"] == "thief"


# --- through the stage task -----------------------------------------------------------------

@pytest.fixture
def s3_config(tmp_path, s3_server):
    bucket = s3_server.bucket()
    data = small_config(tmp_path, **{"storage.root": f"s3://{bucket}/runs",
                                     "storage.s3_endpoint_url": s3_server.endpoint, "rl.rounds": 0})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def data_prep_output(config_path):
    from tasks.config import load_config
    from tasks.spec import stage_spec

    cfg = load_config(config_path)
    return cfg, stage_spec("data_prep", cfg, {}).output, cfg.storage_options()


def run_data_prep(cfg):
    from tasks import tracking as mlf
    from tasks.stage import run_stage

    tracking = mlf.start_pipeline_run(cfg, "test-flow-run", "lease-test", 0)
    return run_stage(stage="data_prep", cfg=cfg, inputs={}, tracking=tracking)


def test_stage_takes_over_a_crashed_holders_lease(s3_config, prefect_harness):
    cfg, out, opts = data_prep_output(s3_config)
    crashed = {"lease_id": "crashed", "owner": {"host": "node-7", "pid": 4242, "pid_started": 0.0, "flow_run": "x"},
               "ttl_s": 60, "expires_at": time.time() - 1}
    lease.lease_object(out, opts).create(crashed)
    result = run_data_prep(cfg)
    assert result.launched and store.read_artifact(out, opts).manifest["stage"] == "data_prep"
    assert read_lease(out, opts) is None  # released after the job


def test_stage_waits_for_a_live_holder(s3_config, prefect_harness):
    cfg, out, opts = data_prep_output(s3_config)
    other = lease.acquire(out, opts, holder("other-run"), ttl_s=30)
    results = []
    waiter = threading.Thread(target=lambda: results.append(run_data_prep(cfg)))
    waiter.start()
    time.sleep(5)
    fs, base = store.filesystem(out, opts)
    assert waiter.is_alive() and not fs.exists(f"{base}/{store.SPEC}")  # launched nothing while held
    other.release()
    waiter.join(300)
    assert results and results[0].launched and read_lease(out, opts) is None


def test_two_flows_at_once_launch_each_stage_once(s3_config, prefect_harness):
    """Two alignment runs of the same config (0 rounds: data_prep, sft, reward_model, evaluate)."""
    from flows.alignment import alignment

    summaries: list[dict] = []
    errors: list[BaseException] = []

    def run():
        try:
            summaries.append(alignment(config_path=str(s3_config)))
        except BaseException as err:
            errors.append(err)

    flows = [threading.Thread(target=run) for _ in range(2)]
    for t in flows:
        t.start()
    for t in flows:
        t.join(900)
    assert not errors and len(summaries) == 2
    a, b = summaries
    assert a["stages_launched"] + b["stages_launched"] == 4  # each stage once, in all
    for k in ("policy_checkpoint_uri", "policy_accuracy", "sft_accuracy", "reward_model_eval_accuracy"):
        assert a[k] == b[k], k
    # MLflow agrees: one launched stage run per key over both pipeline runs
    client = MlflowClient(yaml.safe_load(s3_config.read_text())["tracking"]["uri"])
    exp = client.get_experiment_by_name("test")
    launched = client.search_runs([exp.experiment_id], filter_string="tags.`alignflow.cached` = 'false'")
    keys = [r.data.tags["alignflow.key"] for r in launched]
    assert len(keys) == len(set(keys)) == 4
    cfg, out, opts = data_prep_output(s3_config)
    fs, _ = store.filesystem(out, opts)
    assert not fs.glob(out.removeprefix("s3://").rsplit("/data_prep/", 1)[0] + f"/*/*/{lease.LEASE}")  # all released
    assert json.loads(fs.cat_file(f"{out}/{store.MANIFEST}"))["stage"] == "data_prep"
    records = fs.glob(out.removeprefix("s3://").rsplit("/data_prep/", 1)[0] + "/_runs/*.json")
    assert len(records) == 2  # one run record each, for `alignflow gc`
    assert all(out in json.loads(fs.cat_file(r))["outputs"] for r in records)
