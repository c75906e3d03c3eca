"""Models and tokenizers: build the tiny one from a config, load any from safetensors.

Loading never executes code from an artifact: `use_safetensors=True` and
`trust_remote_code` only when the config says so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .sections import TinyModelConfig

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"


def train_char_tokenizer(texts: list[str]):
    """A character-level tokenizer trained on the data with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, EOS], min_frequency=1)
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def build_tiny_model(tiny: TinyModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # many causal LMs ship without one; padding is masked out, any id will do
        tok.pad_token = tok.eos_token
        print(f"tokenizer of {path}: no pad token, using EOS ({tok.eos_token!r})", flush=True)
    return tok


def load_causal_lm(path: str | Path, trust_remote_code: bool = False, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def load_reward_model(path: str | Path, trust_remote_code: bool = False, dtype=torch.float32, init_head=False):
    """A scalar-head sequence classifier; `init_head` when starting from a causal LM."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), num_labels=1, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    if init_head:  # a small head so the initial rewards are ~0 and BT gradients are sane
        torch.nn.init.normal_(model.score.weight, std=1e-3)
    return model


def save_checkpoint(model, tokenizer, out_dir: str | Path) -> None:
    """A Hugging Face directory with safetensors weights (never pickles)."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def encode_responses(tokenizer, responses: list[str]) -> list[list[int]]:
    """Response tokens end with EOS: the model learns to stop."""
    return [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in responses]


def pack_right(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """[prompt][response][pad...] rows; returns input_ids, attention_mask, response_mask.

    response_mask[i, t] is 1 where token t is a response token, i.e. where the model's
    prediction from position t-1 is trained/scored.
    """
    rows = [p + r for p, r in zip(prompts, responses)]
    width = max(len(row) for row in rows)
    # One tensor from padded lists and the masks from the lengths: a per-row loop of tensor writes
    # cost ~1 ms per 64 rows, ~1.5% of a tiny SFT step.
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
    position = torch.arange(width)
    ends = torch.tensor([len(row) for row in rows]).unsqueeze(1)
    starts = torch.tensor([len(p) for p in prompts]).unsqueeze(1)
    attention = (position < ends).long()
    response_mask = ((position >= starts) & (position < ends)).float()
    return input_ids, attention, response_mask


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0):
    """log p(token_t | tokens_<t) for every position t >= 1 (position 0 gets 0).

    Logits are divided by the sampling temperature, as the generator's processed
    logprobs are, so the first PPO/GRPO ratio is exactly 1.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logp = F.log_softmax(logits / temperature, dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0))
