"""evaluate: held-out accuracy of a policy, greedy decoding, checked by the verifier.

Inputs   policy (checkpoint/), data (eval.parquet), reward_model (checkpoint/)
Output   predictions/part-{rank}.parquet   prompt_id, prompt, answer, response, correct, rm_reward
Metrics  accuracy, mean_reward (reward model), num_prompts

Greedy decoding makes the figure deterministic for a given checkpoint and thread count;
it is the metric the promotion gate compares.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stages.common import runtime
from stages.common.generation import HFBackend, Request
from stages.common.adapters import fetch_checkpoint, load_reward
from stages.common.models import pack_right
from stages.common.params import EvaluateParams
from stages.common.runtime import BadInput, StageContext, log
from stages.common.verifier import VERIFIERS


def run(ctx: StageContext[EvaluateParams]) -> dict:
    p = ctx.params
    verify = VERIFIERS[p.verifier]
    rows = pq.read_table(ctx.fetch("data", "eval.parquet")).to_pylist()
    if not rows:
        raise BadInput("evaluate: eval.parquet is empty")
    mine = [rows[i] for i in ctx.shard(len(rows))]
    trust = p.model.trust_remote_code
    checkpoint = fetch_checkpoint(ctx, "policy")  # a LoRA policy is merged into the base its adapter names
    policy = HFBackend(str(checkpoint.base_dir), str(ctx.device), trust_remote_code=trust,
                       batch_size=p.evaluate.batch_size, adapter_dirs=tuple(map(str, checkpoint.adapter_dirs)))
    tokenizer = policy.tokenizer
    prompt_ids = [r["prompt_ids"] for r in mine]  # rendered by data_prep, as generate's are
    ctx.first_step()
    samples = policy.generate(Request(prompt_ids, n=1, temperature=1.0, top_p=1.0, greedy=True,
                                      max_new_tokens=p.evaluate.max_new_tokens, seed=0))
    responses = [g[0] for g in samples]

    reward_model = load_reward(fetch_checkpoint(ctx, "reward_model"), ctx.workdir, trust).to(ctx.device).eval()
    rm_rewards = []
    with torch.no_grad():
        for i in range(0, len(mine), 256):
            ids, attn, _ = pack_right(prompt_ids[i:i + 256], [s.token_ids for s in responses[i:i + 256]],
                                      tokenizer.pad_token_id)
            rm_rewards += reward_model(input_ids=ids.to(ctx.device),
                                       attention_mask=attn.to(ctx.device)).logits.squeeze(-1).float().tolist()

    out = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "answer": r["answer"], "response": s.text,
            "correct": bool(verify(s.text, r["answer"])), "rm_reward": rm}
           for r, s, rm in zip(mine, responses, rm_rewards)]
    part = f"predictions/part-{ctx.rank:05d}.parquet"
    pq.write_table(pa.Table.from_pylist(out), ctx.out_path(part))
    ctx.save(part)

    n, correct, reward_sum = ctx.all_reduce_sum([len(out), sum(o["correct"] for o in out), sum(rm_rewards)])
    metrics = {"accuracy": correct / n, "mean_reward": reward_sum / n, "num_prompts": int(n)}
    if ctx.is_main:
        log(f"evaluate: accuracy {metrics['accuracy']:.4f} on {int(n)} held-out prompts (greedy)")
    return metrics


if __name__ == "__main__":
    runtime.main(run, EvaluateParams)
