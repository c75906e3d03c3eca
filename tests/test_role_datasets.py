"""A dataset per role: the public forms normalise to one, bad rows are named, and rendering through the
chat template is what every stage reads (stages/common/role_datasets.py, stages/common/chat.py)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.chat import render_prompt
from stages.common.models import load_tokenizer
from stages.common.role_datasets import check_local_datasets, load_role
from stages.common.runtime import BadInput
from stages.common.data_config import DataConfig, DatasetConfig
from stages.data_prep import render


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def role(tmp_path, name, rows, **ds) -> tuple[DatasetConfig, DataConfig]:
    path = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return DatasetConfig(path=path, shuffle_seed=None, **ds), DataConfig()


def test_preference_forms_become_one(tmp_path):
    """UltraFeedback-binarized message lists, HH-RLHF text and prompt/chosen/rejected text: the same rows."""
    uf = [{"prompt": "What is 2+3?", "chosen": [user("What is 2+3?"), assistant("5")],
           "rejected": [user("What is 2+3?"), assistant("6")], "score_chosen": 9.0, "score_rejected": 2.0}]
    hh = [{"chosen": "\n\nHuman: What is 2+3?\n\nAssistant: 5", "rejected": "\n\nHuman: What is 2+3?\n\nAssistant: 6"}]
    text = [{"question": "What is 2+3?", "good": "5", "bad": "6"}]
    expected = [{"prompt": [user("What is 2+3?")], "chosen": "5", "rejected": "6"}]
    assert load_role("preference", *role(tmp_path, "uf", uf)) == expected
    assert load_role("preference", *role(tmp_path, "hh", hh)) == expected
    ds, data = role(tmp_path, "text", text, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert load_role("preference", ds, data) == [{"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}]


def test_sft_messages_train_the_last_assistant_turn(tmp_path):
    turns = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello"), user("2+2?"),
             assistant("4"), user("thanks")]
    rows = load_role("sft", *role(tmp_path, "sft", [{"messages": turns}]))
    assert rows == [{"prompt": turns[:4], "response": "4"}]  # earlier turns are the prompt; trailing user dropped


def test_prompts_shuffle_limit_and_template(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    ds = DatasetConfig(path=path, columns={"prompt": "question"}, limit=4, shuffle_seed=3)
    data = DataConfig(prompt_template="Q: {prompt}\nA:")
    out = load_role("prompts", ds, data)
    assert len(out) == 4 and out == load_role("prompts", ds, data)  # seeded: the same rows every time
    assert [r["prompt"] for r in out] != [f"Q: q{i}\nA:" for i in range(4)]  # shuffled
    assert all(r["prompt"].startswith("Q: q") and r["answer"].startswith("#### ") for r in out)


@pytest.mark.parametrize("rows, columns, message", [
    ([{"messages": [user("hi")]}], {}, r"data\.sft \(.*\): row 0: no assistant turn"),
    ([{"messages": [assistant("hi")]}], {}, r"row 0: no turn before the assistant's"),
    ([{"prompt": "p", "text": "r"}], {}, r"data\.sft \(.*sft\.jsonl\): no column 'response'; its columns are \['prompt', 'text'\]"),
    ([{"q": "p", "response": "r"}], {"prompt": "question"}, r"no column 'question' \(data\.sft\.columns\.prompt\)"),
])
def test_bad_sft_rows_are_named(tmp_path, rows, columns, message):
    with pytest.raises(BadInput, match=message):
        load_role("sft", *role(tmp_path, "sft", rows, columns=columns))


def test_bad_preference_and_prompt_rows_are_named(tmp_path):
    same = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "x", "rejected": "x"}]
    with pytest.raises(BadInput, match=r"data\.preference \(.*\): row 1: chosen equals rejected"):
        load_role("preference", *role(tmp_path, "pref", same))
    apart = [{"chosen": [user("a"), assistant("1")], "rejected": [user("b"), assistant("2")]}]
    with pytest.raises(BadInput, match="row 0: chosen and rejected continue different conversations"):
        load_role("preference", *role(tmp_path, "pref2", apart))
    with pytest.raises(BadInput, match=r"data\.eval \(.*\): row 1: column 'answer' is empty"):
        load_role("eval", *role(tmp_path, "eval", [{"prompt": "p", "answer": "1"}, {"prompt": "q", "answer": ""}]))


def test_the_flows_check_reads_parquet_and_names_the_file(tmp_path):
    path = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "solution": "#### 1"}]), path)
    roles = {r: {"path": write_jsonl(tmp_path / f"{r}.jsonl", rows)} for r, rows in {
        "sft": [{"prompt": "p", "response": "r"}], "preference": [{"prompt": "p", "chosen": "a", "rejected": "b"}],
        "prompts": [{"prompt": "p", "answer": "1"}]}.items()}
    data = DataConfig(source="datasets", **roles, eval={"path": str(path), "columns": {"prompt": "question"}})
    with pytest.raises(BadInput, match=r"data\.eval \(.*eval\.parquet\): no column 'answer'; its columns are "
                                       r"\['question', 'solution'\]"):
        check_local_datasets(data)


def test_chat_rendering_and_length_limits(tiny_chat):
    tokenizer = load_tokenizer(tiny_chat["model"])
    ids = render_prompt(tokenizer, "What is 12 plus 30?", chat=True)
    assert tokenizer.decode(ids) == "<|im_start|>user\nWhat is 12 plus 30?<|im_end|>\n<|im_start|>assistant\n"
    rows = [{"prompt": "What is 12 plus 30?", "response": "12 + 30 = 42\n#### 42"},
            {"prompt": "What is 12 plus 30? " * 20, "response": "12 + 30 = 42\n#### 42"}]
    short = len(ids) + 2
    kept, counts = render("sft", rows, tokenizer, True, DataConfig(max_prompt_tokens=short))
    assert counts == {"sft_dropped": 1, "sft_truncated": 0} and len(kept) == 1
    assert tokenizer.decode(kept[0]["response_ids"]) == "12 + 30 = 42\n#### 42<|im_end|>"  # EOS: the end of the turn
    kept, counts = render("sft", rows, tokenizer, True,
                          DataConfig(max_prompt_tokens=short, max_response_tokens=5, overflow="truncate"))
    assert counts == {"sft_dropped": 0, "sft_truncated": 2}
    assert len(kept[1]["prompt_ids"]) == short and tokenizer.decode(kept[1]["prompt_ids"]).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")  # a prompt keeps its end: the generation prompt
    assert all(len(r["response_ids"]) == 5 for r in kept)


def test_a_tokenizer_without_pad_gets_eos_and_says_so(tiny_chat, tmp_path, capsys):
    tokenizer = load_tokenizer(tiny_chat["model"])
    tokenizer.pad_token = None
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    assert again.pad_token == again.eos_token == "<|im_end|>"
    assert "no pad token, using EOS ('<|im_end|>')" in capsys.readouterr().out
