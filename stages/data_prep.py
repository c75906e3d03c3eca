"""data_prep: the datasets every later stage reads, as Parquet, rendered into token ids.

Outputs (the `*_ids` columns: the token ids every later stage reads, stages/common/chat.py)
    sft.parquet         prompt, response, prompt_ids, response_ids         demonstrations
    pairs.parquet       prompt, chosen, rejected, prompt_ids, chosen_ids, rejected_ids
    rl_prompts.parquet  prompt_id, prompt, answer, prompt_ids              prompts for RL rounds
    eval.parquet        prompt_id, prompt, answer, prompt_ids              held out: never trained on
    tokenizer/          (tiny model only) a tokenizer trained on the rows
Metrics  num_{file}, {role}_dropped and {role}_truncated (rows over data.max_*_tokens), demo_accuracy

Synthetic (the default): two-digit addition, `07+45=` -> `052`, checked by exact match.
The demonstrator drops the units carry in a fraction of carry cases, so SFT learns a
systematic error that RL with the verifier can fix. Held-out prompts are operand pairs
that never appear in training.

Datasets (data.source: datasets): one dataset per role, read and checked by
stages/common/role_datasets.py; prompts rendered with the model's tokenizer and chat template.
"""

from __future__ import annotations

import json
import random
import re

import pyarrow as pa
import pyarrow.parquet as pq

from stages.common import runtime
from stages.common.chat import RenderError, fit, render_prompt, render_response, uses_template
from stages.common.params import DataPrepParams
from stages.common.role_datasets import load_role
from stages.common.data_config import DataConfig, SyntheticDataConfig
from stages.common.runtime import BadInput, StageContext, log

FILES = {"sft": "sft", "preference": "pairs", "prompts": "rl_prompts", "eval": "eval"}  # role -> file name
RESPONSES = {"sft": ("response",), "preference": ("chosen", "rejected"), "prompts": (), "eval": ()}


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
    return {"sft": sft, "preference": pairs, "prompts": rl, "eval": ev}


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


def render(role: str, rows: list[dict], tokenizer, chat: bool, data: DataConfig) -> tuple[list[dict], dict]:
    """The rows with their token ids (`prompt_ids`, `{response}_ids`), fitted to data.max_*_tokens:
    a row over either limit is dropped, or truncated, as data.overflow says; both are counted."""
    out, dropped, truncated = [], 0, 0
    for i, row in enumerate(rows):
        try:
            ids = {"prompt_ids": render_prompt(tokenizer, row["prompt"], chat)}
        except RenderError as err:
            raise BadInput(f"data.{role}: row {i}: {err}") from None
        ids |= {f"{k}_ids": render_response(tokenizer, row[k]) for k in RESPONSES[role]}
        limits = {k: data.max_prompt_tokens if k == "prompt_ids" else data.max_response_tokens for k in ids}
        over = [k for k, v in ids.items() if len(v) > limits[k]]
        if over and data.overflow == "drop":
            dropped += 1
            continue
        if over:
            truncated += 1
            ids = {k: fit(v, limits[k], "end" if k == "prompt_ids" else "start") for k, v in ids.items()}
        prompt = row["prompt"] if isinstance(row["prompt"], str) else json.dumps(row["prompt"])
        out.append(row | {"prompt": prompt} | ids)
    if not out:
        raise BadInput(f"data.{role}: none of its {len(rows)} rows fits data.max_prompt_tokens="
                       f"{data.max_prompt_tokens} and data.max_response_tokens={data.max_response_tokens}")
    return out, {f"{role}_dropped": dropped, f"{role}_truncated": truncated}


def tokenizer_for(ctx: StageContext[DataPrepParams], roles: dict[str, list[dict]]):
    """The model's tokenizer; the tiny model's is trained here, on the rows' text."""
    model = ctx.params.model
    if model.tiny is not None:
        from stages.common.models import train_char_tokenizer

        texts = [str(r["prompt"]) + r["response"] for r in roles["sft"]] + \
            [str(r["prompt"]) + r["answer"] for r in roles["eval"]]
        tokenizer = train_char_tokenizer(texts)
        tokenizer.save_pretrained(str(ctx.out_path("tokenizer")))
        ctx.save_dir("tokenizer")
        return tokenizer
    from stages.common.models import load_tokenizer

    return load_tokenizer(str(model.name_or_path), model.trust_remote_code)


def run(ctx: StageContext[DataPrepParams]) -> dict:
    p = ctx.params
    if not ctx.is_main:  # nothing to split: one rank writes everything
        return {}
    if p.data.source == "synthetic":
        roles = synthetic_addition(p.data.synthetic, p.seed)
    else:
        roles = {role: load_role(role, ds, p.data) for role, ds in p.data.datasets().items()}
    tokenizer = tokenizer_for(ctx, roles)
    try:
        chat = uses_template(tokenizer, p.model.chat_template, p.model.name_or_path or "model.tiny")
    except RenderError as err:
        raise BadInput(str(err)) from None
    ctx.first_step()
    metrics: dict = {"chat_template": chat}
    for role, rows in roles.items():
        table, counts = render(role, rows, tokenizer, chat, p.data)
        name = f"{FILES[role]}.parquet"
        pq.write_table(pa.Table.from_pylist(table), ctx.out_path(name))
        ctx.save(name)
        metrics |= counts | {f"num_{FILES[role]}": len(table)}
        if counts[f"{role}_dropped"] or counts[f"{role}_truncated"]:
            log(f"data_prep: data.{role}: {counts[f'{role}_dropped']} rows dropped, {counts[f'{role}_truncated']} "
                f"truncated (over data.max_prompt_tokens or data.max_response_tokens)")
    if "correct" in roles["sft"][0]:  # the synthetic demonstrator knows which of its answers are right
        metrics["demo_accuracy"] = sum(r["correct"] for r in roles["sft"]) / len(roles["sft"])
    log(f"data_prep: {', '.join(f'{k}={v}' for k, v in metrics.items())}")
    return metrics


if __name__ == "__main__":
    runtime.main(run, DataPrepParams)
