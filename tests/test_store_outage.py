"""A storage outage during an upload: the S3 endpoint drops every connection for 30 s, then answers again.

A loopback TCP proxy in front of moto cuts the connection in the middle of the upload of one of
data_prep's files and drops every connection for the next 30 s. The stage retries and finishes;
a reader that goes to moto directly during the outage never sees the cut file or a manifest; an
artifact written before the outage is intact afterwards.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import yaml

from stages.common import store
from tests.conftest import small_config

OUTAGE_S = 30.0


class FlakyProxy:
    """Forwards 127.0.0.1:port to `upstream`. The first request whose bytes contain `cut_on` is cut
    halfway (part of its body reaches the server) and starts an outage: for `outage_s` every
    connection, open or new, is dropped."""

    def __init__(self, upstream_port: int, cut_on: bytes, outage_s: float):
        self.upstream_port, self.cut_on, self.outage_s = upstream_port, cut_on, outage_s
        self.outage_started = threading.Event()
        self.outage_until = 0.0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def in_outage(self) -> bool:
        return time.time() < self.outage_until

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if self.in_outage():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, to_server: bool):
        try:
            while data := src.recv(1 << 16):
                if to_server and not self.outage_started.is_set() and self.cut_on in data:
                    dst.sendall(data[: len(data) // 2])
                    self._start_outage()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._drop(s)

    def _start_outage(self):
        self.outage_until = time.time() + self.outage_s
        self.outage_started.set()
        with self._lock:
            open_now = list(self._open)
        for s in open_now:
            self._drop(s)

    def _drop(self, s: socket.socket):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
        with self._lock:
            self._open.discard(s)

    def close(self):
        self._listener.close()


def test_stage_survives_a_storage_outage_during_upload(tmp_path, s3_server, prefect_harness):
    from tasks import tracking as mlf
    from tasks.config import load_config
    from tasks.spec import stage_spec
    from tasks.stage import configured

    bucket = s3_server.bucket()
    direct = {"client_kwargs": {"endpoint_url": s3_server.endpoint}}  # a reader that bypasses the proxy
    proxy = FlakyProxy(int(s3_server.endpoint.rsplit(":", 1)[1]), cut_on=b"pairs.parquet", outage_s=OUTAGE_S)
    # Retries with backoff that outlast the outage (first delays 4, 8, 16, 32 s, jitter 0.5).
    data = small_config(tmp_path, **{"storage.root": f"s3://{bucket}/runs", "storage.s3_endpoint_url": proxy.endpoint,
                                     "launch.retries": 5, "launch.retry_delay_s": 4.0})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "config.yaml")
    out = stage_spec("data_prep", cfg, {}).output

    before = store.join(f"s3://{bucket}/runs", "test-arith", "older", "k0")  # written before the outage
    (tmp_path / "old.bin").write_bytes(b"x" * 1000)
    entry = store.upload(tmp_path / "old.bin", before, "old.bin", direct)
    store.write_manifest(before, stage="older", key="k0", inputs={}, files=[entry], params={}, code="c",
                         metrics={}, storage_options=direct)

    seen_during_outage: list[tuple[bool, list[str]]] = []

    def watch():  # what a reader sees while the endpoint is down
        proxy.outage_started.wait()
        fs, base = store.filesystem(out, direct)
        while proxy.in_outage():
            fs.invalidate_cache()
            names = [p.rsplit("/", 1)[-1] for p in fs.find(base)]
            seen_during_outage.append((store.try_read_artifact(out, direct) is not None, names))
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        tracking = mlf.start_pipeline_run(cfg, "outage-flow-run", "outage", 0)
        result = configured(cfg)(stage="data_prep", cfg=cfg, inputs={}, tracking=tracking)
        finished = time.time()
    finally:
        proxy.close()
    watcher.join(OUTAGE_S + 10)

    assert proxy.outage_started.is_set()  # the cut happened, in the middle of pairs.parquet's upload
    assert result.launched
    print(f"stage finished {finished - proxy.outage_until:.1f} s after the endpoint came back")
    assert seen_during_outage  # the reader looked while it was down
    for has_manifest, names in seen_during_outage:
        assert not has_manifest and store.MANIFEST not in names
        assert "pairs.parquet" not in names  # the cut upload never became an object
    store.filesystem(out, direct)[0].invalidate_cache()  # the watcher's listings
    art = store.read_artifact(out, direct)
    store.verify_files(art, direct)  # every file whole, hashes match
    assert {"sft.parquet", "pairs.parquet", "rl_prompts.parquet", "eval.parquet"} <= {
        f["path"] for f in art.manifest["files"]}
    store.verify_files(store.read_artifact(before, direct), direct)  # nothing written before is lost
    # Every attempt is on record in MLflow: one FINISHED, any before it FAILED. (Whether the job fails at all
    # depends on timing: botocore's own retries inside the job sometimes outlast the outage.)
    client = mlf.client(cfg.tracking_uri())
    runs = client.search_runs([tracking.experiment_id], filter_string="tags.`alignflow.stage` = 'data_prep'")
    statuses = sorted(r.info.status for r in runs)
    assert statuses.count("FINISHED") == 1 and set(statuses) <= {"FINISHED", "FAILED"}, statuses
