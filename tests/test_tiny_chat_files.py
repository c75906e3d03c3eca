"""scripts/tiny_chat.py: the demo files load in their public formats and keep their promises."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; nothing may be downloaded

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.tiny_chat import build  # noqa: E402

SMALL = dict(seed=0, num_sft=200, num_pairs=100, num_eval=50)
NUM_OPERAND_PAIRS = 90 * 90


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("tiny-chat"), **SMALL)


def load(path: Path, cache_dir: Path):
    import datasets

    kind = "parquet" if path.suffix == ".parquet" else "json"
    return datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=str(cache_dir))


def operands(question: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", question))
    assert 10 <= a <= 99 and 10 <= b <= 99
    return a, b


def final_number(answer: str) -> int:
    match = re.search(r"\n#### (\d+)$", answer)
    assert match, answer
    return int(match.group(1))


def test_files_load_with_expected_columns_and_held_out_pairs(built, tmp_path):
    sft, pref = load(built["sft"], tmp_path), load(built["preference"], tmp_path)
    prompts, evals = load(built["prompts"], tmp_path), load(built["eval"], tmp_path)
    assert sft.column_names == ["messages"] and len(sft) == 200
    assert pref.column_names == ["prompt", "prompt_id", "chosen", "rejected", "messages",
                                 "score_chosen", "score_rejected"] and len(pref) == 100
    assert prompts.column_names == evals.column_names == ["question", "answer"]
    assert len(evals) == 50 and len(prompts) == NUM_OPERAND_PAIRS - 50

    eval_pairs = {operands(q) for q in evals["question"]}
    prompt_pairs = {operands(q) for q in prompts["question"]}
    assert len(eval_pairs) == 50 and len(prompt_pairs) == len(prompts)  # one row per pair
    assert eval_pairs.isdisjoint(prompt_pairs)
    assert eval_pairs.isdisjoint(operands(r["messages"][0]["content"]) for r in sft)
    assert eval_pairs.isdisjoint(operands(q) for q in pref["prompt"])

    for row in list(prompts) + list(evals):
        a, b = operands(row["question"])
        assert row["answer"] == f"{a} + {b} = {a + b}\n#### {a + b}"
        assert 10 <= len(row["question"].split()) <= 20


def test_sft_demonstrator_errs_only_by_forgetting_the_carry(built, tmp_path):
    wrong = 0
    for row in load(built["sft"], tmp_path):
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        a, b = operands(user["content"])
        given = final_number(assistant["content"])
        assert assistant["content"] == f"{a} + {b} = {given}\n#### {given}"
        if given != a + b:
            assert a % 10 + b % 10 >= 10 and given == a + b - 10
            wrong += 1
    assert 0 < wrong < 200 * 0.45  # some errors, and only on carry cases


def test_preference_pairs_are_ultrafeedback_shaped_and_ordered(built, tmp_path):
    import hashlib

    for row in load(built["preference"], tmp_path):
        a, b = operands(row["prompt"])
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert row["messages"] == row["chosen"] and row["chosen"] != row["rejected"]
        for side in ("chosen", "rejected"):
            assert [m["role"] for m in row[side]] == ["user", "assistant"]
            assert row[side][0]["content"] == row["prompt"]
        assert final_number(row["chosen"][1]["content"]) == a + b
        rejected = row["rejected"][1]["content"]
        wrong = final_number(rejected)
        assert wrong != a + b and rejected == f"{a} + {b} = {wrong}\n#### {wrong}"
        assert isinstance(row["score_chosen"], float) and row["score_chosen"] > row["score_rejected"]


def test_model_dir_loads_with_chat_template_and_single_digit_tokens(built):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = built["model"]
    assert list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok.encode(special, add_special_tokens=False)) == 1
    assert tok.tokenize("12+34") == ["1", "2", "+", "3", "4"]
    digits = [t for t in tok.tokenize("Ann has 123 pens and 4567 more") if t.strip("Ġ").isdigit()]
    assert digits == list("1234567")

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tok)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = tok(rendered, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_second_build_is_a_no_op_and_a_seed_gives_identical_bytes(built, tmp_path):
    out = built["sft"].parent
    files = [p for p in out.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    assert build(out, **SMALL) == built
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert not list(out.glob(".*.tmp"))  # no temporary leftovers

    again = build(tmp_path / "again", **SMALL)
    for key in ("sft", "preference", "prompts", "eval"):
        assert again[key].read_bytes() == built[key].read_bytes()

    other = build(tmp_path / "other-args", **{**SMALL, "num_eval": 60})  # other args rebuild
    assert len(other["eval"].read_bytes()) != len(built["eval"].read_bytes())
