"""Shared fixtures: real services on loopback, a small pipeline config.

- `s3_server`: moto's S3-compatible server as a subprocess on 127.0.0.1, with a bucket.
- `prefect_harness`: Prefect's real engine against a temporary embedded API/DB.
- `tiny_config`: a builder for a small pipeline config (seconds per stage on 2 cores).
- `slurm_cluster`: a real 2-node Slurm cluster on loopback (scripts/slurm_cluster.sh).
- `tiny_chat`: the chat demo's files and tiny Qwen2 (scripts/tiny_chat.py), small, built once.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class S3Server:
    def __init__(self, endpoint: str, proc: subprocess.Popen):
        self.endpoint = endpoint
        self.proc = proc

    def bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"b-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's server on loopback; credentials are dummies, set in the environment only."""
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port)
        yield S3Server(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's real engine and API (embedded server, temporary database)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """slurmctld and two slurmd (nodes n1, n2) on loopback, SLURM_CONF set in this process.

    Skipped where Slurm is not installed, unless ALIGNFLOW_REQUIRE_SLURM=1 (CI, `make test`):
    then the script installs it, and a cluster that does not come up fails the tests."""
    if shutil.which("slurmctld") is None and os.environ.get("ALIGNFLOW_REQUIRE_SLURM") != "1":
        pytest.skip("Slurm is not installed (scripts/slurm_cluster.sh install)")
    script = str(ROOT / "scripts" / "slurm_cluster.sh")
    env = dict(os.environ, ALIGNFLOW_SLURM_DIR=str(tmp_path_factory.mktemp("slurm")))
    subprocess.run([script, "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    conf = subprocess.run([script, "env"], env=env, check=True, capture_output=True, text=True).stdout
    os.environ["SLURM_CONF"] = conf.strip().split("=", 1)[1]
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        subprocess.run([script, "down"], env=env, stdout=subprocess.DEVNULL)
        os.environ.pop("SLURM_CONF", None)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> dict[str, Path]:
    """{model, sft, preference, prompts, eval}: the public formats, a locally built Qwen2 and its template."""
    from scripts.tiny_chat import build

    return build(tmp_path_factory.mktemp("tiny-chat"), seed=0, num_sft=3000, num_pairs=3000, num_eval=200)


def small_config(tmp_path: Path, **overrides) -> dict:
    """A config that exercises every stage in seconds: tiny model, small data, 2 ranks."""
    cfg = {
        "pipeline": "test-arith",
        "seed": 0,
        "storage": {"root": str(tmp_path / "store")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test",
                     "registered_model": "test-policy"},
        "launch": {"nproc_per_node": 2, "timeout_s": 600, "retries": 1, "retry_delay_s": 0.5},
        "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
                           "max_position_embeddings": 32}},
        "data": {"synthetic": {"num_sft": 400, "num_pairs": 200, "num_eval": 40}},
        "engine": {"zero_stage": 2, "dtype": "fp32"},
        "sft": {"steps": 20, "batch_size": 16, "lr": 0.003, "warmup_steps": 2, "log_every": 10},
        "reward_model": {"steps": 10, "batch_size": 16, "lr": 0.001, "warmup_steps": 2, "log_every": 5},
        "rl": {"rounds": 2, "prompts_per_round": 16, "samples_per_prompt": 4, "max_new_tokens": 5,
               "minibatch_size": 16, "epochs": 1, "lr": 0.0001,
               # the small policy is rarely right: keep equal-reward groups so update really steps
               "drop_equal_reward_groups": False},
        "evaluate": {"max_new_tokens": 5},
    }
    for dotted, value in overrides.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    """Returns write(**overrides) -> path of a small config YAML in tmp_path."""

    def write(name: str = "config.yaml", **overrides) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(small_config(tmp_path, **overrides)))
        return path

    return write
