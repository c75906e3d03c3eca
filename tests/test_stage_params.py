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


def test_min_new_tokens_reaches_generation(tmp_path):
    """rl.min_new_tokens goes from the config through generate's params and request to the hf backend:
    an untrained tiny model (built from the config's model.tiny) stops early without it, and with it
    every sample has at least that many tokens (prompt + max_new_tokens fit its context)."""
    from stages.common.generation import HFBackend
    from stages.common.models import build_tiny_model, encode_prompts, save_checkpoint, train_char_tokenizer
    from stages.generate import sample_rows
    from tasks.config import parse_config
    from tasks.spec import stage_params
    from tests.conftest import small_config

    def params(min_new_tokens: int):
        return stage_params("generate", parse_config(small_config(
            tmp_path, **{"rl.max_new_tokens": 16, "rl.samples_per_prompt": 8, "rl.min_new_tokens": min_new_tokens})), 0)

    cfg = parse_config(small_config(tmp_path))
    tokenizer = train_char_tokenizer(["0123456789+="])
    save_checkpoint(build_tiny_model(cfg.model.tiny, tokenizer, seed=0), tokenizer, tmp_path / "policy")
    texts = ["7+5=", "12+34=", "3+88=", "90+9="]
    assert max(len(p) for p in encode_prompts(tokenizer, texts)) + 16 <= cfg.model.tiny.max_position_embeddings
    prompts = [{"prompt_id": i, "prompt": t, "prompt_ids": ids}
               for i, (t, ids) in enumerate(zip(texts, encode_prompts(tokenizer, texts)))]
    backend = HFBackend(str(tmp_path / "policy"))

    free = sample_rows(backend, tokenizer, prompts, params(0), seed=0, policy="p")
    assert min(len(r["response_token_ids"]) for r in free) < 10  # it does stop early by itself
    held = sample_rows(backend, tokenizer, prompts, params(10), seed=0, policy="p")
    lengths = [len(r["response_token_ids"]) for r in held]
    assert len(lengths) == 32 and min(lengths) >= 10
    assert any(r["finish_reason"] == "stop" for r in held)  # it stops after the minimum, not only at the cap
    assert all(len(r["response_logprobs"]) == len(r["response_token_ids"]) for r in held)
