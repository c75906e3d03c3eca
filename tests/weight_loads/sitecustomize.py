"""Test instrumentation, active only when $ALIGNFLOW_TEST_WEIGHT_LOG names a file: every safetensors file
a process opens is appended there as a JSON line (pid, the stage module it runs, the file's real path).

Put this directory on PYTHONPATH and Python imports it at start-up, in each process a stage job starts,
before transformers or peft bind `safetensors.safe_open` (tests/test_lora.py counts the base's loads)."""

import json
import os
import sys

LOG = os.environ.get("ALIGNFLOW_TEST_WEIGHT_LOG")
if LOG:
    import safetensors

    _safe_open = safetensors.safe_open

    def safe_open(filename, *args, **kwargs):
        stage = next((a for a in sys.orig_argv if a.startswith("stages.")), "")
        with open(LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "stage": stage, "file": os.path.realpath(str(filename))}) + "\n")
        return _safe_open(filename, *args, **kwargs)

    safetensors.safe_open = safe_open
