"""Benchmark: a rollout Parquet through our store (hash-checked) against raw s3fs, on moto's S3 server.

    .venv/bin/python bench/artifact_io.py                 # 100k rows, LLM-sized token lists
    .venv/bin/python bench/artifact_io.py --small         # smoke test: 5k rows
    .venv/bin/python bench/artifact_io.py --tokens tiny   # the tiny pipeline's lengths (7 + 4 tokens)

The table: `--rows` rows of stages.common.rollouts.ROLLOUT_SCHEMA; prompt and response token
lists with lengths drawn uniformly from `--prompt-tokens` and `--response-tokens` (token ids
under a 32k vocabulary, logprobs as float32), text columns of ~4 characters per token, written
as the stages write it (row groups of ROW_GROUP_ROWS, zstd). moto's S3 server runs as a
subprocess on 127.0.0.1 (`python -m moto.server -H 127.0.0.1 -p PORT`).

Timed `--repeats` times each after a warm-up, the operations interleaved (min and median; the
ratio from the fastest runs), the same file and bytes every time:

  raw put            s3fs put_file
  store.upload       put_file + sha256 of the local file (what every stage's ctx.save does)
  + manifest         store.upload + store.write_manifest (size check of the object, manifest put)
  raw get            s3fs get_file
  store.download     get_file + size and sha256 check against the manifest
  read_artifact +    store.read_artifact (manifest get, listing, size check) + store.download:
    download         what a stage's ctx.fetch does
  sha256 alone       hashing the local file, for scale
  parquet write/read the table to/from local Parquet, for scale

Also the same through the `file://` store (local disk). Prints a markdown table with MB/s and
the ratio to the raw s3fs operation, and writes JSON to bench/results/artifact_io-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TOKENS = {"llm": ((16, 256), (8, 512)), "tiny": ((7, 7), (4, 4))}


def make_table(rows: int, prompt_range: tuple[int, int], response_range: tuple[int, int], seed: int = 0):
    import numpy as np
    import pyarrow as pa

    from stages.common.rollouts import ROLLOUT_SCHEMA

    rng = np.random.default_rng(seed)

    def lists(lo, hi, dtype, gen):
        lengths = rng.integers(lo, hi + 1, rows)
        offsets = np.zeros(rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(gen(int(offsets[-1])).astype(dtype))), lengths

    prompt_ids, p_len = lists(*prompt_range, np.int32, lambda n: rng.integers(0, 32000, n))
    response_ids, r_len = lists(*response_range, np.int32, lambda n: rng.integers(0, 32000, n))
    offsets = np.concatenate([[0], np.cumsum(r_len)]).astype(np.int32)
    logprobs = pa.ListArray.from_arrays(pa.array(offsets), pa.array(
        np.log(rng.uniform(1e-4, 1.0, int(offsets[-1]))).astype(np.float32)))
    corpus = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz     .,0123456789"), 1 << 20))
    starts = rng.integers(0, len(corpus) - 4 * max(response_range[1], prompt_range[1]) - 1, rows)
    prompt_text = pa.array([corpus[s:s + 4 * n] for s, n in zip(starts, p_len)])
    response_text = pa.array([corpus[s:s + 4 * n] for s, n in zip(starts[::-1], r_len)])
    columns = {
        "prompt_id": pa.array([f"p-{i // 8:07d}" for i in range(rows)]),
        "sample_idx": pa.array(np.arange(rows, dtype=np.int32) % 8),
        "prompt": prompt_text, "response": response_text,
        "prompt_token_ids": prompt_ids, "response_token_ids": response_ids, "response_logprobs": logprobs,
        "reward": pa.array(rng.integers(0, 2, rows).astype(np.float32)),
        "reward_info": pa.array([f'{{"verifier": {v}, "reward_model": {m:.4f}}}'
                                 for v, m in zip(rng.integers(0, 2, rows), rng.normal(size=rows))]),
        "finish_reason": pa.array(np.where(rng.random(rows) < 0.9, "stop", "length")),
        "policy_key": pa.array(["3f9a0c1e2b4d5a6f"] * rows),
    }
    return pa.Table.from_pydict(columns, schema=ROLLOUT_SCHEMA)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing-secret",
                      AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.terminate()
    raise TimeoutError("moto server did not start")


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def bench_backend(name: str, root: str, opts: dict, local: Path, relpath: str, work: Path, repeats: int) -> list[dict]:
    """Every operation once as warm-up, then `repeats` rounds with the operations interleaved
    (a burst of load hits them all alike); the ratio uses the fastest run of each."""
    from stages.common import store

    fs, _ = store.filesystem(root, opts)
    size = local.stat().st_size
    _, raw_base = store.filesystem(store.join(root, "raw"), opts)
    raw_path = f"{raw_base}/{relpath}"
    fs.makedirs(os.path.dirname(raw_path), exist_ok=True)
    art_uri = store.join(root, "ours")
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    dest_raw, dl_dir = work / f"raw-get-{safe}.parquet", work / f"dl-{safe}"

    def up_manifest():
        e = store.upload(local, art_uri, relpath, opts)
        store.write_manifest(art_uri, stage="generate", key="bench", inputs={}, files=[e], params={}, code="bench",
                             metrics={}, storage_options=opts)

    def fetch():
        store.download(store.read_artifact(art_uri, opts), relpath, dl_dir, opts)

    up_manifest()
    artifact = store.read_artifact(art_uri, opts)
    ops = [  # (operation, function, the raw operation it is compared with)
        ("raw put", lambda: fs.put_file(str(local), raw_path), None),
        ("store.upload (put + sha256)", lambda: store.upload(local, art_uri, relpath, opts), "raw put"),
        ("store.upload + write_manifest", up_manifest, "raw put"),
        ("raw get", lambda: fs.get_file(raw_path, str(dest_raw)), None),
        ("store.download (get + sha256 check)", lambda: store.download(artifact, relpath, dl_dir, opts), "raw get"),
        ("read_artifact + download (ctx.fetch)", fetch, "raw get"),
    ]
    times: dict[str, list[float]] = {op: [] for op, _, _ in ops}
    for _, fn, _ in ops:
        fn()
    for _ in range(repeats):
        for op, fn, _ in ops:
            t = time.perf_counter()
            fn()
            times[op].append(time.perf_counter() - t)
    out = []
    for op, _, base in ops:
        best = min(times[op])
        out.append({"backend": name, "operation": op, "min_s": best, "median_s": statistics.median(times[op]),
                    "MB/s": size / 1e6 / best, "vs raw": best / min(times[base]) if base else None,
                    "runs_s": [round(t, 4) for t in times[op]]})
    shutil.rmtree(dl_dir, ignore_errors=True)
    dest_raw.unlink(missing_ok=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--tokens", choices=sorted(TOKENS), default="llm", help="token-list length profile")
    parser.add_argument("--prompt-tokens", default=None, help="MIN:MAX prompt tokens (overrides --tokens)")
    parser.add_argument("--response-tokens", default=None, help="MIN:MAX response tokens (overrides --tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="smoke test: 5k rows")
    parser.add_argument("--no-local", action="store_true", help="skip the file:// store")
    args = parser.parse_args()
    if args.small:
        args.rows = 5000
    p_range, r_range = TOKENS[args.tokens]
    if args.prompt_tokens:
        p_range = tuple(map(int, args.prompt_tokens.split(":")))
    if args.response_tokens:
        r_range = tuple(map(int, args.response_tokens.split(":")))

    import pyarrow.parquet as pq

    from stages.common import rollouts, store

    work = Path(tempfile.mkdtemp(prefix="bench-io-"))
    t = time.perf_counter()
    table = make_table(args.rows, p_range, r_range)
    gen_s = time.perf_counter() - t
    rollouts.validate(table, rollouts.ROLLOUT_SCHEMA, "bench")
    local = work / "part-00000.parquet"
    write_s, wt = timed(lambda: pq.write_table(table, str(local), row_group_size=rollouts.ROW_GROUP_ROWS,
                                               compression="zstd"), args.repeats)
    read_s, rt = timed(lambda: rollouts.read_tables([local]), args.repeats)
    size = local.stat().st_size
    sha_s, st = timed(lambda: store.sha256_file(local), args.repeats)
    write_s, read_s, sha_s = min(wt), min(rt), min(st)
    print(f"# artifact_io: {args.rows:,} rows, prompt tokens {p_range}, response tokens {r_range}: "
          f"{table.nbytes / 1e6:.1f} MB in memory, {size / 1e6:.1f} MB Parquet (zstd); table built in {gen_s:.1f}s",
          flush=True)
    rows = [
        {"backend": "local", "operation": "parquet write (write_table settings)", "min_s": write_s,
         "median_s": statistics.median(wt), "MB/s": size / 1e6 / write_s, "runs_s": wt},
        {"backend": "local", "operation": "parquet read + validate (read_tables)", "min_s": read_s,
         "median_s": statistics.median(rt), "MB/s": size / 1e6 / read_s, "runs_s": rt},
        {"backend": "local", "operation": "sha256 of the file", "min_s": sha_s, "median_s": statistics.median(st),
         "MB/s": size / 1e6 / sha_s, "runs_s": st},
    ]
    relpath = "rollouts/part-00000.parquet"
    proc, endpoint = start_moto()
    try:
        import s3fs

        opts = {"client_kwargs": {"endpoint_url": endpoint}}
        s3fs.S3FileSystem(**opts).mkdir("bench-io")
        rows += bench_backend("s3 (moto)", "s3://bench-io/pipe", opts, local, relpath, work, args.repeats)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if not args.no_local:
        rows += bench_backend("file://", "file://" + str(work / "store"), {}, local, relpath, work, args.repeats)
    for r in rows:
        print(f"  {r['backend']:10s} {r['operation']:40s} {r['min_s']:8.3f}s {r['MB/s']:8.1f} MB/s", flush=True)
    print(f"\n## Rollout Parquet I/O: {args.rows:,} rows, {size / 1e6:.1f} MB ({args.repeats} interleaved runs after a "
          "warm-up; MB/s and vs raw from the fastest run; vs raw = time / the raw fsspec op of the same direction)\n")
    print(C.markdown_table(rows, ["backend", "operation", "min_s", "median_s", "MB/s", "vs raw"]))
    path = C.write_results("artifact_io", {"rows": args.rows, "prompt_tokens": p_range, "response_tokens": r_range,
                                           "parquet_bytes": size, "table_bytes": table.nbytes, "results": rows})
    print(f"\nresults: {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
