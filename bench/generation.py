"""Benchmark: our transformers backend (HFBackend: batched, KV cache) against a naive loop and vLLM.

    .venv/bin/python bench/generation.py                  # both scenarios, 256 prompts x 8 samples
    .venv/bin/python bench/generation.py --small          # smoke test (~1 minute)
    .venv/bin/python bench/generation.py --checkpoint DIR # any HF checkpoint dir with its tokenizer

Same checkpoint, same prompts (the `generate` stage's seeded draw of rl prompts, encoded with
the checkpoint's tokenizer), same n, temperature 1, top_p 1, same thread count:

  hf_batched      stages.common.generation.HFBackend, what the generate stage runs
  hf_no_cache     the same batches through model.generate(use_cache=False): the KV cache's share
  hf_one_by_one   model.generate with KV cache, one sequence per call: batching's share
  naive           a hand loop, one sequence at a time, full forward per token, no KV cache
  vllm            stages.common.vllm_generate.VLLMSubprocess: .venv-vllm (vLLM CPU), if that venv
                  exists; generate time from the child's meta (engine start shown apart)

The slow variants run on a subset (`--naive-seqs` sequences; hf_no_cache `--no-cache-prompts`
prompts x n) and are reported in tokens/s.
Scenarios: `pipeline` (the SFT-trained tiny model, max_new_tokens 6, as configs/tiny.yaml) and
`long` (the untrained tiny model with max_new_tokens 56: EOS rarely comes early, so sequences
are long and the cache matters). Without --checkpoint the script trains the tiny model itself
(a few hundred plain-torch SFT steps on the synthetic data, seconds).

Prints a markdown table (tokens/s and ratio to hf_batched) and writes JSON to
bench/results/generation-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VLLM_PY = C.REPO / ".venv-vllm" / "bin" / "python"


def build_checkpoints(workdir: Path, sft_steps: int, seed: int = 0) -> tuple[Path, Path, list[dict]]:
    """(trained dir, untrained dir, rl prompt rows): the tiny Llama of configs/tiny.yaml."""
    import torch

    from stages.common.models import (build_tiny_model, encode_prompts, encode_responses, pack_right,
                                      save_checkpoint, train_char_tokenizer)
    from stages.data_prep import synthetic_addition

    cfg = C.pipeline_config()
    tables = synthetic_addition(cfg.data.synthetic, seed)
    texts = [r["prompt"] + r["response"] for r in tables["sft"]] + [r["prompt"] + r["answer"] for r in tables["eval"]]
    tok = train_char_tokenizer(texts)
    model = build_tiny_model(cfg.model.tiny, tok, seed)
    untrained = workdir / "untrained"
    save_checkpoint(model, tok, untrained)
    prompts = encode_prompts(tok, [r["prompt"] for r in tables["sft"]])
    responses = encode_responses(tok, [r["response"] for r in tables["sft"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(sft_steps):
        idx = torch.randint(len(prompts), (64,), generator=gen).tolist()
        ids, attn, mask = pack_right([prompts[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    trained = workdir / "trained"
    save_checkpoint(model, tok, trained)
    return trained, untrained, tables["prompts"]


def naive_generate(model, prompt_ids, n, max_new_tokens, temperature, eos, seed):
    """One sequence at a time, the full sequence through the model for every new token."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for p in prompt_ids:
            for _ in range(n):
                ids = torch.tensor([p])
                tokens, lps = [], []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=ids).logits[0, -1].float() / temperature
                    logp = F.log_softmax(logits, dim=-1)
                    t = int(torch.multinomial(logp.exp(), 1))
                    tokens.append(t)
                    lps.append(float(logp[t]))
                    if t == eos:
                        break
                    ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
                out.append(tokens)
    return out


def hf_generate_raw(model, tok, prompt_ids, n, max_new_tokens, temperature, batch_size, use_cache, seed):
    """model.generate on left-padded batches, as HFBackend does; returns generated token counts."""
    import torch
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                               max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, output_scores=True, return_dict_in_generate=True,
                               use_cache=use_cache)
    torch.manual_seed(seed)
    flat = [p for p in prompt_ids for _ in range(n)]
    total = 0
    with torch.no_grad():
        for s in range(0, len(flat), batch_size):
            batch = flat[s:s + batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), tok.pad_token_id)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(batch):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            for row in out.sequences[:, width:].tolist():
                total += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return total


def run_vllm(ckpt: Path, prompt_ids, n, max_new_tokens, temperature, seed, threads, eos) -> dict | None:
    from stages.common.generation import Request
    from stages.common.vllm_generate import VLLMSubprocess

    if not VLLM_PY.exists():
        return None
    # The child inherits this environment (less torchrun's variables, OMP_NUM_THREADS among them).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    backend = VLLMSubprocess(str(ckpt), python=str(VLLM_PY), timeout_s=900)
    started = time.perf_counter()
    try:
        samples = backend.generate(Request(prompt_ids, n=n, temperature=temperature, top_p=1.0,
                                           max_new_tokens=max_new_tokens, seed=seed, stop_token_ids=[eos]))
    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as err:
        return {"error": str(err)}
    wall = time.perf_counter() - started
    meta = backend.meta
    tokens = sum(len(s.token_ids) for g in samples for s in g)
    return {"tokens": tokens, "generate_s": meta["generate_s"], "engine_start_s": meta["engine_start_s"],
            "process_wall_s": wall, "vllm_version": meta.get("vllm_version")}


