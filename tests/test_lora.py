"""LoRA adapters end to end, through Prefect's real engine: a pretrained base (a tiny Llama built from a
config and saved as a local directory, loaded through model.name_or_path), adapters for sft,
reward_model and update, two RL rounds, evaluate, register, promote, and the registered policy loaded
as a full model (MLflow pyfunc, champion_checkpoint)."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from stages.common import adapters, store
from tasks.config import ConfigError, load_config, parse_config
from tasks.status import VALID, survey

WEIGHT_LOADS = Path(__file__).parent / "weight_loads"  # sitecustomize: logs every safetensors file opened


def build_base(path: Path) -> Path:
    """The 'pretrained' base: a tiny Llama with the project's character tokenizer, saved with safetensors."""
    from stages.common.models import build_tiny_model, save_checkpoint, train_char_tokenizer
    from stages.common.sections import TinyModelConfig

    tokenizer = train_char_tokenizer(["0123456789+="])
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=32)
    save_checkpoint(build_tiny_model(tiny, tokenizer, seed=1), tokenizer, path)
    return path


def tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, prefect_harness):
    from flows.alignment import alignment
    from tests.conftest import small_config

    tmp = tmp_path_factory.mktemp("lora")
    base = build_base(tmp / "base-model")
    cfg = small_config(tmp, **{"model": {"name_or_path": str(base), "lora": {"r": 4, "alpha": 8}},
                               # the random base never gets a verified answer: the reward model's
                               # rewards differ within a group, so the policy's adapter moves
                               "rl.lr": 0.003, "rl.reward": "reward_model"})
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp / "weight-loads.jsonl"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "ALIGNFLOW_TEST_WEIGHT_LOG")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(WEIGHT_LOADS), saved["PYTHONPATH"]]))
    os.environ["ALIGNFLOW_TEST_WEIGHT_LOG"] = str(log)
    try:
        summary = alignment(config_path=str(path))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    loads = [json.loads(line) for line in log.read_text().splitlines()]
    return path, base, summary, loads


def stage_artifacts(path) -> dict[str, store.Artifact]:
    return {e.label: store.read_artifact(e.uri) for e in survey(load_config(path)) if e.state == VALID}


def test_adapter_checkpoints_hold_only_adapter_weights_and_name_their_base(lora_run):
    path, base, s, _ = lora_run
    arts = stage_artifacts(path)
    assert s["stages_launched"] == 11 and set(arts) >= {"sft", "reward_model", "update[0]", "update[1]"}
    sft, policy = arts["sft"], arts["update[1]"]
    assert s["policy_checkpoint_uri"] == store.join(policy.uri, "checkpoint")
    for name in ("sft", "reward_model", "update[0]", "update[1]"):
        files = {f.path.removeprefix("checkpoint/") for f in arts[name].files_under("checkpoint")}
        assert {"adapter_model.safetensors", "adapter_config.json", adapters.BASE_FILE} <= files, (name, files)
        assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), (name, files)
    # The SFT adapter names the pretrained base by its path and the digest of its files; each policy's adapter
    # names the SFT artifact (the reference), by URI and manifest digest.
    sft_ref = json.loads(Path(store.download(sft, f"checkpoint/{adapters.BASE_FILE}", path.parent / "dl")).read_text())
    assert sft_ref == {"uri": str(base), "digest": adapters.external_digest(base)}
    for name in ("reward_model", "update[0]", "update[1]"):
        local = store.download(arts[name], f"checkpoint/{adapters.BASE_FILE}", path.parent / "dl" / name)
        assert json.loads(local.read_text()) == adapters.artifact_ref(sft), name
    # Only adapter tensors are stored: LoRA matrices (and the reward model's scalar head).
    policy_dir = store.download_dir(policy, "checkpoint", path.parent / "policy")
    names = tensor_names(policy_dir / "adapter_model.safetensors")
    assert names and all("lora_A" in n or "lora_B" in n for n in names), names
    rm_dir = store.download_dir(arts["reward_model"], "checkpoint", path.parent / "rm")
    rm_names = tensor_names(rm_dir / "adapter_model.safetensors")
    assert any(".score." in n for n in rm_names) and any("lora_" in n for n in rm_names), rm_names
    assert sft.metrics["trainable_params"] < sft.metrics["num_params"] / 5


