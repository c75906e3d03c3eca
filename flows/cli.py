"""The command line.

    alignflow run [CONFIG] [--rounds N] [--summary-out PATH]   the pipeline, here and now
    alignflow status [CONFIG] [--rounds N]                     what the store holds, what a run would launch
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
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from flows.alignment import alignment

    summary = alignment(config_path=str(args.config), rounds=args.rounds)
    _print_summary(summary)
    if args.summary_out:
        args.summary_out.parent.mkdir(parents=True, exist_ok=True)
        args.summary_out.write_text(json.dumps(summary, indent=2))
        print(f"\nsummary written to {args.summary_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
