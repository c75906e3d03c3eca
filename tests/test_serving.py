"""The registered policy is an MLflow model (stages/common/serving.py), on the local SQLite registry:
register -> alias -> `mlflow.pyfunc.load_model("models:/<name>@champion")` -> predict gives the greedy
completions of the checkpoint loaded with `from_pretrained`; a corrupted copy fails the load, naming
the file; a first policy no better than its SFT model is not crowned. The policies are the session's
promotion candidates (tests/test_promote.py: a real SFT run); through a real `mlflow server` with S3
and `mlflow models serve`: tests/test_promote_server.py.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.common import serving, store
from stages.common.verifier import exact_match
from tasks import promotion as pr
from test_promote import cands, copy_artifact, one_thread_per_job, unique, version_tags  # noqa: F401 (fixtures)

MAX_NEW_TOKENS = 5  # the evaluate stage's, in the test config


def eval_rows(data, dst: Path) -> list[dict]:
    """The held-out prompts and answers of the session's data_prep."""
    return pq.read_table(store.download(data.artifact, "eval.parquet", dst)).to_pylist()


def greedy_reference(policy, prompts: list[str], dst: Path, storage_options: dict | None = None) -> list[str]:
    """Greedy completions of the policy's checkpoint loaded with `from_pretrained`, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = store.download_dir(policy.artifact, "checkpoint", dst, storage_options)
    model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def register(cfg, policy) -> str:
    """What the nightly flow does: register the policy (as an MLflow model) under a pipeline run."""
    from tasks import tracking as mlf

    tracking = mlf.start_pipeline_run(cfg, uuid.uuid4().hex, "serving", 0)
    _, version = mlf.register_policy(cfg, tracking, policy.artifact, lineage={"pipeline": cfg.pipeline})
    mlf.end_run(tracking, tracking.parent_run_id, "FINISHED")
    return version


@pytest.fixture
def registry_env(cands, monkeypatch):
    """A consumer of `models:/` configured by the environment, as `mlflow models serve` is."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cands.tracking_uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", cands.tracking_uri)
    return cands


def test_champion_loads_and_predicts_like_from_pretrained(registry_env, tmp_path):
    import mlflow.pyfunc

    from tasks.config import load_config

    cands = registry_env
    name = unique("serve")
    cfg = load_config(cands.config(name))
    version = register(cfg, cands.strong)
    assert register(cfg, cands.strong) == version  # a rerun registers nothing new
    client = pr.mlf.client(cands.tracking_uri)
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == [int(version)]
    pr.mlf.client(cands.tracking_uri).set_registered_model_alias(name, pr.CHAMPION, version)

    # The version is an MLflow model in MLflow's artifact store; store URI and lineage stay on it.
    mv = client.get_model_version(name, version)
    tags = version_tags(cands.tracking_uri, name, version)
    assert tags["checkpoint_uri"] == cands.strong.uri + "/checkpoint" == pr.checkpoint_uri(mv)
    assert tags["policy_digest"] == cands.strong.artifact.digest
    assert tags["lineage.sft"] == cands.strong.artifact.manifest["key"]
    assert tags["data_digest"] == cands.data.artifact.digest
    assert not mv.source.startswith(cands.strong.uri)

    model = mlflow.pyfunc.load_model(f"models:/{name}@{pr.CHAMPION}")
    params = {p.name: p.default for p in model.metadata.signature.params.params}
    assert params == {"max_new_tokens": 16, "temperature": 0.0}
    rows = eval_rows(cands.data, tmp_path / "data")
    prompts = [r["prompt"] for r in rows]
    completions = model.predict(prompts, params={"max_new_tokens": MAX_NEW_TOKENS})
    assert completions == greedy_reference(cands.strong, prompts, tmp_path / "ref")
    # ... the completions the evaluate stage scored: the same held-out accuracy.
    correct = sum(exact_match(c, r["answer"]) for c, r in zip(completions, rows))
    assert correct / len(rows) == cands.strong_score > 0

    assert [len(c) <= 1 for c in model.predict(prompts[:4], params={"max_new_tokens": 1})] == [True] * 4
    assert model.predict(prompts[:3]) == model.predict(prompts[:3], params={"temperature": 0.0})  # greedy default
    sampled = model.predict(prompts[:8], params={"temperature": 2.0, "max_new_tokens": MAX_NEW_TOKENS})
    assert len(sampled) == 8 and sampled != completions[:8]  # hot sampling: not the greedy completions
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.predict(prompts[:1], params={"temperature": -1.0})
    with pytest.raises(ValueError, match="prompt 1 \\('hello'\\) cannot be tokenized"):
        model.predict(["12+34=", "hello"])  # letters: not in the tiny tokenizer's vocabulary


