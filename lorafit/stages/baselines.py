"""Baselines worth beating (evaluation.baselines): besides the base as prompted in training (zero_shot, the
`base` column), the base given k training rows as worked examples before each eval prompt (few_shot). A user
then sees whether a prompt alone would have done as well as the adapter.

The examples are k rows of the train split (the same k for every eval row, drawn with data.seed), rendered as
training rendered them: for chat, their user and assistant turns before the eval row's conversation, through
the same chat template; for alpaca and completion, each whole row (prompt and response) before the eval
row's prompt. Where prompt + max_new_tokens would pass the model's context, fewer examples are given, and
the note says on how many rows.
"""

from __future__ import annotations

import random

from lorafit.core.generation import prompt_tokens, render_prompt
from lorafit.core.prompts import FORMATS, chat_messages, chat_renderer
from lorafit.errors import DataError
from lorafit.recipe import EvaluationSpec

FEW_SHOT_K = 3
FORMATS_WITH_EXAMPLES = ("chat", "alpaca", "completion")


def few_shot_k(spec: EvaluationSpec) -> int | None:
    """k of evaluation.baselines' few_shot (few_shot:K), or None when it is not asked for."""
    for item in spec.baselines:
        name, _, k = item.partition(":")
        if name == "few_shot":
            return int(k) if k else FEW_SHOT_K
    return None


def few_shot_prompts(ctx, rows: list[int], k: int, max_new: int, context) -> tuple[list[list[int]] | None, str | None]:
    """(prompt ids per eval row in *rows*, a note or None): each eval row asked after k training rows as examples.
    None (and why) where the baseline cannot be built: no train rows as read, or a format without responses."""
    data = ctx.recipe.data
    if data.format not in FORMATS_WITH_EXAMPLES or data.train_on_inputs:
        return None, f"few_shot baseline not measured: data.format {data.format} has no responses to show as examples"
    if ctx.rows is None or ctx.train_rows is None or not len(ctx.train_rows):
        return None, "few_shot baseline not measured: the training rows are not at hand (evaluate --data)"
    rng = random.Random(data.seed)
    examples = [ctx.train_rows[i] for i in rng.sample(range(len(ctx.train_rows)), min(k, len(ctx.train_rows)))]
    limit = context[0] if context else None
    prompts, shrunk = [], {}
    for i in rows:
        for n in range(len(examples), -1, -1):
            ids = prompt_tokens(_few_shot_text(examples[:n], ctx.rows[i], ctx.tokenizer, data), ctx.tokenizer, data)
            if limit is None or len(ids) + max_new <= limit or n == 0:
                break
        if n < len(examples):
            shrunk[n] = shrunk.get(n, 0) + 1
        prompts.append(ids)
    note = None
    if shrunk:
        said = ", ".join(f"k={n} on {count} row{'s' if count != 1 else ''}" for n, count in sorted(shrunk.items()))
        note = (f"few_shot: fewer examples where prompt + max_new_tokens would pass the context ({limit:,} tokens): "
                f"{said}")
    return prompts, note


def _few_shot_text(examples: list[dict], row: dict, tokenizer, data) -> str:
    """The text the base is asked: the examples as training renders them, then *row*'s prompt."""
    if data.format == "chat":
        shown = []
        for n, example in enumerate(examples):
            try:
                shown += [m for m in chat_messages(example, f"few-shot example {n + 1}", data) if m["role"] != "system"]
            except DataError:
                continue
        messages = chat_messages(row, "eval row", data) if _has_reply(row, data) else list(row[data.columns.messages])
        messages = [m for m in messages]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        system = [m for m in messages[:1] if m["role"] == "system"]
        return chat_renderer(data, tokenizer)(system + shown + messages[len(system):], True, "few-shot prompt")
    whole = ["".join(text for text, _ in FORMATS[data.format](example, "few-shot example", data, None)).strip()
             for example in examples]
    asked = render_prompt(row, tokenizer, data, loc="eval row")
    return "".join(f"{text}\n\n" for text in whole) + asked


def _has_reply(row: dict, data) -> bool:
    messages = row.get(data.columns.messages)
    return isinstance(messages, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
