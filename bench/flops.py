"""Benchmark: training FLOP/s of the `sft` stage against the machine's measured fp32 matmul peak.

    .venv/bin/python bench/flops.py                 # 600 SFT steps (configs/tiny.yaml), layouts 1xT and 2x(T/2)
    .venv/bin/python bench/flops.py --small         # smoke test
    .venv/bin/python bench/flops.py --layouts 2x1 --steps 300

Model FLOP/s of training = 6 x params x tokens/s (forward 2N + backward 4N per token; the
attention-score term 12 x layers x hidden x seq_len per token is shown apart: ~1% here at
11-token sequences). tokens/s and params come from the `sft` job's manifest (the stage run
for real: spec -> torchrun -> DeepSpeed ZeRO from the config over several ranks, plain torch in
one process, fp32 on CPU).

Peak: torch.mm in fp32 on the same thread count (square matrices up to `--peak-size`, best of
several runs; the larger of T threads in one process and T x the one-thread figure), plus the matmuls of this model's own shapes (a micro-batch of tokens x hidden
times the MLP and attention projections), which bound what any trainer of this model can
reach, plus bf16 for reference (the CPU engine trains in fp32). A plain PyTorch
loop (no DeepSpeed, same model, same batch, one process, all threads) in-process is the
reference trainer for the same work.

Prints a markdown table (FLOP/s, MFU against each peak) and writes JSON to
bench/results/flops-<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def mm_flops(n: int, m: int, k: int, dtype, threads: int, min_time: float = 0.5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        reps, t = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            el = time.perf_counter() - t
            if el >= min_time / 3:
                break
        best = max(best, 2 * n * m * k * reps / el)
    return best


def plain_torch_sft(tiny: dict, batch: int, steps: int, threads: int) -> dict:
    """The same SFT work as the stage, in-process, plain torch (no DeepSpeed, no job)."""
    import torch

    from stages.common.models import build_tiny_model, encode_prompts, encode_responses, pack_right, train_char_tokenizer
    from stages.common.data_config import SyntheticDataConfig
    from stages.common.sections import TinyModelConfig
    from stages.data_prep import synthetic_addition

    torch.set_num_threads(threads)
    cfg = C.pipeline_config().model_dump(mode="json")
    tables = synthetic_addition(SyntheticDataConfig(**{**cfg["data"]["synthetic"], "num_sft": 5000}), 0)
    tok = train_char_tokenizer([r["prompt"] + r["response"] for r in tables["sft"]])
    model = build_tiny_model(TinyModelConfig(**tiny), tok, 0)
    prompts = encode_prompts(tok, [r["prompt"] for r in tables["sft"]])
    responses = encode_responses(tok, [r["response"] for r in tables["sft"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    model.train()
    tokens, t = 0, time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(prompts), (batch,), generator=gen).tolist()
        ids, attn, mask = pack_right([prompts[i] for i in idx], [responses[i] for i in idx], tok.pad_token_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(attn.sum())
        loss.item()
    secs = time.perf_counter() - t
    return {"tokens_per_s": tokens / secs, "seconds": secs, "num_params": sum(p.numel() for p in model.parameters()),
            "seq_len": tokens / (steps * batch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--layouts", default=None, help="RANKSxTHREADS of the sft job (default 1xT,2x(T/2))")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    if args.small:
        args.steps, args.peak_size = 30, 1024
    T = args.threads
    layouts = args.layouts.split(",") if args.layouts else [f"1x{T}"] + ([f"2x{T // 2}"] if T >= 2 else [])
    C.set_threads(T)
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="bench-flops-"))
    print(f"# flops: sft {args.steps} steps x {args.batch}, {T} threads, layouts {layouts}, work dir {workdir}",
          flush=True)
    overrides = {"data": {"synthetic": {"num_sft": 5000}}, "sft": {"steps": args.steps, "batch_size": args.batch}}
    base_cfg = C.pipeline_config(overrides, workdir / "store", "bench-flops")
    tiny = base_cfg.model_dump(mode="json")["model"]["tiny"]
    data = C.run_stage_job("data_prep", base_cfg, {}, nproc=1, threads=T)

    # Peaks first (the sft job and this process never run at the same time).
    sizes = [s for s in (256, 512, 1024, 2048, 4096) if s <= args.peak_size]
    square = {s: mm_flops(s, s, s, torch.float32, T) for s in sizes}
    peak_1t = mm_flops(max(sizes), max(sizes), max(sizes), torch.float32, 1)
    # The machine's peak at T threads: one process with T threads, or T processes with one each.
    peak = max(max(square.values()), T * peak_1t)
    h, f = tiny["hidden_size"], tiny["intermediate_size"]
    shapes = {}
    for lay in layouts:
        ranks, threads = map(int, lay.split("x"))
        rows_tok = args.batch // ranks * 11  # micro-batch tokens per rank (11-token sequences)
        shapes[lay] = {
            "qkvo [tok,h]x[h,h]": mm_flops(rows_tok, h, h, torch.float32, threads) * ranks,
            "mlp up [tok,h]x[h,f]": mm_flops(rows_tok, f, h, torch.float32, threads) * ranks,
            "mlp down [tok,f]x[f,h]": mm_flops(rows_tok, h, f, torch.float32, threads) * ranks,
        }
    bf16_peak = mm_flops(max(sizes), max(sizes), max(sizes), torch.bfloat16, T)
    print(f"  fp32 mm peak {peak / 1e9:.1f} GFLOP/s at {T} threads (1 thread: {peak_1t / 1e9:.1f}), "
          f"bf16 {bf16_peak / 1e9:.1f}", flush=True)

    rows = []
    n_layers = tiny["num_layers"]
    for lay in layouts:
        ranks, threads = map(int, lay.split("x"))
        cfg = C.pipeline_config(overrides, workdir / "store", f"bench-flops-{lay}")
        job = C.run_stage_job("sft", cfg, {"data": data}, nproc=ranks, threads=threads)
        m = job.metrics
        seq = 11
        flops = 6 * m["num_params"] * m["tokens_per_s"]
        attn = 12 * n_layers * h * seq * m["tokens_per_s"]
        model_shape_peak = min(shapes[lay].values())
        engine = C.engine_name(ranks, cfg.engine.zero_stage)
        rows.append({"trainer": f"sft stage job ({ranks}x{threads}, {engine} fp32)",
                     "params": m["num_params"], "tokens/s": m["tokens_per_s"], "GFLOP/s (6N)": flops / 1e9,
                     "GFLOP/s (+attn)": (flops + attn) / 1e9, "MFU vs mm peak": f"{flops / peak:.2%}",
                     "MFU vs model-shape mm": f"{flops / model_shape_peak:.1%}", "job_wall_s": job.wall_s,
                     "loop_s": m["train_seconds"]})
        print(f"  sft {lay}: {m['tokens_per_s']:.0f} tok/s -> {flops / 1e9:.2f} GFLOP/s", flush=True)
    ref = plain_torch_sft(tiny, args.batch, args.steps, T)
    flops = 6 * ref["num_params"] * ref["tokens_per_s"]
    rows.append({"trainer": f"plain torch loop in-process (1x{T}, fp32)", "params": ref["num_params"],
                 "tokens/s": ref["tokens_per_s"], "GFLOP/s (6N)": flops / 1e9,
                 "GFLOP/s (+attn)": (flops + 12 * n_layers * h * 11 * ref["tokens_per_s"]) / 1e9,
                 "MFU vs mm peak": f"{flops / peak:.2%}",
                 "MFU vs model-shape mm": f"{flops / min(shapes[layouts[0]].values()):.1%}", "loop_s": ref["seconds"]})
    for r in rows[:-1]:
        r["vs plain torch"] = r["tokens/s"] / ref["tokens_per_s"]

    peaks = [{"matmul": f"fp32 {s}x{s}x{s}", "threads": T, "GFLOP/s": v / 1e9} for s, v in square.items()]
    if T > 1:
        peaks += [{"matmul": f"fp32 {s}x{s}x{s}", "threads": 1, "GFLOP/s": peak_1t / 1e9} for s in [max(sizes)]]
    peaks += [{"matmul": f"bf16 {max(sizes)}^3", "threads": T, "GFLOP/s": bf16_peak / 1e9}]
    for lay, d in shapes.items():
        peaks += [{"matmul": f"fp32 {k} ({lay}, summed over ranks)", "threads": T, "GFLOP/s": v / 1e9}
                  for k, v in d.items()]
    print("\n## Matmul throughput on this machine\n")
    print(C.markdown_table(peaks))
    print("\n## SFT training FLOP/s (6 x params x tokens/s) against the fp32 peak\n")
    print(C.markdown_table(rows))
    path = C.write_results("flops", {"threads": T, "layouts": layouts, "steps": args.steps, "batch": args.batch,
                                     "peaks": peaks, "rows": rows, "fp32_peak_flops": peak})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
