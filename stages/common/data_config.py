"""The `data` section: the synthetic task, or one dataset per role (pydantic, torch-free).

stages/common/role_datasets.py reads the datasets; stages/data_prep.py renders them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .sections import Strict


class SyntheticDataConfig(Strict):
    """Two-digit addition with zero-padded operands: `07+45=` -> `052`.

    The demonstrator drops the units carry in `teacher_carry_drop` of carry cases, so about
    29% of SFT demonstrations are wrong in a systematic way that RL can fix.
    """

    num_sft: int = Field(20000, ge=1)
    num_pairs: int = Field(6000, ge=1)
    num_eval: int = Field(1000, ge=1)
    teacher_carry_drop: float = Field(0.65, ge=0, le=1)


Role = Literal["sft", "preference", "prompts", "eval"]
ROLES: tuple[Role, ...] = ("sft", "preference", "prompts", "eval")
# The fields each role reads, by the names of `columns`' keys (stages/common/role_datasets.py's forms).
ROLE_FIELDS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "response", "messages"),  # prompt + response, or messages (chat turns)
    "preference": ("prompt", "chosen", "rejected"),  # text, or message lists (no prompt needed)
    "prompts": ("prompt", "answer"),  # answer: what the verifier checks
    "eval": ("prompt", "answer"),
}


class DatasetConfig(Strict):
    """One role's dataset: a Hugging Face hub name (with `name` and `split`), or a local .parquet, .jsonl
    or .json file (a relative path is taken from the repository root)."""

    path: str
    name: str | None = None  # the hub dataset's config name (gsm8k: main)
    split: str = "train"
    # The role's field -> the dataset's column, for fields whose column has another name ({prompt: question}).
    columns: dict[str, str] = {}
    limit: int | None = Field(None, ge=1)  # keep the first `limit` rows after the shuffle
    shuffle_seed: int | None = 0  # None: keep the dataset's order

    @property
    def is_local(self) -> bool:
        return self.path.endswith((".parquet", ".jsonl", ".json"))


class DataConfig(Strict):
    """Where each role's rows come from: the synthetic task fills all four, or `source: datasets` reads
    one dataset per role (stages/data_prep.py)."""

    source: Literal["synthetic", "datasets"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    sft: DatasetConfig | None = None  # demonstrations
    preference: DatasetConfig | None = None  # chosen / rejected pairs for the reward model and DPO
    prompts: DatasetConfig | None = None  # RL prompts with the answers the verifier checks
    eval: DatasetConfig | None = None  # held-out prompts and answers
    prompt_template: str = "{prompt}"  # wraps a text prompt (the user's turn) before the chat template
    verifier: Literal["exact", "numeric"] = "numeric"  # datasets only: the synthetic task is exact match
    # Rendered lengths in tokens (chat template included); a longer row is dropped, or truncated
    # (a prompt keeps its end, a response its start). data_prep's metrics count both, per role.
    max_prompt_tokens: int = Field(512, ge=1)
    max_response_tokens: int = Field(512, ge=1)
    overflow: Literal["drop", "truncate"] = "drop"

    def datasets(self) -> dict[str, DatasetConfig]:
        return {role: ds for role in ROLES if (ds := getattr(self, role)) is not None}

    @model_validator(mode="after")
    def _roles_match_source(self):
        roles = self.datasets()
        if self.source == "datasets":
            missing = [f"data.{r}" for r in ROLES if r not in roles]
            if missing:
                raise ValueError(f"data.source is 'datasets': set {', '.join(missing)} (one dataset per role)")
        elif roles:
            raise ValueError(f"{', '.join(f'data.{r}' for r in roles)} set, but data.source is 'synthetic': "
                             "set data.source: datasets to read them")
        for role, ds in roles.items():
            unknown = sorted(set(ds.columns) - set(ROLE_FIELDS[role]))
            if unknown:
                raise ValueError(f"data.{role}.columns: unknown field {unknown[0]!r} (the {role} role reads "
                                 f"{', '.join(ROLE_FIELDS[role])})")
        return self
