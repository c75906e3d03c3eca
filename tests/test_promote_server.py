"""Promotion through a real `mlflow server` on loopback, artifacts and pipeline store in S3 (moto).

    mlflow server --backend-store-uri sqlite:///... --artifacts-destination s3://bucket/mlartifacts
    storage.root: s3://bucket/store (storage.s3_endpoint_url: moto), model version sources s3://...

The store starts as a copy of the local session's artifacts (keys do not depend on where the
store is): data_prep, both SFT policies, the reward model and the weak policy's evaluation. The
strong policy's evaluation runs for real against S3 during the test. The champion registered as an
MLflow model loads with pyfunc and answers `mlflow models serve` (stages/common/serving.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from stages.common import store
from tasks import promotion as pr
from tests.conftest import ROOT, free_port
from test_promote import (Candidates, cands, check_serialised, one_thread_per_job,  # noqa: F401 (fixtures)
                          register, run_contenders, unique, version_tags)
from test_serving import MAX_NEW_TOKENS, eval_rows, greedy_reference


class MlflowServer:
    def __init__(self, uri: str, bucket: str, endpoint: str):
        self.uri, self.bucket, self.endpoint = uri, bucket, endpoint

    @property
    def opts(self) -> dict:
        return {"client_kwargs": {"endpoint_url": self.endpoint}}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    bucket = s3_server.bucket()
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint, "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(tmp / "server.log", "wb")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/server.db",
           "--artifacts-destination", f"s3://{bucket}/mlartifacts", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    saved = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = s3_server.endpoint  # for clients that download s3:// sources
    try:
        wait_until_up(f"{uri}/health", proc, tmp / "server.log")
        yield MlflowServer(uri, bucket, s3_server.endpoint)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)
        else:
            os.environ["MLFLOW_S3_ENDPOINT_URL"] = saved
        stop(proc)
        log.close()


def wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until `url` answers 200; the log's tail in the error if the process exits or time runs out."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{proc.args[:3]} did not come up at {url}: {log.read_text()[-3000:]}")
        time.sleep(0.25)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (started with start_new_session), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            break
        except ProcessLookupError:
            break
        except subprocess.TimeoutExpired:
            continue


class S3Setup:
    def __init__(self, server: MlflowServer, local: Candidates):
        self.server, self.local = server, local
        self.root = f"s3://{server.bucket}/store"
        self.tmp = local.tmp

    def config(self, name: str, **overrides) -> Path:
        return self.local.config(name, **{"storage.root": self.root, "storage.s3_endpoint_url": self.server.endpoint,
                                          "tracking.uri": self.server.uri, **overrides})


def _local_root(c: Candidates) -> str:
    from tasks.config import normalize_uri

    return normalize_uri(c.base["storage"]["root"])


@pytest.fixture(scope="module")
def s3(cands, mlflow_server) -> S3Setup:
    """The local session's artifacts copied into the S3 store (all but the strong policy's evaluation)."""
    setup = S3Setup(mlflow_server, cands)
    fs, _ = store.filesystem(setup.root, mlflow_server.opts)
    for res in (cands.data, cands.reward_model, cands.strong, cands.weak, cands.weak_eval):
        src = Path(res.uri.removeprefix("file://"))
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            fs.put_file(str(f), f"{s3_uri(setup, res)}/{f.relative_to(src).as_posix()}".removeprefix("s3://"))
    return setup


def s3_uri(s3: S3Setup, local_result) -> str:
    """Where a local artifact is in the S3 store (same place under the root)."""
    return s3.root + local_result.uri[len(_local_root(s3.local)):]


def test_promotion_through_server_and_s3(s3, tmp_path, monkeypatch):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient
    from prefect.artifacts import Artifact
    from transformers import AutoModelForCausalLM

    from flows.promote import promote

    uri, name = s3.server.uri, unique("srv")
    weak, strong = s3_uri(s3, s3.local.weak), s3_uri(s3, s3.local.strong)
    config = str(s3.config(name))

    v1 = register(uri, name, weak)
    first = promote(config, v1)
    assert first["decision"] == "accepted" and first["champion_after"] == v1

    v2 = register(uri, name, strong)
    better = promote(config, v2)
    assert better["decision"] == "accepted", better["reason"]
    assert (better["champion_version"], better["champion_after"]) == (v1, v2)
    assert (better["candidate_score"], better["champion_score"]) == (s3.local.strong_score, s3.local.weak_score)
    client = MlflowClient(uri)
    assert client.get_run(better["candidate_eval_run_id"]).data.tags["alignflow.cached"] == "false"  # ran on S3
    assert client.get_run(better["champion_eval_run_id"]).data.tags["alignflow.cached"] == "true"
    evals = [p for p in store.filesystem(s3.root, s3.server.opts)[0].glob(
        f"{s3.server.bucket}/store/test-arith/evaluate/*/{store.MANIFEST}")]
    assert len(evals) == 2

    v3 = register(uri, name, weak)
    worse = promote(config, v3)
    assert worse["decision"] == "rejected" and "is below champion" in worse["reason"]

    # Through a server, alias values come back as str; tags say what happened, by whom, on what data.
    assert client.get_registered_model(name).aliases == {"champion": v2}
    assert client.get_model_version_by_alias(name, "champion").source == strong + "/checkpoint"
    tags = version_tags(uri, name, v3)
    assert tags["promotion"] == "rejected" and tags["champion_version"] == v2
    assert tags["eval_data_digest"] == s3.local.data.artifact.digest
    md = Artifact.get(f"promotion-{name}").data
    assert f"{uri}/#/experiments/" in md and f"{uri}/#/models/{name}/versions/{v3}" in md

    # Consumers: our helper (hash-checked, from S3) and MLflow's own models:/ download.
    path = pr.champion_checkpoint(uri, name, tmp_path / "ours")
    assert AutoModelForCausalLM.from_pretrained(str(path)).num_parameters() == s3.local.strong.metrics["num_params"]
    # A consumer configured by the environment (resolving `models:/` touches the default tracking URI too).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    theirs = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "theirs"),
                                                      tracking_uri=uri))
    assert (theirs / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_corrupt_candidate_detected_by_the_stage_on_s3(s3):
    """A corrupted checkpoint with no evaluation yet: the evaluate job's hash check rejects it."""
    from flows.promote import promote

    uri, name = s3.server.uri, unique("srv-bad")
    fs, _ = store.filesystem(s3.root, s3.server.opts)
    src = s3_uri(s3, s3.local.strong)
    bad = f"{s3.root}/test-arith/sft/tampered-{uuid.uuid4().hex[:6]}"
    for f in s3.local.strong.artifact.manifest["files"]:
        fs.copy(f"{src}/{f['path']}".removeprefix("s3://"), f"{bad}/{f['path']}".removeprefix("s3://"))
    manifest = dict(s3.local.strong.artifact.manifest, key="tampered")  # new digest: no evaluation to reuse
    fs.pipe_file(f"{bad}/{store.MANIFEST}".removeprefix("s3://"), json.dumps(manifest).encode())
    weights = f"{bad}/checkpoint/model.safetensors".removeprefix("s3://")
    raw = bytearray(fs.cat_file(weights))
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    fs.pipe_file(weights, bytes(raw))

    v1 = register(uri, name, s3_uri(s3, s3.local.weak))
    v2 = register(uri, name, bad)
    pr.mlf.client(uri).set_registered_model_alias(name, "champion", v1)
    with pytest.raises(pr.CandidateInvalid, match="model.safetensors: content does not match its manifest hash"):
        promote(str(s3.config(name)), v2)
    assert pr.champion_version(pr.mlf.client(uri), name) == v1
    tags = version_tags(uri, name, v2)
    assert tags["promotion"] == "rejected" and "corrupted" in tags["promotion_reason"]


