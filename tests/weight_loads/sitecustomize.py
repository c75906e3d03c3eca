"""Test instrumentation, active only when $ALIGNFLOW_TEST_WEIGHT_LOG names a file: every safetensors file
a process opens is appended there as a JSON line (pid, the stage module it runs, the file's real path).
In the warm job server it is imported once, and every job and rank forked from it inherits the hook.

Put this directory on PYTHONPATH and Python imports it at start-up, in each process a stage job starts,
before transformers or peft bind `safetensors.safe_open` (tests/test_lora.py counts the base's loads)."""

import json
import os
import sys
from pathlib import Path

LOG = os.environ.get("ALIGNFLOW_TEST_WEIGHT_LOG")
if LOG:
    import safetensors

    _safe_open = safetensors.safe_open

    def safe_open(filename, *args, **kwargs):
        # `-m stages.X` sets argv[0] to stages/X.py, in a cold process and in a rank forked by the job server
        main = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
        stage = f"stages.{main.stem}" if main and main.parent.name == "stages" else ""
        with open(LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "stage": stage, "file": os.path.realpath(str(filename))}) + "\n")
        return _safe_open(filename, *args, **kwargs)

    safetensors.safe_open = safe_open
