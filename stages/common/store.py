"""Artifacts in object storage: manifests written last, every read checked against them.

    {root}/{pipeline}/{stage}/{key}/...files...
    {root}/{pipeline}/{stage}/{key}/_MANIFEST.json     (written last, by rank 0 only)

An output without a valid manifest does not exist. Readers check every file's size, and its
sha256 when they download it, and fail with an error naming the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import fsspec

MANIFEST = "_MANIFEST.json"
SPEC = "_SPEC.json"
LOCAL_FS = fsspec.filesystem("file")


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupted artifact; the message names the file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def storage_options(uri: str, s3_endpoint_url: str | None) -> dict:
    """fsspec options for `uri`: the endpoint of an S3-compatible server, never credentials
    (those come from the environment)."""
    if s3_endpoint_url and uri.startswith("s3://"):
        return {"client_kwargs": {"endpoint_url": s3_endpoint_url}}
    return {}


def filesystem(uri: str, storage_options: dict | None = None):
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs, path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri.rstrip("/"), *parts)


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the artifact
    size: int
    sha256: str


@dataclass(frozen=True)
class Artifact:
    """A stage output that exists: its URI and the digest of its manifest."""

    uri: str
    digest: str
    manifest: dict

    def file(self, relpath: str) -> FileEntry:
        for f in self.manifest["files"]:
            if f["path"] == relpath:
                return FileEntry(**f)
        raise ArtifactError(f"{join(self.uri, relpath)}: not listed in {join(self.uri, MANIFEST)}")

    def files_under(self, prefix: str) -> list[FileEntry]:
        prefix = prefix.rstrip("/") + "/"
        return [FileEntry(**f) for f in self.manifest["files"] if f["path"].startswith(prefix)]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})


def manifest_digest(manifest: dict) -> str:
    """What identifies the content: stage, key and every file's hash (not timestamps)."""
    ident = {k: manifest[k] for k in ("stage", "key", "files")}
    return hashlib.sha256(canonical_json(ident)).hexdigest()


