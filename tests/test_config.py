"""The config schema: strict, errors name the key, checked before any job starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, load_config, parse_config
from tests.conftest import ROOT, small_config


def test_shipped_configs_validate():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.pipeline


def test_unknown_key_is_named(tmp_path):
    data = small_config(tmp_path)
    data["rl"]["clip_epsilon"] = 0.2  # typo of clip_eps
    with pytest.raises(ConfigError, match=r"rl\.clip_epsilon: unknown key"):
        parse_config(data)


def test_wrong_type_is_named(tmp_path):
    data = small_config(tmp_path)
    data["sft"]["steps"] = "many"
    with pytest.raises(ConfigError, match=r"sft\.steps"):
        parse_config(data)


def test_model_source_exactly_one(tmp_path):
    data = small_config(tmp_path)
    data["model"]["name_or_path"] = "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ConfigError, match="exactly one of model.name_or_path or model.tiny"):
        parse_config(data)


def test_datasets_source_needs_every_role_and_known_fields(tmp_path):
    data = small_config(tmp_path)
    data["data"] = {"source": "datasets", "sft": {"path": "s.jsonl"}, "eval": {"path": "e.jsonl"}}
    with pytest.raises(ConfigError, match="set data.preference, data.prompts"):
        parse_config(data)
    data["data"] = {"sft": {"path": "s.jsonl"}}
    with pytest.raises(ConfigError, match="data.sft set, but data.source is 'synthetic'"):
        parse_config(data)
    roles = {r: {"path": f"{r}.jsonl"} for r in ("sft", "preference", "prompts", "eval")}
    roles["prompts"]["columns"] = {"question": "q"}
    data["data"] = {"source": "datasets", **roles}
    with pytest.raises(ConfigError, match="data.prompts.columns: unknown field 'question'"):
        parse_config(data)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipeline: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_config_contradicting_its_algorithm_names_both_keys(tmp_path):
    data = small_config(tmp_path, **{"rl.algorithm": "rloo", "rl.advantage": "grpo"})
    with pytest.raises(ConfigError, match=r"rl.advantage 'grpo' contradicts rl.algorithm 'rloo'.*rl.algorithm: custom"):
        parse_config(data)
    mixed = parse_config(small_config(tmp_path, **{"rl.algorithm": "custom", "rl.advantage": "grpo", "rl.kl_mode": "reward",
                                                   "rl.kl_estimator": "k1", "rl.loss_agg": "token_mean"}))
    assert (mixed.rl.advantage, mixed.rl.kl_mode) == ("grpo", "reward")


def test_stage_params_hold_only_what_the_stage_reads(tmp_path):
    from tasks.spec import stage_params

    cfg = parse_config(small_config(tmp_path))
    generate = stage_params("generate", cfg, 0)
    assert set(generate.rl.model_fields) == {"prompts_per_round", "samples_per_prompt", "temperature", "top_p",
                                             "max_new_tokens", "min_new_tokens"}
    assert generate.rl.temperature == cfg.rl.temperature and generate.round == 0
    # A key that one stage does not read leaves that stage's key alone, and changes the stage that reads it.
    lr = parse_config(small_config(tmp_path, **{"rl.lr": 0.5}))
    assert stage_params("generate", lr, 0) == generate
    assert stage_params("update", lr, 0) != stage_params("update", cfg, 0)
    assert stage_params("update", lr, 0).rl.lr == 0.5


def test_min_new_tokens_unset_keeps_the_generate_key_and_is_checked(tmp_path):
    """rl.min_new_tokens came after generate keys were in use: unset, generate's params (the key's input,
    tasks/spec.py) are what they were before the field existed, and an old spec reads back to the same;
    set, it is in the params, so in the key, and the job reads it back. Out of range: an error naming it."""
    from stages.common.params import GenerateParams
    from tasks.spec import compute_key, stage_params

    # generate's params of small_config before rl.min_new_tokens existed
    before = {"seed": 0, "round": 0, "model": {"trust_remote_code": False},
              "rl": {"temperature": 1.0, "samples_per_prompt": 4, "max_new_tokens": 5, "prompts_per_round": 16,
                     "top_p": 1.0},
              "generate": {"backend": "auto", "batch_size": 512, "tensor_parallel_size": 1, "chunk_prompts": 64}}
    unset = stage_params("generate", parse_config(small_config(tmp_path)), 0).model_dump(mode="json")
    assert unset == before
    assert GenerateParams.model_validate(before).model_dump(mode="json") == before
    assert stage_params("generate", parse_config(small_config(tmp_path, **{"rl.min_new_tokens": 0})), 0) \
        .model_dump(mode="json") == before  # the default written out is the default

    dump = stage_params("generate", parse_config(small_config(tmp_path, **{"rl.min_new_tokens": 4})), 0) \
        .model_dump(mode="json")
    assert dump["rl"]["min_new_tokens"] == 4
    assert compute_key("generate", dump, {}, "code") != compute_key("generate", before, {}, "code")
    assert GenerateParams.model_validate(dump).rl.min_new_tokens == 4

    for bad in (6, -1):
        with pytest.raises(ConfigError, match=rf"rl\.min_new_tokens \({bad}\) must be between 0 and "
                                              r"rl\.max_new_tokens \(5\)"):
            parse_config(small_config(tmp_path, **{"rl.min_new_tokens": bad}))


def test_digest_ignores_where_not_what(tmp_path):
    a = parse_config(small_config(tmp_path))
    b = parse_config(small_config(tmp_path / "elsewhere"))
    c = parse_config(small_config(tmp_path, **{"rl.lr": 0.5}))
    assert a.digest() == b.digest()  # storage/tracking paths differ
    assert a.digest() != c.digest()


def test_cli_rejects_bad_config_before_any_job(tmp_path):
    data = small_config(tmp_path)
    data["engine"]["zero_stage"] = 7
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "engine.zero_stage" in proc.stderr
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_slurm_shape_per_stage_merges_and_names_bad_keys(tmp_path):
    data = small_config(tmp_path)
    data["launch"].update(backend="slurm", slurm={"nodes": 2, "gpus_per_node": 8, "setup": ["module load cuda"]},
                          slurm_per_stage={"generate": {"nodes": 1}})
    launch = parse_config(data).launch
    assert (launch.slurm_for("generate").nodes, launch.slurm_for("generate").gpus_per_node) == (1, 8)
    assert launch.slurm_for("sft").nodes == 2 and launch.slurm_for("sft").setup == ["module load cuda"]
    data["launch"]["slurm_per_stage"] = {"generate": {"node": 1}}
    with pytest.raises(ConfigError, match=r"launch.slurm_per_stage.generate.node: unknown key"):
        parse_config(data)
    data["launch"]["slurm_per_stage"] = {"generat": {"nodes": 1}}
    with pytest.raises(ConfigError, match=r"launch.slurm_per_stage.generat"):
        parse_config(data)
