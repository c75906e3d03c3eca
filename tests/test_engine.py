"""The training engine of one process (stages/common/engine.py: plain torch, DeepSpeed's recipe) and
the batches every trainer packs (stages/common/models.py: pack_right)."""

import copy

import torch

from stages.common.engine import TorchEngine, linear_warmup, make_engine
from stages.common.models import pack_right
from stages.common.sections import EngineConfig


def test_pack_right_lays_out_prompt_response_and_padding():
    ids, attn, mask = pack_right([[5, 6], [7], [8, 9, 4]], [[1, 2, 3], [], [2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 1, 2, 3], [7, 0, 0, 0, 0], [8, 9, 4, 2, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 1, 0]]
    assert (ids.dtype, attn.dtype, mask.dtype) == (torch.long, torch.long, torch.float32)


def toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def test_one_process_trains_with_the_deepspeed_recipe_in_plain_torch():
    """No process group (a world of one): make_engine gives the plain-torch engine, whose step is
    DeepSpeed's: clip the global norm, AdamW, zero the gradients, then the LR scheduler."""
    assert not torch.distributed.is_initialized()
    model = toy_model()
    twin = copy.deepcopy(model)
    engine, optimizer, scheduler = make_engine(model, EngineConfig(gradient_clipping=0.5, dtype="fp32"), lr=1e-2,
                                               micro_batch=4, weight_decay=0.1, warmup_steps=2, total_steps=10)
    assert isinstance(engine, TorchEngine) and engine.module is model and engine.optimizer is optimizer
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    twin_sched = linear_warmup(twin_opt, 2, 10)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(4, 8, generator=g) * 10  # large inputs: the clipping takes effect
        engine.backward(engine(x).pow(2).mean())
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert norm > 0.5, "the test must exercise clipping"
        lr_before = engine.get_lr()
        engine.step()
        twin(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=True)
        assert lr_before == [twin_sched.get_last_lr()[0]]
        twin_sched.step()
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), step
    assert scheduler.last_epoch == 5


def test_one_process_bf16_is_autocast_over_fp32_weights():
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    engine, _, _ = make_engine(model, EngineConfig(dtype="bf16"), lr=1e-2, micro_batch=4)
    out = engine(torch.randn(4, 8))
    assert out.dtype == torch.bfloat16
    engine.backward(out.float().pow(2).mean())
    engine.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    engine.eval()
    assert not model.training
