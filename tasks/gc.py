"""Retention: what the store may forget.

    run records   each finished pipeline run writes {root}/{pipeline}/_runs/<time>-<flow run>.json,
                  the outputs it used
    kept          what the last N runs used; every registered model version's lineage (the champion's
                  included: its source, its manifests' inputs, the keys in its lineage tags); outputs
                  written recently (a run in progress, or a failed one waiting for its retry)
    deleted       every other output: its manifest first (so it no longer exists), then its files,
                  each under its lease (an output whose lease is held is never touched)

A dry run unless `delete=True`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import posixpath
import time
from dataclasses import dataclass, field

from stages.common import store
from tasks import lease
from tasks import tracking as mlf
from tasks.config import PipelineConfig
from tasks.promotion.registry import checkpoint_uri

RUNS = "_runs"


def pipeline_root(cfg: PipelineConfig) -> str:
    return store.join(cfg.storage_root(), cfg.pipeline)


def record_run(cfg: PipelineConfig, flow_run_id: str, used: list) -> str:
    """Write the run record of a finished run: the URIs of the outputs (StageResults) it used."""
    now = dt.datetime.now(dt.timezone.utc)
    uri = store.join(pipeline_root(cfg), RUNS, f"{now:%Y%m%dT%H%M%S%fZ}-{flow_run_id}.json")
    store.write_json(uri, {"flow_run_id": flow_run_id, "finished_at": now.isoformat(),
                           "outputs": sorted({r.uri for r in used})}, cfg.storage_options())
    return uri


@dataclass
class Output:
    uri: str
    key: str
    size: int
    modified: float  # newest object, seconds since the epoch


@dataclass
class Plan:
    kept: dict[str, str] = field(default_factory=dict)  # uri -> why
    deleted: list[Output] = field(default_factory=list)  # what goes (or would go, in a dry run)
    skipped_leased: list[str] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(o.size for o in self.deleted)


def _modified(info: dict) -> float:
    stamp = info.get("LastModified", info.get("mtime", 0.0))
    return stamp.timestamp() if isinstance(stamp, dt.datetime) else float(stamp)


def list_outputs(cfg: PipelineConfig) -> dict[str, Output]:
    """Every stage output folder `{root}/{pipeline}/{stage}/{key}` in the store, by URI."""
    root = pipeline_root(cfg)
    fs, base = store.filesystem(root, cfg.storage_options())
    outputs: dict[str, Output] = {}
    for path, info in fs.find(base, detail=True).items():
        parts = posixpath.relpath(path, base).split("/")
        if len(parts) < 3 or parts[0] == RUNS:
            continue
        uri = store.join(root, parts[0], parts[1])
        out = outputs.setdefault(uri, Output(uri, parts[1], 0, 0.0))
        out.size += info.get("size") or 0
        out.modified = max(out.modified, _modified(info))
    return outputs


def _lineage(uris: set[str], opts: dict) -> set[str]:
    """`uris` and every output they descend from, through the manifests' inputs."""
    seen, todo = set(), list(uris)
    while todo:
        uri = todo.pop()
        if uri in seen:
            continue
        seen.add(uri)
        art = store.try_read_artifact(uri, opts)
        if art is not None:
            todo += [ref["uri"] for ref in art.manifest.get("inputs", {}).values()]
    return seen


def _output_of(uri: str, outputs: dict[str, Output]) -> str | None:
    for out in outputs:
        if uri == out or uri.startswith(out + "/"):
            return out
    return None


def registered_lineage(cfg: PipelineConfig, outputs: dict[str, Output]) -> dict[str, str]:
    """Outputs every registered version of the config's model needs: uri -> which version."""
    c = mlf.client(cfg.tracking_uri())
    name = cfg.tracking.registered_model
    opts = cfg.storage_options()
    if not c.search_registered_models(f"name = '{name}'"):
        return {}
    champion = str(getattr(c.get_registered_model(name), "aliases", {}).get("champion", ""))
    kept: dict[str, str] = {}
    for mv in c.search_model_versions(f"name = '{name}'"):
        why = f"model version {mv.version}" + (" (champion)" if str(mv.version) == champion else "")
        checkpoint = checkpoint_uri(mv)  # in the store (the version's source is its MLflow model)
        refs = {checkpoint} | {v for k, v in mv.tags.items() if k.endswith("_uri")}
        roots = {o for o in (_output_of(r, outputs) for r in refs) if o}
        source = _output_of(checkpoint, outputs)
        if str(mv.version) == champion and (source is None or store.try_read_artifact(source, opts) is None):
            raise RuntimeError(f"{name} v{mv.version} (champion): its checkpoint {checkpoint} has no readable "
                               "manifest; refusing to collect without its lineage")
        keys = {k for tag, v in mv.tags.items() if tag.startswith("lineage.") or tag.endswith("_key")
                for k in v.split(",")}
        for uri in _lineage(roots, opts) | {o for o, out in outputs.items() if out.key in keys}:
            kept.setdefault(uri, why)
    return kept


def recent_runs_lineage(cfg: PipelineConfig, keep_last: int) -> dict[str, str]:
    fs, base = store.filesystem(store.join(pipeline_root(cfg), RUNS), cfg.storage_options())
    records = sorted(p for p in (fs.find(base) if fs.exists(base) else []) if p.endswith(".json"))
    kept: dict[str, str] = {}
    for path in records[len(records) - keep_last:] if keep_last else []:
        record = store.read_json(fs.unstrip_protocol(path), cfg.storage_options())
        for uri in _lineage(set(record["outputs"]), cfg.storage_options()):
            kept.setdefault(uri, f"run {record['flow_run_id']}")
    return kept


def collect(cfg: PipelineConfig, keep_last: int, delete: bool = False, min_age_s: float = 24 * 3600) -> Plan:
    """Plan (and with `delete`, carry out) the removal of what nothing keeps."""
    opts = cfg.storage_options()
    outputs = list_outputs(cfg)
    kept = {**registered_lineage(cfg, outputs), **recent_runs_lineage(cfg, keep_last)}
    plan = Plan()
    for uri, out in sorted(outputs.items()):
        if uri in kept:
            plan.kept[uri] = kept[uri]
        elif out.modified > time.time() - min_age_s:
            plan.kept[uri] = "recent"
        elif not delete:
            held = lease.lease_object(uri, opts).read()
            if held and not lease.holder_is_gone(held[0]):
                plan.skipped_leased.append(uri)
            else:
                plan.deleted.append(out)
        elif _delete_under_lease(uri, opts):
            plan.deleted.append(out)
        else:
            plan.skipped_leased.append(uri)
    return plan


def _delete_under_lease(uri: str, opts: dict) -> bool:
    """Delete an output while holding its lease (no writer can start meanwhile); False if one holds it."""
    held = lease.acquire(uri, opts, lease.owner(flow_run="gc"), wait=False)
    if held is None:
        return False
    fs, base = store.filesystem(uri, opts)
    with held:
        with_manifest = posixpath.join(base, store.MANIFEST)
        if fs.exists(with_manifest):
            fs.rm(with_manifest)  # first: from here on the output does not exist
        for path in fs.find(base):
            if not path.endswith("/" + lease.LEASE):
                fs.rm(path)
    if isinstance(fs, type(store.LOCAL_FS)):
        with contextlib.suppress(OSError):  # only if empty: a writer may have started since
            os.rmdir(base)
    return True
