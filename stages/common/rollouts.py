"""The rollout table: one row per sampled response (DESIGN.md, 'Rollouts').

Columns are added, never renamed. `generate` writes ROLLOUT_SCHEMA; `score` adds
`ref_logprobs` (SCORED_SCHEMA) and, for PPO, `values` (PPO_SCORED_SCHEMA).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("sample_idx", pa.int32()),
    ("prompt", pa.string()),
    ("response", pa.string()),
    ("prompt_token_ids", pa.list_(pa.int32())),
    ("response_token_ids", pa.list_(pa.int32())),
    ("response_logprobs", pa.list_(pa.float32())),  # behaviour policy, per sampled token
    ("reward", pa.float32()),
    ("reward_info", pa.string()),  # JSON of reward components
    ("finish_reason", pa.string()),  # "stop" | "length"
    ("policy_key", pa.string()),
])
SCORED_SCHEMA = ROLLOUT_SCHEMA.append(pa.field("ref_logprobs", pa.list_(pa.float32())))
# PPO: the value model's V(state before each response token), from the value model of the round.
PPO_SCORED_SCHEMA = SCORED_SCHEMA.append(pa.field("values", pa.list_(pa.float32())))

ROW_GROUP_ROWS = 4096  # small enough to stream, large enough to compress well


class SchemaError(ValueError):
    pass


def write_table(rows: list[dict], path: str | Path, schema: pa.Schema = ROLLOUT_SCHEMA) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    validate(table, schema, str(path))
    pq.write_table(table, str(path), row_group_size=ROW_GROUP_ROWS, compression="zstd")


def read_tables(paths: list[Path], schema: pa.Schema = ROLLOUT_SCHEMA) -> pa.Table:
    tables = [pq.read_table(str(p)) for p in paths]
    for t, p in zip(tables, paths):
        validate(t, schema, str(p))
    return pa.concat_tables(tables, promote_options="none") if tables else schema.empty_table()


def validate(table: pa.Table, schema: pa.Schema, source: str) -> None:
    """Every schema column present with its type; per-token lists aligned with the tokens."""
    for f in schema:
        if f.name not in table.column_names:
            raise SchemaError(f"{source}: missing column {f.name!r}")
        if table.schema.field(f.name).type != f.type:
            raise SchemaError(f"{source}: column {f.name!r} is {table.schema.field(f.name).type}, expected {f.type}")
    lengths = pa.compute.list_value_length(table["response_token_ids"])
    for col in ("response_logprobs", "ref_logprobs", "values"):
        if col in table.column_names and not pa.compute.all(
            pa.compute.equal(pa.compute.list_value_length(table[col]), lengths)
        ).as_py():
            raise SchemaError(f"{source}: column {col!r} is not aligned with response_token_ids")
