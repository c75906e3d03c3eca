"""The command line.

    alignflow run [CONFIG] [--rounds N] [--summary-out PATH]   the pipeline, here and now
    alignflow status [CONFIG] [--rounds N]                     what the store holds, what a run would launch
    alignflow gc [CONFIG] --keep-last N [--delete]             remove what no recent run and no registered
                                                               version uses (a dry run without --delete)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "configs/tiny.yaml"


def _print_summary(summary: dict) -> None:
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()]
    width = max(len(k) for k, _ in rows)
    print("\n| " + "metric".ljust(width) + " | value")
    print("|-" + "-" * width + "-|------")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignflow")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the alignment pipeline on this machine")
    run.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    run.add_argument("--rounds", type=int, default=None, help="override rl.rounds")
    run.add_argument("--summary-out", type=Path, default=None, help="write the summary JSON here")
    status = sub.add_parser("status", help="every stage of a config: valid, missing or invalid in the store")
    status.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    status.add_argument("--rounds", type=int, default=None, help="override rl.rounds")
    gc = sub.add_parser("gc", help="remove store outputs no recent run and no registered version uses (dry run)")
    gc.add_argument("config", nargs="?", default=DEFAULT_CONFIG)
    gc.add_argument("--keep-last", type=int, required=True, help="keep what the last N runs used")
    gc.add_argument("--delete", action="store_true", help="delete (without it: only list what would go)")
    gc.add_argument("--min-age-hours", type=float, default=24.0,
                    help="keep outputs written more recently (a run in progress, a failed run awaiting retry)")
    args = parser.parse_args(argv)

    from tasks.config import ConfigError, load_config

    try:  # validate before anything starts: a bad config never launches a job
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"alignflow: {err}", file=sys.stderr)
        return 2
    if args.command == "status":
        from tasks.status import render, survey

        print(render(cfg, survey(cfg, args.rounds)))
        return 0
    if args.command == "gc":
        return _gc(args)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from flows.local_api import prefect_api, start_if_unconfigured

    api = start_if_unconfigured()  # boots while the lines below import and check
    from stages.common.role_datasets import check_local_datasets
    from stages.common.runtime import BadInput

    try:  # a bad local dataset: named here, before Prefect starts (the flow checks again, for deployments)
        check_local_datasets(cfg.data)
    except BadInput as err:
        print(f"alignflow: {err}", file=sys.stderr)
        return 2
    from flows.alignment import alignment

    if api is not None:  # while the API boots: the job server too, if jobs will run; open the tracking
        from matplotlib.figure import Figure  # noqa: F401  store; import what the report draws with

        from tasks.stage import prestart_job_server
        from tasks.tracking import client

        prestart_job_server(cfg)
        client(cfg.tracking_uri())
    with prefect_api(api):
        summary = alignment(config_path=str(args.config), rounds=args.rounds)
    _print_summary(summary)
    if args.summary_out:
        args.summary_out.parent.mkdir(parents=True, exist_ok=True)
        args.summary_out.write_text(json.dumps(summary, indent=2))
        print(f"\nsummary written to {args.summary_out}")
    if api is None:
        return 0
    # Done: the flow's logs and events are sent and the API stopped (prefect_api). Stop the warm job
    # servers and leave without the interpreter's teardown of Prefect's loops and of every module (~1.5 s).
    from tasks import warm_jobs

    warm_jobs.stop_all()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _gc(args) -> int:
    from tasks.config import load_config
    from tasks.gc import collect

    if args.keep_last < 0:
        print("alignflow gc: --keep-last must be >= 0", file=sys.stderr)
        return 2
    plan = collect(load_config(args.config), args.keep_last, delete=args.delete, min_age_s=args.min_age_hours * 3600)
    verb = "deleted" if args.delete else "would delete"
    for out in plan.deleted:
        print(f"{verb} {out.uri} ({out.size} bytes)")
    for uri in plan.skipped_leased:
        print(f"skipped {uri} (its lease is held)")
    print(f"{len(plan.kept)} kept, {len(plan.deleted)} {verb} ({plan.bytes_freed} bytes), "
          f"{len(plan.skipped_leased)} leased" + ("" if args.delete else "; dry run, --delete to delete"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
