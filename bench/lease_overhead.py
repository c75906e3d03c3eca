"""Benchmark: what one writer per key costs a launched stage (tasks/lease.py), on file:// and on
moto's S3 server (a subprocess on loopback).

    .venv/bin/python bench/lease_overhead.py [--repeats 50]

Per stage the task acquires the lease (one conditional create), records the job (one conditional
replace), renews it every ttl/3 while the job runs, and releases it (one conditional delete).
Prints the median and max of acquire + set_job + release, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
import psutil  # noqa: E402

from tasks import lease  # noqa: E402
from tests.conftest import free_port, wait_for_port  # noqa: E402


def measure(output: str, opts: dict, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        held = lease.acquire(f"{output}/k{i}", opts, lease.owner("bench"), ttl_s=60)
        held.set_job(psutil.Process())
        held.release()
        times.append((time.perf_counter() - start) * 1000)
    return times[1:]  # the first opens the connection


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lease-bench")
        with tempfile.TemporaryDirectory() as tmp:
            rows = [("file://", measure("file://" + tmp, {}, args.repeats)),
                    ("s3:// (moto)", measure("s3://lease-bench/p/stage", {"client_kwargs": {"endpoint_url": endpoint}},
                                             args.repeats))]
    finally:
        moto.terminate()
        moto.wait(10)
    print("| store | acquire + set_job + release, median | max |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {statistics.median(t):.1f} ms | {max(t):.1f} ms |")


if __name__ == "__main__":
    main()
