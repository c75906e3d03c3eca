"""Each stage reads its params through one typed model (stages/common/params.py).

A key that a stage reads but its model does not declare fails type checking (mypy over
stages/), and a spec whose params do not fit the stage's model is refused at job start,
with exit 2 and the key named, before any compute.
"""

import json
import os
import subprocess
import sys

from stages.common import store
from stages.common.runtime import BAD_INPUT_MARKER, StageSpec
from tests.conftest import ROOT


def mypy(*paths: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MYPYPATH": str(ROOT)}  # resolve `stages.*` to this checkout's sources
    return subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", os.devnull, *paths],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_stages_type_check():
    result = mypy("stages")
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_key_the_model_does_not_declare_fails_type_checking(tmp_path):
    source = (ROOT / "stages" / "update.py").read_text()
    assert "rl.clip_eps_high" in source
    reads_undeclared = tmp_path / "update_with_typo.py"
    reads_undeclared.write_text(source.replace("rl.clip_eps_high", "rl.clip_epsilon_high", 1))
    result = mypy(str(reads_undeclared))
    assert result.returncode == 1
    assert '"UpdateConfig" has no attribute "clip_epsilon_high"' in result.stdout


def test_a_spec_that_does_not_fit_the_model_is_refused_at_start(tmp_path):
    out = store.join("file://" + str(tmp_path), "evaluate", "k")
    params = {"model": {"trust_remote_code": False}, "evaluate": {"max_new_tokens": 4, "batch_size": 8,
                                                                  "beam_width": 4}, "verifier": "exact"}
    spec = StageSpec(stage="evaluate", key="k", pipeline="p", inputs={}, output=out, params=params, code_version="x")
    spec_uri = store.join(out, store.SPEC)
    store.write_json(spec_uri, spec.to_json())
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--spec", spec_uri], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert BAD_INPUT_MARKER in proc.stderr and "evaluate.beam_width" in proc.stderr
    assert json.loads((tmp_path / "evaluate" / "k" / store.SPEC).read_text())["params"] == params  # untouched
    assert not (tmp_path / "evaluate" / "k" / store.MANIFEST).exists()
