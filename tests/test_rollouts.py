"""The rollout Parquet schema: written and validated per DESIGN.md."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.common.rollouts import ROLLOUT_SCHEMA, SCORED_SCHEMA, SchemaError, read_tables, write_table


def row(i=0, n_tokens=3, **extra):
    r = {"prompt_id": f"p{i}", "sample_idx": i, "prompt": "01+02=", "response": "003",
         "prompt_token_ids": [1, 5, 6], "response_token_ids": list(range(n_tokens)),
         "response_logprobs": [-0.5] * n_tokens, "reward": 1.0, "reward_info": '{"verifier": 1.0}',
         "finish_reason": "stop", "policy_key": "abc"}
    r.update(extra)
    return r


def test_schema_columns_and_types():
    names = ROLLOUT_SCHEMA.names
    assert names[:7] == ["prompt_id", "sample_idx", "prompt", "response", "prompt_token_ids",
                         "response_token_ids", "response_logprobs"]
    assert ROLLOUT_SCHEMA.field("sample_idx").type == pa.int32()
    assert ROLLOUT_SCHEMA.field("response_logprobs").type == pa.list_(pa.float32())
    assert ROLLOUT_SCHEMA.field("reward").type == pa.float32()
    # scoring adds, never renames
    assert SCORED_SCHEMA.names[: len(names)] == names and "ref_logprobs" in SCORED_SCHEMA.names


def test_roundtrip(tmp_path):
    rows = [row(i, n_tokens=i + 1) for i in range(5)]
    write_table(rows, tmp_path / "a.parquet")
    table = read_tables([tmp_path / "a.parquet"])
    assert table.num_rows == 5
    assert table.schema.equals(ROLLOUT_SCHEMA)
    assert table.column("response_token_ids").to_pylist()[4] == [0, 1, 2, 3, 4]


def test_misaligned_logprobs_rejected(tmp_path):
    with pytest.raises(SchemaError, match="response_logprobs.*not aligned"):
        write_table([row(0, response_logprobs=[-1.0])], tmp_path / "bad.parquet")


def test_missing_or_mistyped_column_named(tmp_path):
    good = pa.Table.from_pylist([row()], schema=ROLLOUT_SCHEMA)
    pq.write_table(good.drop(["policy_key"]), tmp_path / "m.parquet")
    with pytest.raises(SchemaError, match="missing column 'policy_key'"):
        read_tables([tmp_path / "m.parquet"])
    mistyped = good.set_column(1, "sample_idx", pa.array([0], pa.int64()))
    pq.write_table(mistyped, tmp_path / "t.parquet")
    with pytest.raises(SchemaError, match="t.parquet: column 'sample_idx' is int64"):
        read_tables([tmp_path / "t.parquet"])
