"""One dataset per role (data.sft, data.preference, data.prompts, data.eval): read, select, normalise.

Every role's rows become one form, whatever the dataset's own:
    sft         {prompt, response}            from prompt + response columns, or a messages column
    preference  {prompt, chosen, rejected}    text with a prompt column; message lists (UltraFeedback-
                                              binarized); or HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant: ..." text
    prompts     {prompt_id, prompt, answer}   answer: what the verifier checks (GSM8K: '... #### 42')
    eval        {prompt_id, prompt, answer}
A prompt is a text (the user's turn, through data.prompt_template) or the list of turns before the
assistant's. Bad rows raise BadInput naming the dataset, the row and the column. The flow runs the same
checks on local files before any job starts (check_local_datasets); hub datasets are checked in data_prep.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from .chat import Prompt, RenderError, split_conversation
from .runtime import BadInput
from .data_config import DataConfig, DatasetConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def local_path(ds: DatasetConfig) -> Path:
    path = Path(ds.path)
    return path if path.is_absolute() else PROJECT_ROOT / path  # jobs run in the repository root


def read_rows(ds: DatasetConfig, role: str) -> list[dict]:
    """All rows of the split, through `datasets.load_dataset` (a hub name, or a local file's builder)."""
    import datasets

    try:
        if ds.is_local:
            check_file(ds, role)
            builder = "parquet" if ds.path.endswith(".parquet") else "json"
            loaded = datasets.load_dataset(builder, data_files={"train": str(local_path(ds))}, split="train")
        else:
            loaded = datasets.load_dataset(ds.path, ds.name, split=ds.split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        raise BadInput(f"data.{role} ({ds.path}): {err}") from None
    return loaded.to_list()


def read_local_rows(ds: DatasetConfig, role: str) -> list[dict]:
    """A local file's rows with pyarrow alone: the flow's check, without importing `datasets`."""
    check_file(ds, role)
    path = local_path(ds)
    try:
        if ds.path.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        if ds.path.endswith(".jsonl"):
            import pyarrow.json as pj

            return pj.read_json(path).to_pylist()
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"data.{role} ({ds.path}): cannot be read: {err}") from None
    if not isinstance(rows, list):
        raise BadInput(f"data.{role} ({ds.path}): a .json dataset must be a list of rows")
    return rows


def check_file(ds: DatasetConfig, role: str) -> None:
    path = local_path(ds)
    if not path.is_file():
        raise BadInput(f"data.{role}.path: file not found: {ds.path}")
    if os.path.getsize(path) == 0:
        raise BadInput(f"data.{role} ({ds.path}): the file is empty")


def select(rows: list[dict], ds: DatasetConfig) -> list[dict]:
    """The rows a role uses: a seeded shuffle (the same here and in the flow's check), then `limit`."""
    rows = list(rows)
    if ds.shuffle_seed is not None:
        random.Random(ds.shuffle_seed).shuffle(rows)
    return rows[: ds.limit] if ds.limit else rows


def normalize(role: str, rows: list[dict], ds: DatasetConfig, data: DataConfig) -> list[dict]:
    """The role's rows in its one form (module docstring); BadInput names the dataset, row and column."""
    where = f"data.{role} ({ds.path}{'' if ds.is_local else f', split {ds.split}'})"
    if not rows:
        raise BadInput(f"{where}: no rows")
    available = list(rows[0])
    column = {field: ds.columns.get(field, field) for field in ("prompt", "response", "messages", "chosen",
                                                                 "rejected", "answer")}

    def need(*fields: str) -> None:
        for field in fields:
            if column[field] not in available:
                mapped = f" (data.{role}.columns.{field})" if field in ds.columns else ""
                raise BadInput(f"{where}: no column {column[field]!r}{mapped}; its columns are {available}")

    def text_prompt(value) -> Prompt:
        if isinstance(value, str):
            return data.prompt_template.format(prompt=value)
        if isinstance(value, list):
            return value  # turns: the template wraps text prompts only
        raise ValueError(f"column {column['prompt']!r} is {type(value).__name__}, not text or a message list")

    out: list[dict] = []
    prompt: Prompt
    for i, row in enumerate(rows):
        try:
            if role == "sft":
                use_messages = "messages" in ds.columns or ("prompt" not in ds.columns and
                                                            column["messages"] in available)
                if use_messages:
                    need("messages")
                    prompt, response = split_conversation(row[column["messages"]] or [])
                else:
                    need("prompt", "response")
                    prompt, response = text_prompt(row[column["prompt"]]), str(row[column["response"]])
                out.append({"prompt": prompt, "response": response})
            elif role == "preference":
                need("chosen", "rejected")
                chosen, rejected = row[column["chosen"]], row[column["rejected"]]
                if isinstance(chosen, str) and column["prompt"] not in available:
                    chosen, rejected = hh_turns(chosen), hh_turns(rejected)  # HH-RLHF: the prompt is inside
                if isinstance(chosen, list):
                    (prompt, chosen), (other_prompt, rejected) = split_conversation(chosen), split_conversation(rejected)
                    if prompt != other_prompt:
                        raise ValueError("chosen and rejected continue different conversations")
                else:
                    need("prompt")
                    prompt = text_prompt(row[column["prompt"]])
                if chosen == rejected:
                    raise ValueError(f"chosen equals rejected ({str(chosen)[:60]!r}): the pair prefers nothing")
                out.append({"prompt": prompt, "chosen": str(chosen), "rejected": str(rejected)})
            else:
                need("prompt", "answer")
                answer = row[column["answer"]]
                if answer is None or str(answer).strip() == "":
                    raise ValueError(f"column {column['answer']!r} is empty")
                out.append({"prompt_id": f"{'rl' if role == 'prompts' else 'eval'}-{i}",
                            "prompt": text_prompt(row[column["prompt"]]), "answer": str(answer)})
        except (RenderError, ValueError, TypeError, KeyError) as err:
            raise BadInput(f"{where}: row {i}: {err}") from None
    return out


def hh_turns(text: str) -> list[dict]:
    """HH-RLHF's '\\n\\nHuman: ...\\n\\nAssistant: ...' text as message turns."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"not HH-RLHF text ('\\n\\nHuman: ... \\n\\nAssistant: ...'): {text[:60]!r}")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def load_role(role: str, ds: DatasetConfig, data: DataConfig, local_only: bool = False) -> list[dict]:
    rows = read_local_rows(ds, role) if local_only else read_rows(ds, role)
    return normalize(role, select(rows, ds), ds, data)


def check_local_datasets(data: DataConfig) -> None:
    """Before any job starts: each local dataset reads, has its columns, and every row it uses is well formed."""
    for role, ds in data.datasets().items():
        if ds.is_local:
            load_role(role, ds, data, local_only=True)
