"""Build a self-contained chat demo: four datasets in public formats and a tiny Qwen2.

The task is GSM8K-style word problems that add two two-digit numbers. Files under --out:

- prompts.parquet    RL prompts, GSM8K format (`question`, `answer` ending in `#### <n>`),
                     one row per training operand pair.
- eval.parquet       the same format for the held-out operand pairs, which no other file uses.
- sft.jsonl          `{"messages": [user, assistant]}` demonstrations from an imperfect
                     demonstrator: when the units digits carry it forgets the carry (writes
                     a+b-10) with probability 0.65. The error is systematic and checkable, so
                     SFT learns it and RL with the `####` verifier can then fix it.
- preference.jsonl   UltraFeedback-binarized rows (prompt, prompt_id, chosen, rejected,
                     messages, score_chosen, score_rejected); rejected is the forgotten carry
                     or the sum with one digit changed.
- model/             a ~1M-parameter Qwen2 from a config, with a byte-level BPE tokenizer
                     trained here (digits split one per token, as Qwen2) and a ChatML template.
- build.json         the arguments of the build, written last: a matching one means done.

Nothing is downloaded; `random.Random(seed)` drives all data, so a seed gives identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # torch and transformers load lazily: an up-to-date build returns at once
    from transformers import PreTrainedTokenizerFast

REPO_ROOT = Path(__file__).resolve().parent.parent
OPERANDS = range(10, 100)  # two digits, no leading zeros
FORGET_CARRY_P = 0.65  # demonstrator's error rate on carry cases
REJECT_WITH_FORGOTTEN_CARRY_P = 0.5  # else the rejected answer has one digit of the sum changed
NAMES = ["Ann", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack"]
OBJECTS = ["pens", "apples", "stickers", "marbles", "books", "cards", "shells", "coins",
           "stamps", "cookies"]
TEMPLATES = [  # a always comes before b in the text
    "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
    "{name} had {a} {obj}. Then {name} found {b} more. How many {obj} does {name} have?",
    "There are {a} {obj} in a box and {b} {obj} in a bag. How many {obj} are there in all?",
    "{name} got {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did {name} get?",
    "A shop sold {a} {obj} in the morning and {b} in the afternoon. How many {obj} did it sell?",
    "{name} has {a} {obj} and {other} has {b} {obj}. How many {obj} do they have together?",
    "{name} saved {a} {obj} last week and {b} {obj} this week. How many {obj} has {name} saved?",
    "A class made {a} {obj} and then made {b} more. How many {obj} did the class make?",
]
# Qwen2's pre-tokenizer pattern: `\p{N}` (not `\p{N}+`) puts every digit in its own token.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DATA_FILES = {"sft": "sft.jsonl", "preference": "preference.jsonl",
              "prompts": "prompts.parquet", "eval": "eval.parquet"}


def make_question(rng: random.Random, a: int, b: int) -> str:
    name, other = rng.sample(NAMES, 2)
    return rng.choice(TEMPLATES).format(name=name, other=other, obj=rng.choice(OBJECTS), a=a, b=b)


def worked_answer(a: int, b: int, total: int) -> str:
    return f"{a} + {b} = {total}\n#### {total}"


def final_number(answer: str) -> int:
    return int(answer.rsplit("#### ", 1)[1])


def carries(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def one_digit_changed(rng: random.Random, total: int) -> int:
    digits = list(str(total))
    i = rng.randrange(len(digits))
    digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0")])
    return int("".join(digits))


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def make_rows(rng: random.Random, num_sft: int, num_pairs: int, num_prompts: int | None,
              num_eval: int) -> dict[str, list[dict]]:
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    if not 0 < num_eval < len(pairs):
        raise ValueError(f"num_eval must be in 1..{len(pairs) - 1}")
    rng.shuffle(pairs)
    eval_pairs, train_pairs = pairs[:num_eval], pairs[num_eval:]

    def gsm8k(a: int, b: int) -> dict:
        return {"question": make_question(rng, a, b), "answer": worked_answer(a, b, a + b)}

    rows: dict[str, list[dict]] = {
        "eval": [gsm8k(a, b) for a, b in eval_pairs],
        "prompts": [gsm8k(a, b) for a, b in train_pairs[:num_prompts]],
        "sft": [], "preference": []}
    for _ in range(num_sft):
        a, b = rng.choice(train_pairs)
        forgot = carries(a, b) and rng.random() < FORGET_CARRY_P
        demo = worked_answer(a, b, a + b - 10 if forgot else a + b)
        rows["sft"].append({"messages": conversation(make_question(rng, a, b), demo)})
    for _ in range(num_pairs):
        a, b = rng.choice(train_pairs)
        question = make_question(rng, a, b)
        if carries(a, b) and rng.random() < REJECT_WITH_FORGOTTEN_CARRY_P:
            wrong = a + b - 10
        else:
            wrong = one_digit_changed(rng, a + b)
        chosen = conversation(question, worked_answer(a, b, a + b))
        rows["preference"].append({
            "prompt": question, "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
            "chosen": chosen, "rejected": conversation(question, worked_answer(a, b, wrong)),
            "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.0})
    return rows


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename: a killed run never leaves a half file under `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, sort_keys=False) + "\n" for row in rows)
    write_atomically(path, write)


def write_parquet(path: Path, rows: list[dict]) -> None:
    write_atomically(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))


def repo_docs() -> list[str]:
    """Every *.md of the repository, outside hidden folders (.git, .venv, build outputs)."""
    docs = []
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        docs += [(Path(folder) / f).read_text(encoding="utf-8")
                 for f in sorted(files) if f.endswith(".md")]
    return docs


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    # NFC as Qwen2 has; AutoTokenizer loads this folder as Qwen2Tokenizer, which adds it anyway.
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    # Arithmetic needs one token per digit, however long the number.
    assert bpe.encode("12+34").tokens == ["1", "2", "+", "3", "4"], bpe.encode("12+34").tokens
    assert [t for t in bpe.encode("has 1234567890 pens").tokens if t.isdigit()] == list("1234567890")
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")  # no BOS, as Qwen2
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_model(tok: PreTrainedTokenizerFast, model_dir: Path, seed: int) -> int:
    """Save a fresh tiny Qwen2 and the tokenizer; return the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    # Save into a sibling folder and rename it in: `model/` is always whole or absent.
    tmp_dir = model_dir.with_name(f".{model_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tok.save_pretrained(tmp_dir)

    loaded_tok = AutoTokenizer.from_pretrained(tmp_dir)
    assert loaded_tok.chat_template == CHAT_TEMPLATE
    assert len(loaded_tok.encode("<|im_start|>", add_special_tokens=False)) == 1
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_dir, use_safetensors=True,
                                                        output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert not list(tmp_dir.glob("*.bin")) and not list(tmp_dir.glob("*.pt"))

    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp_dir, model_dir)
    return sum(p.numel() for p in model.parameters())