def test_concurrent_promotions_through_server(s3):
    name = unique("srv-race")
    versions = [register(s3.server.uri, name, s3_uri(s3, s3.local.weak)) for _ in range(4)]
    scores = dict(zip(versions, [0.4, 0.8, 0.2, 0.6]))
    reports = run_contenders(s3.server.uri, name, scores)
    check_serialised(reports, scores)
    client = pr.mlf.client(s3.server.uri)
    assert pr.champion_version(client, name) == versions[1]
    assert not client.search_registered_models(f"name LIKE '{name}.promotion-lock%'")


def test_champion_loads_and_serves_through_server_and_s3(s3, tmp_path, monkeypatch):
    """The nightly registration through the server: the model's files go to its S3 artifact store; the
    champion loads with pyfunc and answers `mlflow models serve`'s /invocations with the greedy completions."""
    import mlflow.pyfunc

    from tasks import tracking as mlf
    from tasks.config import load_config

    uri, name = s3.server.uri, unique("srv-serve")
    cfg = load_config(s3.config(name))
    policy = store.read_artifact(s3_uri(s3, s3.local.strong), s3.server.opts)
    tracking = mlf.start_pipeline_run(cfg, uuid.uuid4().hex, "serving", 0)
    _, version = mlf.register_policy(cfg, tracking, policy, lineage={"pipeline": cfg.pipeline})
    mlf.end_run(tracking, tracking.parent_run_id, "FINISHED")
    client = mlf.client(uri)
    client.set_registered_model_alias(name, pr.CHAMPION, version)
    mv = client.get_model_version(name, version)
    assert mv.tags["checkpoint_uri"] == policy.uri + "/checkpoint" and mv.tags["policy_digest"] == policy.digest
    fs, _ = store.filesystem(f"s3://{s3.server.bucket}", s3.server.opts)
    assert fs.glob(f"{s3.server.bucket}/mlartifacts/**/data/policy/checkpoint/model.safetensors")

    prompts = [r["prompt"] for r in eval_rows(s3.local.data, tmp_path / "data")][:12]
    expected = greedy_reference(s3.local.strong, prompts, tmp_path / "ref")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{pr.CHAMPION}")
    assert model.predict(prompts, params={"max_new_tokens": MAX_NEW_TOKENS}) == expected

    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # the environment's uvicorn, as in an activated venv
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([f"{bin_dir}/mlflow", "models", "serve", "-m",
                                 f"models:/{name}@{pr.CHAMPION}", "--env-manager", "local", "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"],
                                env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/ping", proc, log_path)
            body = json.dumps({"inputs": prompts, "params": {"max_new_tokens": MAX_NEW_TOKENS}}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                assert json.loads(r.read())["predictions"] == expected
        finally:
            stop(proc)