def test_trained_policy_loads_with_from_pretrained_and_peft(lora_run):
    """The registered chain (base -> SFT adapter -> policy adapter), loaded by hand with transformers and
    peft, gives the same logits as the pipeline's loader, and differs from the SFT model: RL moved it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path, base, s, _ = lora_run
    arts = stage_artifacts(path)
    sft_dir = store.download_dir(arts["sft"], "checkpoint", path.parent / "by-hand" / "sft")
    policy_dir = store.download_dir(arts["update[1]"], "checkpoint", path.parent / "by-hand" / "policy")
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True)
    sft_model = PeftModel.from_pretrained(model, str(sft_dir)).merge_and_unload()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        sft_logits = sft_model(ids).logits
        by_hand = PeftModel.from_pretrained(sft_model, str(policy_dir)).merge_and_unload()(ids).logits
    ours = adapters.load_policy(adapters.Checkpoint(base, (sft_dir, policy_dir)))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, by_hand, atol=1e-5)
    assert (by_hand - sft_logits).abs().max() > 1e-4  # the policy's adapter is trained, not the zero init


def test_lora_update_jobs_load_the_base_weights_once(lora_run):
    """Each rank of each LoRA update job opens the base's weights once (no second copy for a reference) and
    each adapter of its chain once; a from-scratch reload would open the base again."""
    path, base, _, loads = lora_run
    update = [r for r in loads if r["stage"] == "stages.update"]
    by_rank: dict[int, list[str]] = {}
    for r in update:
        by_rank.setdefault(r["pid"], []).append(r["file"])
    assert len(by_rank) == 4, by_rank  # 2 rounds x 2 ranks
    base_weights = os.path.realpath(base / "model.safetensors")
    for files in by_rank.values():
        assert files.count(base_weights) == 1, files
        assert all(files.count(f) == 1 for f in files), files  # nothing loaded twice
        assert sum(f.endswith("adapter_model.safetensors") for f in files) in (1, 2)  # SFT's (+ the round's)


def test_registered_lora_policy_loads_as_a_full_model(lora_run, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from tasks import promotion as pr

    path, base, s, _ = lora_run
    cfg = load_config(path)
    arts = stage_artifacts(path)
    mv = MlflowClient(cfg.tracking_uri()).get_model_version(s["registered_model"], s["model_version"])
    assert mv.tags["adapter_base_uri"] == adapters.artifact_ref(arts["sft"])["uri"]
    # The MLflow model carries the adapter and both bases; it loads and predicts like the evaluate stage.
    # Through the environment, not mlflow.set_tracking_uri: a global URI would outlive this test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{s['registered_model']}/{s['model_version']}")
    completions = model.predict(["12+34=", "07+45="], params={"max_new_tokens": 5})
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
    import pyarrow.parquet as pq

    part = store.download(arts["evaluate[policy]"], "predictions/part-00000.parquet", tmp_path / "pred")
    rows = {r["prompt"]: r["response"] for r in pq.read_table(part).to_pylist()}
    served = model.predict(list(rows)[:4], params={"max_new_tokens": cfg.evaluate.max_new_tokens})
    assert served == [rows[p] for p in list(rows)[:4]]
    # champion_checkpoint (a champion exists only if it beat SFT): full weights, no adapter files.
    client = MlflowClient(cfg.tracking_uri())
    client.set_registered_model_alias(s["registered_model"], "lora-test", s["model_version"])
    merged = pr.champion_checkpoint(cfg.tracking_uri(), s["registered_model"], tmp_path / "champ", alias="lora-test")
    assert (merged / "model.safetensors").is_file() and not adapters.is_adapter_dir(merged)
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(str(merged), use_safetensors=True)
    chain = adapters.resolve(store.download_dir(arts["update[1]"], "checkpoint", tmp_path / "p"),
                             adapters.store_fetcher(tmp_path / "bases"))
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(full(ids).logits, adapters.load_policy(chain)(ids).logits, atol=1e-5)


def test_sft_key_covers_the_local_bases_files(tmp_path):
    """New weights at the same model.name_or_path make a new sft key (then every key after it), so a
    rerun trains on them rather than reusing an adapter trained on the old ones."""
    from tasks.spec import stage_spec
    from tests.conftest import small_config

    base = build_base(tmp_path / "base-model")
    cfg = parse_config(small_config(tmp_path, **{"model": {"name_or_path": str(base), "lora": {"r": 4}}}))
    key = stage_spec("sft", cfg, {}).key
    assert stage_spec("sft", cfg, {}).key == key and stage_spec("reward_model", cfg, {}).key
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert stage_spec("sft", cfg, {}).key != key


def test_qlora_is_refused_before_any_job_on_a_machine_without_a_gpu(tmp_path):
    from tasks.config import check_machines
    from tests.conftest import small_config

    cfg = parse_config(small_config(tmp_path, **{"model": {"name_or_path": "some/base",
                                                           "lora": {"load_in_4bit": True}}}))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="model.lora.load_in_4bit.*CUDA GPU"):
        check_machines(cfg)
    with pytest.raises(ConfigError, match="model.lora.stages includes sft, but model.tiny"):
        parse_config(small_config(tmp_path, **{"model.lora": {"r": 4}}))
