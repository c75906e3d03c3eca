"""The sft stage trains exactly the plain-PyTorch recipe: loss on the response tokens + EOS only
(token mean), AdamW(0.9, 0.95), clipping at 1.0, warmup then linear decay to 10%, the seeded
batch draw, and ZeRO-2 over 2 ranks changing nothing but float rounding; one process trains the
same recipe in plain torch (stages/common/engine.py: TorchEngine).

Issue 18: our SFT ended at 3x TRL's final loss. The cause was not the stage: its steps equal this
reference to float rounding. This test guards that: a wrong set of trained tokens (prompt, BOS,
padding), another averaging, another schedule or a ZeRO gradient bug moves the logged losses or
the weights far past the tolerance.
"""

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stages.common import store
from stages.common.models import build_tiny_model, encode_prompts, encode_responses, load_tokenizer
from tasks.config import parse_config
from tasks.launch import job_env, run_job, torchrun_command
from tests.conftest import small_config
from tests.test_resume import write_spec

STEPS, LOG_EVERY = 12, 4


def response_loss(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over every response token (EOS included), nothing else: built from the
    lengths, without the stage's pack_right or the model's `labels` path."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attn[i, : len(p) + len(r)] = 1
    logp = F.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), dim=-1)
    terms = [-logp[i, t - 1, ids[i, t]] for i, (p, r) in enumerate(zip(prompts, responses))
             for t in range(len(p), len(p) + len(r))]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("nproc", [2, 1])
def test_sft_job_trains_the_plain_torch_recipe(tmp_path, nproc):
    cfg = parse_config(small_config(tmp_path, **{"sft.steps": STEPS, "sft.log_every": LOG_EVERY,
                                                 "sft.warmup_steps": 3, "sft.save_every": 5}))
    assert cfg.engine.zero_stage == 2 and cfg.launch.nproc_per_node == 2
    env, logs = job_env(nproc), []
    run_job(torchrun_command("data_prep", write_spec(cfg, "data_prep", "d", {}), nproc), timeout_s=300,
            log_line=logs.append, env=env)
    data = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, "data_prep", "d"))
    run_job(torchrun_command("sft", write_spec(cfg, "sft", "s", {"data": data.uri}), nproc), timeout_s=300,
            log_line=logs.append, env=env)
    sft = store.read_artifact(store.join(cfg.storage_root(), cfg.pipeline, "sft", "s"))

    # The reference, in this process, from the same data and tokenizer.
    tokenizer = load_tokenizer(store.download_dir(data, "tokenizer", tmp_path / "tok"))
    table = pq.read_table(store.download(data, "sft.parquet", tmp_path / "d")).to_pylist()
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in table])
    responses = encode_responses(tokenizer, [r["response"] for r in table])
    assert all(r[-1] == tokenizer.eos_token_id and tokenizer.bos_token_id not in r for r in responses)
    s = cfg.sft
    model = build_tiny_model(cfg.model.tiny, tokenizer, seed=cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    # warmup to the peak, then linear decay to 10% of it (written out here, not engine.linear_warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: (k + 1) / s.warmup_steps if k < s.warmup_steps
                                                  else 1 - 0.9 * (k - s.warmup_steps) / (s.steps - s.warmup_steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    window, expected = [], {}
    for step in range(s.steps):
        batch = torch.randint(len(table), (s.batch_size,), generator=gen).tolist()
        loss = response_loss(model, [prompts[i] for i in batch], [responses[i] for i in batch],
                             tokenizer.pad_token_id)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.engine.gradient_clipping)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if (step + 1) % LOG_EVERY == 0:
            expected[step + 1] = sum(window) / len(window)
            window = []

    logged = {}
    for line in logs:
        if "sft step " in line:
            words = line[line.index("sft step "):].split()
            logged[int(words[2].split("/")[0])] = float(words[4])
    assert sorted(logged) == sorted(expected)
    for step, value in expected.items():  # the stage logs 4 decimals
        assert abs(logged[step] - value) < 1e-4, (step, logged[step], value)
    assert abs(sft.metrics["loss"] - expected[STEPS]) < 1e-5
    assert expected[STEPS] < expected[LOG_EVERY] - 0.1  # it learns: the comparison is not of two frozen models

    trained = load_file(str(store.download(sft, "checkpoint/model.safetensors", tmp_path / "ckpt")))
    reference = model.state_dict()
    initial = build_tiny_model(cfg.model.tiny, tokenizer, seed=cfg.seed).state_dict()
    assert set(trained) <= set(reference) and "model.embed_tokens.weight" in trained
    for name, weight in trained.items():
        moved = float((reference[name] - initial[name]).abs().max())  # how far training took it
        diff = float((weight - reference[name]).abs().max())
        assert moved > 1e-3 and diff < 1e-5, (name, diff, moved)
