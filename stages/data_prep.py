"""data_prep: the datasets every later stage reads, as Parquet.

Outputs
    sft.parquet         prompt, response, correct      demonstrations (imperfect on purpose)
    pairs.parquet       prompt, chosen, rejected       preference pairs for the reward model
    rl_prompts.parquet  prompt_id, prompt, answer      prompts for RL rounds
    eval.parquet        prompt_id, prompt, answer      held out: never trained on
    tokenizer/          (tiny model only) a tokenizer trained on all of the above

Synthetic (the default): two-digit addition, `07+45=` -> `052`, checked by exact match.
The demonstrator drops the units carry in a fraction of carry cases, so SFT learns a
systematic error that RL with the verifier can fix. Held-out prompts are operand pairs
that never appear in training.

HF: any `datasets.load_dataset` source (hub name or local parquet/jsonl) with a column
mapping; pairs pair each demonstration with a copy whose final number is corrupted.
"""

from __future__ import annotations

import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common import runtime
from stages.common.params import DataPrepParams
from stages.common.sections import HFDataConfig, SyntheticDataConfig
from stages.common.runtime import BadInput, StageContext, log


def synthetic_addition(cfg: SyntheticDataConfig, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    operands = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(operands)
    if cfg.num_eval >= len(operands):
        raise BadInput(f"data.synthetic.num_eval={cfg.num_eval} leaves no training prompts (max {len(operands) - 1})")
    held_out, train = operands[: cfg.num_eval], operands[cfg.num_eval:]

    def prompt(a, b):
        return f"{a:02d}+{b:02d}="

    def answer(a, b):
        return f"{a + b:03d}"

    def teacher(a, b):
        carry = (a % 10) + (b % 10) >= 10
        if carry and rng.random() < cfg.teacher_carry_drop:
            return f"{a + b - 10:03d}"  # forgot to carry the one
        return answer(a, b)

    sft = []
    for _ in range(cfg.num_sft):
        a, b = rng.choice(train)
        response = teacher(a, b)
        sft.append({"prompt": prompt(a, b), "response": response, "correct": response == answer(a, b)})

    pairs = []
    for _ in range(cfg.num_pairs):
        a, b = rng.choice(train)
        good = answer(a, b)
        dropped = f"{a + b - 10:03d}"
        if (a % 10) + (b % 10) >= 10 and rng.random() < 0.5:
            bad = dropped  # the demonstrator's own mistake
        else:
            bad = corrupt_digit(good, rng)
        pairs.append({"prompt": prompt(a, b), "chosen": good, "rejected": bad})

    rl = [{"prompt_id": f"rl-{a:02d}-{b:02d}", "prompt": prompt(a, b), "answer": answer(a, b)} for a, b in train]
    ev = [{"prompt_id": f"eval-{a:02d}-{b:02d}", "prompt": prompt(a, b), "answer": answer(a, b)} for a, b in held_out]
    return {"sft": sft, "pairs": pairs, "rl_prompts": rl, "eval": ev}


def corrupt_digit(text: str, rng: random.Random) -> str:
    """Change one digit (the last number's, if any) so the answer becomes wrong."""
    spans = [m.span() for m in re.finditer(r"\d", text)]
    if not spans:
        return text + " 0"
    last_number = [s for s in spans if s[0] >= (spans[-1][0] - 8)]
    start, _ = rng.choice(last_number)
    digit = text[start]
    new = rng.choice([d for d in "0123456789" if d != digit])
    return text[:start] + new + text[start + 1:]


def check_local_source(cfg: HFDataConfig) -> None:
    """Before any job starts: a local dataset file must exist, have the mapped columns and rows."""
    path = cfg.path
    if not path.endswith((".parquet", ".jsonl", ".json")):
        return  # a hub dataset: checked by data_prep once downloaded
    import os

    if not os.path.isfile(path):
        raise BadInput(f"data.hf.path: file not found: {path}")
    if os.path.getsize(path) == 0:
        raise BadInput(f"data.hf.path: {path} has no rows")
    if path.endswith(".parquet"):
        meta = pq.ParquetFile(path).metadata
        columns, rows = meta.schema.names, meta.num_rows
    else:
        import pyarrow.json as pj

        table = pj.read_json(path)
        columns, rows = table.column_names, table.num_rows
    check_columns(cfg, columns)
    if rows == 0:
        raise BadInput(f"data.hf.path: {path} has no rows")


def check_columns(cfg: HFDataConfig, columns: list[str]) -> None:
    for col_key in ("prompt_column", "response_column", "answer_column"):
        if getattr(cfg, col_key) not in columns:
            raise BadInput(f"data.hf.{col_key}: column {getattr(cfg, col_key)!r} not in {cfg.path} (columns: {columns})")


def hf_dataset(cfg: HFDataConfig, seed: int) -> dict[str, list[dict]]:
    import datasets

    path = cfg.path
    check_local_source(cfg)
    local_format = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
    fmt = next((f for ext, f in local_format.items() if path.endswith(ext)), None)
    try:
        if fmt:
            ds = datasets.load_dataset(fmt, data_files={"train": path}, split="train")
            eval_ds = None
        else:
            ds = datasets.load_dataset(path, cfg.name, split=cfg.split)
            eval_ds = datasets.load_dataset(path, cfg.name, split=cfg.eval_split) if cfg.eval_split else None
    except FileNotFoundError as err:
        raise BadInput(f"data.hf.path: {err}") from None
    check_columns(cfg, ds.column_names)
    if len(ds) == 0:
        raise BadInput(f"data.hf.path: {path} has no rows")
    ds = ds.shuffle(seed=seed)
    if eval_ds is None:
        if len(ds) <= cfg.num_eval:
            raise BadInput(f"data.hf.num_eval={cfg.num_eval}: {path} has only {len(ds)} rows")
        eval_ds, ds = ds.select(range(cfg.num_eval)), ds.select(range(cfg.num_eval, len(ds)))
    rng = random.Random(seed)

    def fmt_prompt(row):
        return cfg.prompt_template.format(prompt=row[cfg.prompt_column])

    sft, pairs, rl = [], [], []
    for i, row in enumerate(ds):
        p, resp, ans = fmt_prompt(row), str(row[cfg.response_column]), str(row[cfg.answer_column])
        sft.append({"prompt": p, "response": resp, "correct": True})
        pairs.append({"prompt": p, "chosen": resp, "rejected": corrupt_digit(resp, rng)})
        rl.append({"prompt_id": f"rl-{i}", "prompt": p, "answer": ans})
    ev = [{"prompt_id": f"eval-{i}", "prompt": fmt_prompt(r), "answer": str(r[cfg.answer_column])}
          for i, r in enumerate(eval_ds)]
    return {"sft": sft, "pairs": pairs, "rl_prompts": rl, "eval": ev}


def run(ctx: StageContext[DataPrepParams]) -> dict:
    p = ctx.params
    if not ctx.is_main:  # nothing to split: one rank writes everything
        return {}
    if p.data.source == "synthetic":
        tables = synthetic_addition(p.data.synthetic, p.seed)
    else:
        assert p.data.hf is not None  # DataConfig requires the section with source: hf
        tables = hf_dataset(p.data.hf, p.seed)
    for name, rows in tables.items():
        if not rows:
            raise BadInput(f"data_prep: the {name} split is empty")
        pq.write_table(pa.Table.from_pylist(rows), ctx.out_path(f"{name}.parquet"))
        ctx.save(f"{name}.parquet")
    if p.model.tiny is not None:
        from stages.common.models import train_char_tokenizer

        texts = [r["prompt"] + r["response"] for r in tables["sft"]] + [r["prompt"] + r["answer"] for r in tables["eval"]]
        train_char_tokenizer(texts).save_pretrained(str(ctx.out_path("tokenizer")))
        ctx.save_dir("tokenizer")
    sft_acc = sum(r["correct"] for r in tables["sft"]) / len(tables["sft"])
    log(f"data_prep: {', '.join(f'{k}={len(v)}' for k, v in tables.items())}; demonstrations correct {sft_acc:.1%}")
    return {f"num_{k}": len(v) for k, v in tables.items()} | {"demo_accuracy": sft_acc}


if __name__ == "__main__":
    runtime.main(run, DataPrepParams)
