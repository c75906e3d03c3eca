"""Artifact store: content-addressed keys, manifests written last, checked reads; file:// and s3://."""

import json

import pytest

from stages.common import store
from tasks import spec as keys
from stages.common.store import ArtifactError


def test_key_is_deterministic_and_sensitive():
    base = dict(stage="sft", params={"lr": 1e-3, "steps": 10}, input_digests={"data": "abc"}, code="v1")
    key = keys.compute_key(**base)
    assert key == keys.compute_key(**{**base, "params": {"steps": 10, "lr": 1e-3}})  # order-free
    assert len(key) == 16
    for change in ({"stage": "reward_model"}, {"params": {"lr": 2e-3, "steps": 10}},
                   {"input_digests": {"data": "abd"}}, {"code": "v2"}):
        assert keys.compute_key(**{**base, **change}) != key


def test_code_version_covers_what_the_stage_imports():
    assert keys.code_version("sft") != keys.code_version("update")
    assert keys.code_version("sft") == keys.code_version("sft")
    names = lambda stage: {p.relative_to(keys.STAGES_DIR).as_posix() for p in keys.stage_code_files(stage)}
    # transitively: runtime imports store
    assert {"data_prep.py", "common/runtime.py", "common/store.py"} <= names("data_prep")
    assert {"common/losses.py", "common/engine.py", "common/models.py"} <= names("update")
    # a change to the RL losses does not invalidate data preparation
    assert "common/losses.py" not in names("data_prep") and "common/engine.py" not in names("data_prep")


def _write_artifact(root: str, opts: dict, tmp_path, files: dict[str, bytes]) -> store.Artifact:
    out = store.join(root, "pipe", "stage", "k1")
    entries = []
    for rel, data in files.items():
        local = tmp_path / "local" / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(data)
        entries.append(store.upload(local, out, rel, opts))
    store.write_manifest(out, stage="stage", key="k1", inputs={}, files=entries, params={"a": 1}, code="c",
                         metrics={"loss": 0.5}, storage_options=opts)
    return store.read_artifact(out, opts)


@pytest.fixture(params=["file", "s3"])
def root(request, tmp_path):
    if request.param == "file":
        return store.join("file://" + str(tmp_path / "store")), {}
    s3 = request.getfixturevalue("s3_server")
    return f"s3://{s3.bucket()}/prefix", {"client_kwargs": {"endpoint_url": s3.endpoint}}


def test_roundtrip_and_manifest_fields(root, tmp_path):
    uri, opts = root
    art = _write_artifact(uri, opts, tmp_path, {"a.txt": b"hello", "dir/b.bin": b"\x00" * 1000})
    m = art.manifest
    assert m["stage"] == "stage" and m["key"] == "k1" and m["metrics"] == {"loss": 0.5}
    assert {f["path"] for f in m["files"]} == {"a.txt", "dir/b.bin"}
    assert art.file("dir/b.bin").size == 1000
    got = store.download_dir(art, "dir", tmp_path / "dl", opts)
    assert (got / "b.bin").read_bytes() == b"\x00" * 1000
    # The digest identifies content, not the time it was written.
    again = _write_artifact(uri, opts, tmp_path, {"a.txt": b"hello", "dir/b.bin": b"\x00" * 1000})
    assert again.digest == art.digest
    assert _write_artifact(uri, opts, tmp_path, {"a.txt": b"hellO", "dir/b.bin": b"\x00" * 1000}).digest != art.digest


def test_no_manifest_means_no_artifact(root, tmp_path):
    uri, opts = root
    out = store.join(uri, "pipe", "stage", "k2")
    local = tmp_path / "x"
    local.write_bytes(b"partial")
    store.upload(local, out, "x", opts)  # the job died before its manifest
    assert store.try_read_artifact(out, opts) is None
    with pytest.raises(ArtifactError, match="no manifest"):
        store.read_artifact(out, opts)


def test_truncated_file_is_named(root, tmp_path):
    uri, opts = root
    art = _write_artifact(uri, opts, tmp_path, {"model.safetensors": b"w" * 4096})
    fs, base = store.filesystem(art.uri, opts)
    fs.pipe_file(f"{base}/model.safetensors", b"w" * 100)
    with pytest.raises(ArtifactError, match=r"model\.safetensors: size 100 bytes, manifest says 4096"):
        store.read_artifact(art.uri, opts)


def test_corrupted_file_fails_hash_check_on_download(root, tmp_path):
    uri, opts = root
    art = _write_artifact(uri, opts, tmp_path, {"data.parquet": b"a" * 64})
    fs, base = store.filesystem(art.uri, opts)
    fs.pipe_file(f"{base}/data.parquet", b"b" * 64)  # same size, other bytes
    art = store.read_artifact(art.uri, opts)  # sizes still match
    with pytest.raises(ArtifactError, match=r"data\.parquet: content does not match its manifest hash"):
        store.download(art, "data.parquet", tmp_path / "dl", opts)


def test_manifest_refuses_missing_file(root, tmp_path):
    uri, opts = root
    out = store.join(uri, "pipe", "stage", "k3")
    with pytest.raises(ArtifactError, match="ghost.bin: missing before manifest write"):
        store.write_manifest(out, stage="s", key="k3", inputs={}, params={}, code="c", metrics={},
                             files=[store.FileEntry("ghost.bin", 3, "00")], storage_options=opts)
    assert store.try_read_artifact(out, opts) is None


def test_unreadable_manifest(tmp_path):
    out = "file://" + str(tmp_path / "o")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / store.MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        store.read_artifact(out)
    (tmp_path / "o" / store.MANIFEST).write_text(json.dumps({"stage": "s"}))
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        store.read_artifact(out)
