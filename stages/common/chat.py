"""Prompts and responses as the model sees them: the one place text becomes token ids.

data_prep renders every role's rows here and writes the ids beside the text; sft, reward_model,
dpo, generate and evaluate read those ids, score reads the rollouts' (generate's), and serving
renders a request's prompt here too. So a prompt is the same tokens in every stage.

With a chat template (model.chat_template), a prompt is the conversation before the assistant's
turn, rendered by `tokenizer.apply_chat_template(..., add_generation_prompt=True)`; a response is
the assistant's text and EOS (the end of its turn), so a prompt's ids followed by a response's are
the whole conversation the reward model scores. Without one, a prompt is its text after BOS.
"""

from __future__ import annotations

from typing import Union

Turn = dict  # {"role": "user" | "assistant" | "system", "content": str}
Prompt = Union[str, list[Turn]]  # a user's text, or the turns before the assistant's


class RenderError(ValueError):
    pass


def uses_template(tokenizer, setting: bool | None, where: str) -> bool:
    """model.chat_template: None means on exactly when the tokenizer has a template."""
    has = getattr(tokenizer, "chat_template", None) is not None
    if setting and not has:
        raise RenderError(f"model.chat_template is true, but the tokenizer of {where} has no chat template")
    return has if setting is None else setting


def render_prompt(tokenizer, prompt: Prompt, chat: bool) -> list[int]:
    """The token ids the model continues from."""
    if chat:
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote BOS, if any
    if not isinstance(prompt, str):
        raise RenderError("a prompt of chat turns needs a chat template (model.chat_template)")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def render_response(tokenizer, response: str) -> list[int]:
    """The response's ids, ending in EOS: the model learns to stop, and generation stops there."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def split_conversation(turns: list[Turn]) -> tuple[list[Turn], str]:
    """(the turns before the last assistant turn, that turn's text): a chat row as prompt and response.
    Earlier assistant turns are context, not trained on."""
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
            raise RenderError(f"turn {i} is not a {{role, content}} message: {str(turn)[:80]}")
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise RenderError("no assistant turn")
    if last == 0:
        raise RenderError("no turn before the assistant's (nothing to prompt with)")
    return turns[:last], turns[last]["content"]


def fit(ids: list[int], limit: int, keep: str) -> list[int]:
    """At most `limit` ids: a prompt keeps its end (the generation prompt), a response its start."""
    return ids[-limit:] if keep == "end" else ids[:limit]