def test_corrupted_champion_fails_to_load_naming_the_file(registry_env, tmp_path):
    import mlflow.pyfunc

    from tasks.config import load_config

    cands = registry_env
    name = unique("serve-bad")
    cfg = load_config(cands.config(name))
    version = register(cfg, cands.weak)
    client = pr.mlf.client(cands.tracking_uri)
    client.set_registered_model_alias(name, pr.CHAMPION, version)
    model_dir = Path(client.get_model_version(name, version).source.removeprefix("file://"))
    weights = model_dir / "data" / serving.DATA_DIR / "checkpoint" / "model.safetensors"
    original = weights.read_bytes()
    raw = bytearray(original)  # same size, flipped bytes: only the hash can tell
    raw[-64:] = bytes(b ^ 0xFF for b in raw[-64:])
    weights.write_bytes(bytes(raw))
    with pytest.raises(store.ArtifactError, match="model.safetensors: content does not match its manifest hash"):
        mlflow.pyfunc.load_model(f"models:/{name}@{pr.CHAMPION}")

    weights.write_bytes(original)  # repaired
    extra = weights.parent / "pytorch_model.bin"  # a file the manifest does not vouch for
    extra.write_bytes(b"not listed")
    with pytest.raises(store.ArtifactError, match="pytorch_model.bin: not listed"):
        mlflow.pyfunc.load_model(f"models:/{name}@{pr.CHAMPION}")
    extra.unlink()
    assert mlflow.pyfunc.load_model(f"models:/{name}@{pr.CHAMPION}").predict(["12+34="])


def test_first_version_no_better_than_its_sft_model_is_rejected(cands):
    """A policy equal to its SFT model is not crowned: in the nightly flow (given the SFT evaluation) and in
    the standalone promote flow (the SFT model from the version's lineage)."""
    from prefect import flow

    from flows.promote import promote, promote_policy
    from tasks.config import load_config

    name = unique("no-gain")
    cfg = load_config(cands.config(name))

    @flow(name="nightly-tail-sft")
    def nightly_tail():
        tracking = pr.mlf.start_pipeline_run(cfg, uuid.uuid4().hex, "nightly", 0)
        version = pr.mlf.register_policy(cfg, tracking, cands.strong.artifact, lineage={})[1]
        # The policy did not move from its SFT model: the same checkpoint, the same held-out accuracy.
        out = promote_policy(cfg, tracking, version, policy=cands.strong, data=cands.data,
                             reward_model=cands.reward_model, sft_eval=cands.strong_eval)
        pr.mlf.end_run(tracking, tracking.parent_run_id, "FINISHED")
        return version, out

    version, out = nightly_tail()
    assert out["decision"] == "rejected" and out["champion_after"] is None, out["reason"]
    assert "does not beat its SFT model" in out["reason"] and out["sft_score"] == cands.strong_score
    tags = version_tags(cands.tracking_uri, name, version)
    assert tags["promotion"] == "rejected" and "does not beat its SFT model" in tags["promotion_reason"]

    # The standalone flow finds the SFT model in the version's lineage (this config's SFT: the policy itself).
    again = promote(str(cands.config(name)), version)
    assert again["decision"] == "rejected" and "does not beat its SFT model" in again["reason"], again["reason"]
    assert again["sft_score"] == cands.strong_score and again["champion_after"] is None