def scenario(name: str, ckpt: Path, prompt_rows: list[dict], args, seed: int) -> list[dict]:
    from stages.common.generation import HFBackend, Request
    from stages.common.models import encode_prompts
    from stages.generate import round_prompts

    max_new = 6 if name == "pipeline" else 56
    hf = HFBackend(str(ckpt), batch_size=args.batch_size)
    tok, model = hf.tokenizer, hf.model
    rows = round_prompts(prompt_rows, args.prompts, seed, 0)
    prompt_ids = encode_prompts(tok, [r["prompt"] for r in rows])
    n, T = args.samples, args.threads
    sub_prompts = prompt_ids[: max(1, args.naive_seqs // n)]
    sub_seqs = len(sub_prompts) * n
    out = []

    def row(method, seqs, tokens, secs, note=""):
        out.append({"scenario": name, "method": method, "sequences": seqs, "tokens": tokens, "seconds": secs,
                    "tokens/s": tokens / secs if secs else None, "note": note})
        print(f"  {name:8s} {method:14s} {seqs:5d} seqs {tokens:6d} tok {secs:7.2f}s "
              f"{tokens / secs if secs else 0:9.0f} tok/s {note}", flush=True)

    # warm-up (first-call allocations, lazy imports)
    hf.generate(Request(prompt_ids[:4], n=2, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=seed))
    t = time.perf_counter()
    samples = hf.generate(Request(prompt_ids, n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=seed))
    secs = time.perf_counter() - t
    row("hf_batched", len(prompt_ids) * n, sum(len(s.token_ids) for g in samples for s in g), secs,
        f"batch {args.batch_size}, KV cache")

    nc_prompts = prompt_ids[: args.no_cache_prompts]
    t = time.perf_counter()
    tokens = hf_generate_raw(model, tok, nc_prompts, n, max_new, 1.0, args.batch_size, False, seed)
    row("hf_no_cache", len(nc_prompts) * n, tokens, time.perf_counter() - t,
        f"batch {args.batch_size}, no cache" + (" (subset)" if len(nc_prompts) < len(prompt_ids) else ""))

    t = time.perf_counter()
    tokens = hf_generate_raw(model, tok, sub_prompts, n, max_new, 1.0, 1, True, seed)
    row("hf_one_by_one", sub_seqs, tokens, time.perf_counter() - t, "batch 1, KV cache (subset)")

    t = time.perf_counter()
    seqs = naive_generate(model, sub_prompts, n, max_new, 1.0, tok.eos_token_id, seed)
    row("naive", sub_seqs, sum(map(len, seqs)), time.perf_counter() - t, "batch 1, no cache (subset)")

    if not args.no_vllm:
        v = run_vllm(ckpt, prompt_ids, n, max_new, 1.0, seed, T, tok.eos_token_id)
        if v is None:
            print(f"  {name:8s} vllm: skipped ({VLLM_PY} not found)")
        elif "error" in v:
            print(f"  {name:8s} vllm: failed: {v['error']}")
            out.append({"scenario": name, "method": "vllm", "note": "failed: " + v["error"][-300:]})
        else:
            row("vllm", len(prompt_ids) * n, v["tokens"], v["generate_s"],
                f"vLLM {v['vllm_version']}; engine start {v['engine_start_s']:.1f}s, process {v['process_wall_s']:.1f}s")
            out[-1].update(engine_start_s=v["engine_start_s"], process_wall_s=v["process_wall_s"],
                           **{"tokens/s incl. start": v["tokens"] / (v["generate_s"] + v["engine_start_s"])})
    base = out[0]["tokens/s"]
    for r in out:
        if r.get("tokens/s"):
            r["vs hf_batched"] = r["tokens/s"] / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="smoke-test sizes")
    parser.add_argument("--checkpoint", type=Path, default=None, help="HF checkpoint dir (with tokenizer)")
    parser.add_argument("--scenarios", default="pipeline,long")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=512, help="HFBackend batch (configs: generate.batch_size)")
    parser.add_argument("--naive-seqs", type=int, default=128, help="sequences for the slow one-at-a-time variants")
    parser.add_argument("--no-cache-prompts", type=int, default=64, help="prompts for hf_no_cache")
    parser.add_argument("--sft-steps", type=int, default=400)
    parser.add_argument("--no-vllm", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.prompts, args.naive_seqs, args.sft_steps, args.no_cache_prompts = 32, 16, 60, 8
    C.set_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    print(f"# generation: {args.prompts} prompts x {args.samples} samples, {args.threads} threads, work dir {workdir}")
    trained, untrained, prompt_rows = build_checkpoints(workdir, args.sft_steps)
    if args.checkpoint:
        trained = untrained = args.checkpoint
    rows = []
    for name in args.scenarios.split(","):
        rows += scenario(name, trained if name == "pipeline" else untrained, prompt_rows, args, seed=0)
    print("\n## Generation throughput (generated tokens / s; ratio to our hf_batched)\n")
    print(C.markdown_table(rows, ["scenario", "method", "sequences", "tokens", "seconds", "tokens/s",
                                  "vs hf_batched", "note"]))
    path = C.write_results("generation", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