def build(out: str | Path, seed: int = 0, num_sft: int = 20000, num_pairs: int = 6000,
          num_eval: int = 500, num_prompts: int | None = None) -> dict:
    """Write the demo into `out` (unless a build with these arguments is there); return paths.

    `num_prompts=None` means one prompt per training operand pair."""
    out = Path(out)
    paths = {"model": out / "model", **{k: out / name for k, name in DATA_FILES.items()}}
    args = {"seed": seed, "num_sft": num_sft, "num_pairs": num_pairs,
            "num_prompts": num_prompts, "num_eval": num_eval}
    record = out / "build.json"
    if (record.exists() and json.loads(record.read_text()) == args
            and all(p.exists() for p in paths.values())):
        print(f"{out}: up to date (built with {args}); nothing to do")
        return paths

    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    record.unlink(missing_ok=True)  # a killed rebuild must not look complete
    rows = make_rows(random.Random(seed), num_sft, num_pairs, num_prompts, num_eval)
    for key in ("sft", "preference"):
        write_jsonl(paths[key], rows[key])
    for key in ("prompts", "eval"):
        write_parquet(paths[key], rows[key])

    generated = [r["question"] for k in ("prompts", "eval") for r in rows[k]]
    generated += [r["answer"] for k in ("prompts", "eval") for r in rows[k]]
    # Each turn after its role's name, as the chat template writes it: `user` and `assistant` become tokens.
    generated += [f"{m['role']}\n{m['content']}" for r in rows["sft"] for m in r["messages"]]
    generated += [r["rejected"][1]["content"] for r in rows["preference"]]
    tok = train_tokenizer(repo_docs() + generated)
    num_params = save_model(tok, paths["model"], seed)
    write_atomically(record, lambda tmp: tmp.write_text(json.dumps(args, indent=2) + "\n"))

    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}],
                                       tokenize=False, add_generation_prompt=True)
               for r in rows["prompts"]]
    demos = [r["messages"][1]["content"] for r in rows["sft"]]
    correct = sum(final_number(d) == sum(map(int, d.split(" = ")[0].split(" + "))) for d in demos)
    prompt_lens = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    demo_lens = [len(ids) + 1 for ids in tok(demos, add_special_tokens=False)["input_ids"]]
    print(f"{out}: built in {time.monotonic() - start:.1f}s")
    print("  rows: " + ", ".join(f"{k} {len(rows[k])}" for k in DATA_FILES))
    print(f"  vocab {len(tok)}, model parameters {num_params:,}")
    print(f"  mean tokens: rendered prompt {sum(prompt_lens) / max(len(prompt_lens), 1):.1f}, "
          f"demonstration + EOS {sum(demo_lens) / max(len(demo_lens), 1):.1f}")
    print(f"  correct SFT demonstrations: {correct / max(len(demos), 1):.3f}")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".alignflow/tiny-chat")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-sft", type=int, default=20000)
    parser.add_argument("--num-pairs", type=int, default=6000)
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="default: one per training operand pair")
    parser.add_argument("--num-eval", type=int, default=500)
    a = parser.parse_args()
    build(a.out, seed=a.seed, num_sft=a.num_sft, num_pairs=a.num_pairs, num_eval=a.num_eval,
          num_prompts=a.num_prompts)


if __name__ == "__main__":
    main()
