"""Check that vLLM's per-token logprobs equal a transformers teacher-forced recompute.

Run with the vLLM environment's python (scripts/setup_vllm_cpu.sh builds it):

    .venv-vllm/bin/python bench/vllm_logprob_check.py [--cli] [--keep DIR]

Builds a tiny random Llama (hidden 128, 4 layers, 4 heads, char-level vocabulary of
20) in a temp dir, samples 16 prompts x 4 with stages.common.vllm_generate.VLLMInProcess at
temperature 1.0 and 0.7 (top_p 1.0), and compares the returned logprobs with
log_softmax(logits / T) from transformers at the sampled tokens. Prints the max
abs difference, engine start time and tokens/s (64 prompts x 8 samples x 32 tokens).
Exits 1 if a difference exceeds 1e-3 (or a sanity check fails).

Also reported (not gated): top_p 0.9, where vLLM's processed logprobs are those
of the truncated, renormalised distribution and differ from a plain
log_softmax(logits / T); seeded reproducibility; --cli runs the subprocess path
(VLLMSubprocess: `python -m stages.common.vllm_generate JOB.json OUT.json`) once more.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from stages.common.generation import Request  # noqa: E402
from stages.common.vllm_generate import VLLMInProcess, VLLMSubprocess, apply_env_defaults  # noqa: E402

TOL = 1e-3
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", "+", "-", "=", " ", "*", "?"]


def build_tiny_model(out_dir: str, seed: int = 0) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    assert len(VOCAB) == 20
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    hf_tok.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=512, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
        # A large init makes the next-token distributions far from uniform, so the
        # comparison is not trivially satisfied.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)


def make_prompts(num: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    ids = {t: i for i, t in enumerate(VOCAB)}
    prompts = []
    for _ in range(num):
        text = f"{rng.randint(0, 99)}+{rng.randint(0, 99)}="
        prompts.append([ids["<s>"]] + [ids[c] for c in text])
    return prompts


def nucleus_log_softmax(logits, top_p: float):
    """log_softmax over vLLM's top-p nucleus (the rest -inf), as its sampler does."""
    import torch

    sorted_logits, idx = logits.sort(dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    mask = cum <= 1 - top_p
    mask[..., -1] = False
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    out = torch.empty_like(logits).scatter_(-1, idx, sorted_logits)
    return out.log_softmax(dim=-1)


def recompute(model, prompts, samples, temperature: float, top_p: float = 1.0):
    """Teacher-forced logprobs of the sampled tokens: (plain, nucleus, untempered) lists."""
    import torch

    plain, nucleus, raw = [], [], []
    with torch.no_grad():
        for prompt, group in zip(prompts, samples):
            for s in group:
                if not s.token_ids:
                    continue
                ids = torch.tensor([prompt + s.token_ids])
                logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
                tgt = torch.tensor(s.token_ids)[:, None]
                plain.append(torch.log_softmax(logits / temperature, -1).gather(1, tgt)[:, 0].tolist())
                nucleus.append(nucleus_log_softmax(logits / temperature, top_p).gather(1, tgt)[:, 0].tolist())
                raw.append(torch.log_softmax(logits, -1).gather(1, tgt)[:, 0].tolist())
    return plain, nucleus, raw


def max_abs_diff(samples, ref) -> float:
    got = [s.logprobs for g in samples for s in g if s.token_ids]
    assert len(got) == len(ref)
    return max(abs(a - b) for x, y in zip(got, ref) for a, b in zip(x, y))


def count_off(samples, ref, tol: float = TOL) -> int:
    got = [s.logprobs for g in samples for s in g if s.token_ids]
    return sum(abs(a - b) > tol for x, y in zip(got, ref) for a, b in zip(x, y))


def summary(samples) -> str:
    toks = [len(s.token_ids) for g in samples for s in g]
    reasons = [s.finish_reason for g in samples for s in g]
    lps = [lp for g in samples for s in g for lp in s.logprobs]
    return (
        f"{len(toks)} samples, {sum(toks)} tokens, mean len {sum(toks) / len(toks):.1f}, "
        f"stop {reasons.count('stop')} / length {reasons.count('length')}, "
        f"mean logprob {sum(lps) / len(lps):.3f} (uniform: {-math.log(len(VOCAB)):.3f})"
    )


def run_cli(model_dir: str, prompts) -> tuple[list, dict]:
    """The same request through the subprocess backend (this interpreter as the child's)."""
    backend = VLLMSubprocess(model_dir, python=sys.executable)
    t0 = time.perf_counter()
    samples = backend.generate(Request(prompts, n=4, temperature=1.0, top_p=1.0, max_new_tokens=32, seed=1234))
    return samples, {**backend.meta, "wall_s": time.perf_counter() - t0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cli", action="store_true", help="also run the subprocess CLI path")
    parser.add_argument("--keep", help="build the model in this directory and keep it")
    args = parser.parse_args()
    apply_env_defaults()

    import torch
    import transformers
    import vllm
    from transformers import LlamaForCausalLM

    print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"VLLM_CPU_KVCACHE_SPACE={os.environ.get('VLLM_CPU_KVCACHE_SPACE')}")
    tmp = tempfile.TemporaryDirectory(prefix="vllm_check_")
    model_dir = args.keep or os.path.join(tmp.name, "model")
    os.makedirs(model_dir, exist_ok=True)
    build_tiny_model(model_dir)

    prompts = make_prompts(16, seed=0)
    results: dict[str, tuple] = {}
    gen = VLLMInProcess(model_dir)

    def sample(prompts, n=4, temperature=1.0, top_p=1.0, seed=1234):
        return gen.generate(Request(prompts, n=n, temperature=temperature, top_p=top_p, max_new_tokens=32, seed=seed))

    try:
        for name, temp, top_p in [("T=1.0", 1.0, 1.0), ("T=0.7", 0.7, 1.0), ("T=1.0 top_p=0.9", 1.0, 0.9)]:
            t0 = time.perf_counter()
            samples = sample(prompts, temperature=temp, top_p=top_p)
            dt = time.perf_counter() - t0 - (gen.engine_start_s if name == "T=1.0" else 0.0)
            if name == "T=1.0":
                print(f"engine start: {gen.engine_start_s:.1f} s")
            results[name] = (temp, top_p, samples)
            print(f"{name}: {summary(samples)}; {dt:.2f} s")

        # Seeded reproducibility, and independence from the batch's composition.
        again = sample(prompts)
        same_seed = [[s.token_ids for s in g] for g in again] == [
            [s.token_ids for s in g] for g in results["T=1.0"][2]]
        subset = sample(prompts[:4])
        same_subset = [[s.token_ids for s in g] for g in subset] == [
            [s.token_ids for s in g] for g in results["T=1.0"][2][:4]]
        other = sample(prompts, seed=99)
        differs = [[s.token_ids for s in g] for g in other] != [
            [s.token_ids for s in g] for g in results["T=1.0"][2]]
        distinct = all(len({tuple(s.token_ids) for s in g}) > 1 for g in results["T=1.0"][2])
        print(f"same seed -> same samples: {same_seed}; first 4 prompts alone -> same samples: "
              f"{same_subset}; other seed -> different: {differs}; n samples of a prompt differ: {distinct}")

        # Throughput: 64 prompts x 8 samples x 32 tokens (EOS ignored so every sample
        # has 32 tokens), then the same through VLLMInProcess.generate (stops at EOS).
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        big = make_prompts(64, seed=1)
        sp = SamplingParams(n=8, temperature=1.0, top_p=1.0, max_tokens=32, seed=7, logprobs=0, ignore_eos=True)
        for rep in range(2):
            t0 = time.perf_counter()
            outs = gen.llm.generate([TokensPrompt(prompt_token_ids=p) for p in big], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            ntok = sum(len(c.token_ids) for o in outs for c in o.outputs)
            print(f"throughput 64x8x32 (ignore_eos) run {rep}: {ntok} tokens in {dt:.2f} s = {ntok / dt:.0f} tok/s")
        t0 = time.perf_counter()
        samples = sample(big, n=8, seed=7)
        dt = time.perf_counter() - t0
        ntok = sum(len(s.token_ids) for g in samples for s in g)
        print(f"throughput 64x8 up to 32 (stop at EOS): {ntok} tokens in {dt:.2f} s = {ntok / dt:.0f} tok/s")
    finally:
        gen.close()

    # Teacher-forced recompute with transformers (fp32).
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    failed = not (same_seed and same_subset and differs and distinct)
    for name, (temp, top_p, samples) in results.items():
        plain, nucleus, raw = recompute(model, prompts, samples, temp, top_p)
        d_plain, d_nucleus, d_raw = (max_abs_diff(samples, r) for r in (plain, nucleus, raw))
        gated = top_p == 1.0
        ok = d_plain <= TOL if gated else True
        failed |= not ok
        print(f"{name}: max |vllm - log_softmax(logits/T)| = {d_plain:.2e}"
              f"{'  [gated, tol 1e-3: ' + ('OK' if ok else 'FAIL') + ']' if gated else '  [not gated]'}; "
              f"vs top-p-renormalised: {d_nucleus:.2e} ({count_off(samples, nucleus)} of "
              f"{sum(len(x) for x in nucleus)} tokens off by > 1e-3: nucleus-boundary float ties); "
              f"vs untempered log_softmax(logits): {d_raw:.2e}")

    if args.cli:
        cli_samples, m = run_cli(model_dir, prompts)
        ref_plain, _, _ = recompute(model, prompts, cli_samples, 1.0)
        d = max_abs_diff(cli_samples, ref_plain)
        same = [[s.token_ids for s in g] for g in cli_samples] == [[s.token_ids for s in g] for g in results["T=1.0"][2]]
        failed |= d > TOL or not same
        print(f"CLI subprocess: wall {m['wall_s']:.1f} s (engine start {m['engine_start_s']:.1f} s, "
              f"generate {m['generate_s']:.2f} s), max diff {d:.2e}, same samples as in process: {same}")

    tmp.cleanup()
    print("RESULT:", "FAIL" if failed else "OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
