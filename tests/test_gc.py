"""Retention (`alignflow gc`) on file:// and s3://: a store of four runs' outputs, two registered
versions (the oldest the champion), an orphan and a leased output.

    run1  data -> sft1 -> upd1   registered v1, champion
    run2  data -> sft2 -> upd2   registered v2
    run3  data -> sft3 -> upd3
    run4  data -> sft4 -> upd4   the last run
"""

from __future__ import annotations

import time

import pytest
import yaml

from flows.cli import main as cli
from stages.common import store
from tasks import gc, lease
from tasks import tracking as mlf
from tasks.config import parse_config
from tasks.stage import StageResult
from tests.conftest import small_config


@pytest.fixture(params=["file", "s3"])
def cfg(request, tmp_path):
    if request.param == "file":
        overrides = {"storage.root": "file://" + str(tmp_path / "store")}
    else:
        s3 = request.getfixturevalue("s3_server")
        overrides = {"storage.root": f"s3://{s3.bucket()}/runs", "storage.s3_endpoint_url": s3.endpoint}
    data = small_config(tmp_path, **overrides)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    return parse_config(data)


def make_output(cfg, tmp_path, stage: str, key: str, inputs: dict[str, store.Artifact],
                manifest: bool = True) -> str:
    uri = store.join(gc.pipeline_root(cfg), stage, key)
    local = tmp_path / "local" / stage / key / "checkpoint" / "model.safetensors"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(key.encode() * 100)
    entry = store.upload(local, uri, "checkpoint/model.safetensors", cfg.storage_options())
    if manifest:
        store.write_manifest(uri, stage=stage, key=key, code="c", params={}, metrics={}, files=[entry],
                             inputs={n: {"uri": a.uri, "digest": a.digest} for n, a in inputs.items()},
                             storage_options=cfg.storage_options())
    return uri


def exists(cfg, uri: str) -> bool:
    fs, base = store.filesystem(uri, cfg.storage_options())
    fs.invalidate_cache()
    return bool([p for p in fs.find(base) if not p.endswith(lease.LEASE)])


@pytest.fixture
def populated(cfg, tmp_path):
    opts = cfg.storage_options()
    art = lambda uri: store.read_artifact(uri, opts)  # noqa: E731
    data = art(make_output(cfg, tmp_path, "data_prep", "data", {}))
    tracking = mlf.start_pipeline_run(cfg, "gc-test", "gc", 1)
    runs = {}
    for i in range(1, 5):
        sft = art(make_output(cfg, tmp_path, "sft", f"sft{i}", {"data": data}))
        upd = art(make_output(cfg, tmp_path, "update", f"upd{i}", {"policy": sft, "data": data}))
        gc.record_run(cfg, f"run{i}", [StageResult(a, True) for a in (data, sft, upd)])
        runs[i] = (sft.uri, upd.uri)
        time.sleep(0.01)  # run records sort by time
        if i <= 2:
            _, version = mlf.register_policy(cfg, tracking, upd, lineage={"pipeline": cfg.pipeline})
            if i == 1:
                mlf.client(tracking.uri).set_registered_model_alias(cfg.tracking.registered_model, "champion",
                                                                    version)
    orphan = make_output(cfg, tmp_path, "sft", "orphan", {"data": data}, manifest=False)  # a crashed attempt's
    leased = make_output(cfg, tmp_path, "sft", "leased", {"data": data})
    holder = lease.acquire(leased, opts, lease.owner(flow_run="writer"), ttl_s=60)
    yield {"data": data.uri, "runs": runs, "orphan": orphan, "leased": leased}
    holder.release()


def test_gc_keeps_recent_runs_registered_lineage_and_leased(cfg, populated, tmp_path, capsys):
    runs = populated["runs"]
    garbage = {*runs[3], populated["orphan"]}
    kept = {populated["data"], *runs[1], *runs[2], *runs[4]}

    plan = gc.collect(cfg, keep_last=1, min_age_s=0)  # a dry run
    assert {o.uri for o in plan.deleted} == garbage
    assert plan.skipped_leased == [populated["leased"]]
    assert set(plan.kept) == kept
    assert plan.kept[runs[1][1]] == "model version 1 (champion)" and plan.kept[runs[4][1]] == "run run4"
    assert all(exists(cfg, u) for u in garbage | kept)  # nothing deleted yet

    assert cli(["gc", str(tmp_path / "config.yaml"), "--keep-last", "1"]) == 0  # the CLI's default: dry run,
    assert "0 would delete" in capsys.readouterr().out  # and nothing is older than a day here

    plan = gc.collect(cfg, keep_last=1, delete=True, min_age_s=0)
    assert {o.uri for o in plan.deleted} == garbage and plan.bytes_freed > 0
    assert not any(exists(cfg, u) for u in garbage)
    for uri in kept - {populated["orphan"]}:  # whole, hashes checked
        store.verify_files(store.read_artifact(uri, cfg.storage_options()), cfg.storage_options())
    assert exists(cfg, populated["leased"])  # its lease is held


def test_gc_keep_last_zero_still_keeps_the_registered_lineage(cfg, populated):
    plan = gc.collect(cfg, keep_last=0, delete=True, min_age_s=0)
    runs = populated["runs"]
    assert {o.uri for o in plan.deleted} == {*runs[3], *runs[4], populated["orphan"]}
    champion = store.read_artifact(runs[1][1], cfg.storage_options())
    store.verify_files(champion, cfg.storage_options())
    for ref in champion.manifest["inputs"].values():  # the champion's lineage, whole
        store.verify_files(store.read_artifact(ref["uri"], cfg.storage_options()), cfg.storage_options())


def test_gc_refuses_without_the_champions_lineage(cfg, populated):
    store.remove_manifest(populated["runs"][1][1], cfg.storage_options())  # the champion's manifest is gone
    with pytest.raises(RuntimeError, match="champion"):
        gc.collect(cfg, keep_last=1, delete=True, min_age_s=0)
    assert all(exists(cfg, u) for u in populated["runs"][3])
