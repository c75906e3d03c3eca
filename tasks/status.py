"""`alignflow status [CONFIG]`: what the store holds for a config, and what a run would launch next.

It walks the pipeline's own chain (flows/alignment.py `chain`) and, instead of running each stage,
looks its key up in the store. A stage whose inputs are not all valid yet has no key: it waits.
"""

from __future__ import annotations

import dataclasses

from stages.common import store
from tasks.config import PipelineConfig
from tasks.spec import stage_spec
from tasks.stage import StageResult, find_valid_output

VALID, MISSING, INVALID, WAITING = "valid", "missing", "invalid", "waiting"


@dataclasses.dataclass(frozen=True)
class Entry:
    label: str  # "sft", "update[0]", ...
    state: str  # valid | missing | invalid | waiting (an input is not valid yet, so no key)
    key: str | None
    uri: str | None
    size: int | None  # bytes of the output files, from the manifest
    why: str = ""  # what is wrong with an invalid output, or what a waiting stage waits for


@dataclasses.dataclass(frozen=True)
class Pending:
    """Stands in for a stage's result that is not in the store yet."""
    label: str


def survey(cfg: PipelineConfig, rounds: int | None = None) -> list[Entry]:
    from flows.alignment import chain

    opts, entries = cfg.storage_options(), []

    def look(stage: str, inputs: dict[str, StageResult | Pending], round_idx: int | None = None,
             label: str = "") -> StageResult | Pending:
        name = stage + label
        if pending := list(dict.fromkeys(r.label for r in inputs.values() if isinstance(r, Pending))):
            entries.append(Entry(name, WAITING, None, None, None, "after " + ", ".join(pending)))
            return Pending(name)
        spec = stage_spec(stage, cfg, {n: r.artifact for n, r in inputs.items()}, round_idx)
        art = find_valid_output(spec.output, opts)
        if art is not None:
            entries.append(Entry(name, VALID, spec.key, spec.output, sum(f["size"] for f in art.manifest["files"])))
            return StageResult(art, launched=False)
        fs, base = store.filesystem(spec.output, opts)
        if not fs.exists(f"{base}/{store.MANIFEST}"):
            entries.append(Entry(name, MISSING, spec.key, spec.output, None))
            return Pending(name)
        try:  # a manifest whose files do not match it: which file, and how
            store.verify_files(store.read_artifact(spec.output, opts), opts)
            why = "its files changed while they were checked"
        except store.ArtifactError as err:
            why = str(err)
        entries.append(Entry(name, INVALID, spec.key, spec.output, None, why))
        return Pending(name)

    chain(cfg, cfg.rl_rounds(rounds), look)
    return entries


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def render(cfg: PipelineConfig, entries: list[Entry]) -> str:
    width = max(len(e.label) for e in entries)
    lines = [f"pipeline {cfg.pipeline}, store {cfg.storage_root()}", "",
             f"{'stage'.ljust(width)}  {'state':8} {'size':>9}  key               output / why"]
    for e in entries:
        where = e.why if e.state in (INVALID, WAITING) else e.uri
        lines.append(f"{e.label.ljust(width)}  {e.state:8} {_size(e.size):>9}  {e.key or '-':16}  {where}")
    todo = [e for e in entries if e.state != VALID]
    first = [e.label for e in todo if e.state != WAITING]
    lines += ["", f"a run now would launch {len(todo)} stage(s) and skip {len(entries) - len(todo)}"
              + (f", starting with {', '.join(first)}" if first else "")]
    return "\n".join(lines)
