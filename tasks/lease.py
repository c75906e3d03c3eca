"""One writer per output key: a lease object in the store, `{output}/_LEASE.json`.

    acquire   a conditional create (S3 `If-None-Match: *`, local disk under a lock): one creator wins
    wait      a live lease of another job is polled until it is released or expires
    take over an expired lease (or one whose holder process is gone from this host) is replaced,
              conditional on what was read (S3 `If-Match: <ETag>`), so two takers cannot both win
    renew     a heartbeat thread rewrites it before it expires, conditional on what it last wrote
    release   deleted, conditional on being still ours

A lease records its holder (host, pid, the job's pid, flow run) and when it expires.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import psutil

from stages.common import store

LEASE = "_LEASE.json"
log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Our lease was replaced by another writer (it expired before we could renew it)."""


def lease_uri(output: str) -> str:
    return store.join(output, LEASE)


# --- the store's conditional writes: read, create, replace and delete, each one atomic ---------

class _S3Object:
    """The lease as an S3 object; the token a conditional write compares is its ETag."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> tuple[dict, str] | None:
        self.fs.invalidate_cache(self.path)
        try:  # the ETag first: content read after it is as new or newer, so If-Match never hits a newer lease
            etag = self.fs.info(self.path)["ETag"]
            return json.loads(self.fs.cat_file(self.path)), etag
        except FileNotFoundError:
            return None

    def _put(self, record: dict, **condition) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=_encode(record), **condition)
        except (FileExistsError, OSError) as err:
            if _precondition_failed(err):
                return None
            raise
        return out["ETag"]

    def create(self, record: dict) -> str | None:
        return self._put(record, IfNoneMatch="*")

    def replace(self, record: dict, token: str) -> str | None:
        return self._put(record, IfMatch=token)

    def delete(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            try:
                self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=token)
            except OSError as err:
                if not _precondition_failed(err):  # someone else's lease now: leave it
                    raise
        self.fs.invalidate_cache(self.path)


class _LocalFile:
    """The lease as a local file; every change runs under a lock on the output folder, and the
    token is the content's hash."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[dict, str] | None:
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        return json.loads(raw), hashlib.sha256(raw).hexdigest()

    def _write(self, record: dict) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(_encode(record))
        os.replace(tmp, self.path)
        return hashlib.sha256(_encode(record)).hexdigest()

    def create(self, record: dict) -> str | None:
        with self._locked():
            return None if os.path.exists(self.path) else self._write(record)

    def replace(self, record: dict, token: str) -> str | None:
        with self._locked():
            current = self.read()
            return self._write(record) if current is not None and current[1] == token else None

    def delete(self, token: str) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == token:
                os.remove(self.path)


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=1, sort_keys=True).encode()


def _precondition_failed(err: OSError) -> bool:
    """s3fs turns S3's 412 into FileExistsError (If-None-Match) or an OSError caused by the ClientError."""
    response = getattr(err.__cause__, "response", None) or {}
    return isinstance(err, FileExistsError) or response.get("Error", {}).get("Code") == "PreconditionFailed"


def lease_object(output: str, storage_options: dict) -> _S3Object | _LocalFile:
    """The lease of `output` in its store, with its conditional read/create/replace/delete."""
    fs, base = store.filesystem(output, storage_options)
    path = posixpath.join(base, LEASE)
    return _LocalFile(path) if store.LOCAL_FS.protocol == fs.protocol else _S3Object(fs, path)


# --- holding a lease ------------------------------------------------------------------------

def this_host() -> str:
    return socket.gethostname()


_HELD: set[str] = set()  # the lease ids this process holds now


def holder_is_gone(record: dict) -> bool:
    """Expired, or held by a process of this host that no longer runs (a killed flow process), or
    by this process but no longer held (its release failed, e.g. during a store outage)."""
    if record["expires_at"] <= time.time():
        return True
    if record["owner"].get("host") != this_host():
        return False
    me = owner()
    if (record["owner"]["pid"], record["owner"]["pid_started"]) == (me["pid"], me["pid_started"]):
        return record["lease_id"] not in _HELD
    try:
        return psutil.Process(record["owner"]["pid"]).create_time() != record["owner"]["pid_started"]
    except psutil.NoSuchProcess:
        return True


@dataclass
class Lease:
    """A held lease; `waited` says whether another writer held it first (it may have written the output)."""

    output: str
    record: dict
    token: str
    waited: bool
    _object: object = field(repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # heartbeat vs. the caller
    lost: bool = False

    def _renew(self, **owner_fields) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            record = {**self.record, "owner": {**self.record["owner"], **owner_fields},
                      "expires_at": time.time() + self.record["ttl_s"]}
            token = self._object.replace(record, self.token)
            if token is None:
                raise LeaseLost(f"{lease_uri(self.output)}: taken over by another writer")
            self.record, self.token = record, token

    def set_job(self, job: psutil.Process) -> None:
        """Record the job's process, so that a later holder on this host can stop it if orphaned."""
        with contextlib.suppress(LeaseLost):
            self._renew(job={"pid": job.pid, "started": job.create_time()})

    def _heartbeat(self) -> None:
        interval = self.record["ttl_s"] / 3
        while not self._stop.wait(interval):
            try:
                self._renew()
            except LeaseLost as err:
                self.lost = True
                log.error("%s", err)
                return
            except Exception as err:  # a store outage: try again at the next beat, before it expires
                log.warning("%s: renewal failed (%s); retrying", lease_uri(self.output), err)

    def release(self) -> None:
        with self._lock:
            self._stop.set()
            _HELD.discard(self.record["lease_id"])
        try:
            self._object.delete(self.token)
        except Exception as err:  # it expires by itself; never hide the job's own error
            log.warning("%s: release failed (%s); it expires at %s", lease_uri(self.output), err,
                        self.record["expires_at"])

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner(flow_run: str = "") -> dict:
    me = psutil.Process()
    return {"host": this_host(), "pid": me.pid, "pid_started": me.create_time(), "flow_run": flow_run}


def acquire(output: str, storage_options: dict, holder: dict, ttl_s: float = 60.0, poll_s: float = 2.0,
            on_wait: Callable[[dict], None] = lambda record: None,
            on_takeover: Callable[[dict], None] = lambda record: None, wait: bool = True) -> Lease | None:
    """Hold the lease on `output`, waiting while another live writer holds it (or, without `wait`,
    None then). `on_wait` is called once with the holder's record; `on_takeover` with a gone
    holder's record before its lease is replaced."""
    obj = lease_object(output, storage_options)
    record = {"lease_id": uuid.uuid4().hex, "owner": holder, "ttl_s": ttl_s}
    _HELD.add(record["lease_id"])  # before it can land: another thread here must see it as live
    waited = False
    try:
        while True:
            record["expires_at"] = time.time() + ttl_s
            if (token := obj.create(record)) is not None:
                break
            current = obj.read()
            if current is None:  # released in between: create again
                continue
            held, held_token = current
            if held.get("lease_id") == record["lease_id"]:  # our create landed, its answer was lost
                token = held_token
                break
            if holder_is_gone(held):
                on_takeover(held)
                if (token := obj.replace(record, held_token)) is not None:
                    break
                continue  # another taker won: look again
            if not wait:
                _HELD.discard(record["lease_id"])
                return None
            if not waited:
                on_wait(held)
                waited = True
            time.sleep(poll_s)
    except BaseException:
        _HELD.discard(record["lease_id"])
        raise
    lease = Lease(output, dict(record), token, waited, obj)
    threading.Thread(target=lease._heartbeat, name=f"lease-heartbeat {output}", daemon=True).start()
    return lease