def write_manifest(
    output_uri: str,
    *,
    stage: str,
    key: str,
    inputs: dict[str, dict],
    files: list[FileEntry],
    params: dict,
    code: str,
    metrics: dict,
    storage_options: dict | None = None,
) -> dict:
    """Write `_MANIFEST.json` after checking every listed file is in place with its size."""
    fs, base = filesystem(output_uri, storage_options)
    for f in files:
        path = posixpath.join(base, f.path)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise ArtifactError(f"{join(output_uri, f.path)}: missing before manifest write") from None
        if size != f.size:
            raise ArtifactError(f"{join(output_uri, f.path)}: size {size} != expected {f.size}")
    manifest = {
        "stage": stage,
        "key": key,
        "inputs": inputs,
        "files": [f.__dict__ for f in sorted(files, key=lambda f: f.path)],
        "params": params,
        "code_version": code,
        "metrics": metrics,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    # A single put: object stores make it visible atomically, local disk via rename.
    tmp = posixpath.join(base, MANIFEST + ".tmp")
    with fs.open(tmp, "wb") as fh:
        fh.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
    fs.mv(tmp, posixpath.join(base, MANIFEST))
    return manifest


def read_artifact(uri: str, storage_options: dict | None = None, verify_sizes: bool = True) -> Artifact:
    """The artifact at `uri` if its manifest is valid and its files are all there."""
    fs, base = filesystem(uri, storage_options)
    mpath = posixpath.join(base, MANIFEST)
    try:
        with fs.open(mpath, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ArtifactError(f"{join(uri, MANIFEST)}: no manifest (the stage has not completed)") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        manifest_digest(manifest)  # checks that stage, key and files are present
    except (ValueError, KeyError, TypeError) as err:
        raise ArtifactError(f"{join(uri, MANIFEST)}: unreadable manifest ({err})") from None
    if verify_sizes:
        listing = {posixpath.relpath(p, base): info["size"] for p, info in fs.find(base, detail=True).items()}
        for f in files:
            size = listing.get(f["path"])
            if size is None:
                raise ArtifactError(f"{join(uri, f['path'])}: missing (listed in the manifest)")
            if size != f["size"]:
                raise ArtifactError(
                    f"{join(uri, f['path'])}: size {size} bytes, manifest says {f['size']} (truncated or corrupted)"
                )
    return Artifact(uri=uri, digest=manifest_digest(manifest), manifest=manifest)


def try_read_artifact(uri: str, storage_options: dict | None = None) -> Artifact | None:
    try:
        return read_artifact(uri, storage_options)
    except ArtifactError:
        return None


def check_file(fs, path: str, entry: FileEntry, name: str, chunk: int = 8 << 20) -> None:
    """The one check that a file's bytes match its manifest entry (size and sha256), streamed,
    on any filesystem (the store, or local disk after a download); the error names `name`."""
    h, size = hashlib.sha256(), 0
    try:
        with fs.open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
                size += len(block)
    except FileNotFoundError:
        raise ArtifactError(f"{name}: missing (listed in the manifest)") from None
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise ArtifactError(f"{name}: content does not match its manifest hash (corrupted)")


def verify_files(artifact: Artifact, storage_options: dict | None = None, prefix: str = "") -> None:
    """Hash every file of the artifact (under `prefix`, if given) in place against its manifest."""
    fs, base = filesystem(artifact.uri, storage_options)
    entries = artifact.files_under(prefix) if prefix else [FileEntry(**f) for f in artifact.manifest["files"]]
    for e in entries:
        check_file(fs, posixpath.join(base, e.path), e, join(artifact.uri, e.path))


def download(artifact: Artifact, relpath: str, local_dir: str | os.PathLike, storage_options=None) -> Path:
    """Fetch one file and check its sha256 against the manifest."""
    entry = artifact.file(relpath)
    dest = Path(local_dir) / relpath
    dest.parent.mkdir(parents=True, exist_ok=True)
    fs, base = filesystem(artifact.uri, storage_options)
    fs.get_file(posixpath.join(base, relpath), str(dest))
    check_file(LOCAL_FS, str(dest), entry, join(artifact.uri, relpath))
    return dest


def download_dir(artifact: Artifact, prefix: str, local_dir: str | os.PathLike, storage_options=None) -> Path:
    """Fetch every file under `prefix/` (e.g. a checkpoint directory), hash-checked."""
    entries = artifact.files_under(prefix)
    if not entries:
        raise ArtifactError(f"{join(artifact.uri, prefix)}: no files under this prefix in the manifest")
    for e in entries:
        download(artifact, e.path, local_dir, storage_options)
    return Path(local_dir) / prefix


def upload(local_path: str | os.PathLike, output_uri: str, relpath: str, storage_options=None) -> FileEntry:
    fs, base = filesystem(output_uri, storage_options)
    dest = posixpath.join(base, relpath)
    fs.makedirs(posixpath.dirname(dest), exist_ok=True)
    fs.put_file(str(local_path), dest)
    return FileEntry(path=relpath, size=os.path.getsize(local_path), sha256=sha256_file(local_path))


def upload_dir(local_dir: str | os.PathLike, output_uri: str, prefix: str, storage_options=None) -> list[FileEntry]:
    local_dir = Path(local_dir)
    return [
        upload(p, output_uri, posixpath.join(prefix, p.relative_to(local_dir).as_posix()), storage_options)
        for p in sorted(local_dir.rglob("*"))
        if p.is_file()
    ]


def remove_manifest(uri: str, storage_options: dict | None = None) -> None:
    """Invalidate an output (e.g. found corrupted) so it is produced again."""
    fs, base = filesystem(uri, storage_options)
    path = posixpath.join(base, MANIFEST)
    if fs.exists(path):
        fs.rm(path)


def write_json(uri: str, obj: dict, storage_options: dict | None = None) -> None:
    fs, path = filesystem(uri, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(uri: str, storage_options: dict | None = None) -> dict:
    fs, path = filesystem(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())
