"""Two runs started at the same moment on a fresh machine both start: the SQLite tracking store is
created (and migrated) once, and the experiment once."""

import subprocess
import sys
import time

import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, small_config

START_RUN = """
import sys, time
from tasks.config import load_config
from tasks import tracking as mlf
cfg = load_config(sys.argv[1])
start = float(sys.argv[3])
while time.time() < start:  # both processes touch the fresh store at the same instant
    pass
run = mlf.start_pipeline_run(cfg, flow_run_id=sys.argv[2], flow_run_name=sys.argv[2], rounds=1)
print("run", run.parent_run_id)
"""


def test_two_runs_at_once_on_a_fresh_tracking_store(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(small_config(tmp_path)))
    start = time.time() + 8  # past both interpreters' imports
    procs = [subprocess.Popen([sys.executable, "-c", START_RUN, str(config), f"flow-run-{i}", str(start)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("run ")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if e.name == "test"]
    assert len(experiments) == 1
    runs = client.search_runs([experiments[0].experiment_id])
    assert sorted(r.data.tags["prefect.flow_run_id"] for r in runs) == ["flow-run-0", "flow-run-1"]
