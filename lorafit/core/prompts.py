"""Prompt formats: how a data row becomes text, for training and for inference alike.

Each ``data.format`` turns a row into (text, is_response) segments; the data stage tokenizes them and
trains on the response segments. Inference (generate, evaluate, verify) renders its prompt through the
same functions, so a model is always asked in exactly the text it was trained on.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from lorafit.errors import DataError
from lorafit.recipe import DataSpec

IGNORE = -100  # label of a token that is not trained on
ROLES = ("system", "user", "assistant")
# data.chat_template: chatml. The tokens must exist in the tokenizer's vocabulary.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), f"a number ({value!r})")


# ----------------------------------------------------------------------------------------------
# Checking rows: each format turns a row into (text, is_response) segments


def column(row: dict, loc: str, spec: DataSpec, key: str, what: str, optional: bool = False) -> str | None:
    name = getattr(spec.columns, key)
    if name not in row:
        if optional:
            return None
        close = difflib.get_close_matches(name, list(row), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise DataError(f"missing column '{name}' ({what}); the row has: {', '.join(map(str, row)) or 'nothing'}",
                        where=loc, fix=f"set data.columns.{key} to the column that holds the {what}{hint}")
    value = row[name]
    if optional and value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"column '{name}' must be a string, got {kind(value)}", where=loc,
                        fix=f"check data.format ({spec.format}) and data.columns.{key}")
    return value


def _text_segments(row, loc, spec, render):
    return [(column(row, loc, spec, "text", "text to train on"), True)]


def _alpaca_segments(row, loc, spec, render):
    instruction = column(row, loc, spec, "instruction", "instruction")
    extra = column(row, loc, spec, "input", "optional input", optional=True)
    output = column(row, loc, spec, "output", "response")
    if extra and extra.strip():
        prompt = spec.prompt_template.format(instruction=instruction, input=extra)
    else:
        prompt = spec.prompt_template_no_input.format(instruction=instruction)
    return [(prompt, False), (output, True)]


def _completion_segments(row, loc, spec, render):
    return [(column(row, loc, spec, "prompt", "prompt"), False),
            (column(row, loc, spec, "completion", "completion"), True)]


def _chat_segments(row, loc, spec, render):
    key = spec.columns.messages
    if key not in row:
        column(row, loc, spec, "messages", "list of {role, content} messages")
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"column '{key}' must be a non-empty list of {{role, content}} messages, "
                        f"got {kind(messages)}", where=loc)
    for n, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            got = json.dumps(m)[:80] if isinstance(m, dict) else kind(m)
            raise DataError(f"message {n} must be {{role, content}} with role system/user/assistant and "
                            f"string content, got {got}", where=loc,
                            fix="convert ShareGPT-style from/value (human/gpt) to role/content (user/assistant)")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError("conversation has no assistant turn: nothing to train on", where=loc,
                        fix="add an {\"role\": \"assistant\", \"content\": ...} message with the reply to learn, or drop the row")
    if turns[0] == 0:
        raise DataError("conversation starts with an assistant turn; there is no prompt to render it after",
                        where=loc, fix="start with a system or user message")
    # Render incrementally: what each assistant turn adds after the generation prompt is exactly
    # what the model must produce at inference. Messages after the last assistant turn train nothing.
    segments, done = [], ""
    for i in turns:
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(f"the chat template is not prefix-stable at message {i + 1}: rendering more messages "
                            "changes the text of earlier ones, so the assistant turn cannot be isolated",
                            where=loc, fix="set data.chat_template: chatml or a template that only appends")
        segments += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return segments


FORMATS = {"text": _text_segments, "alpaca": _alpaca_segments, "completion": _completion_segments,
           "chat": _chat_segments}


def infer_format(row: dict) -> str | None:
    """The format a row's default column names show, for data that comes without a recipe."""
    keys = set(row)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    return None


def chat_renderer(spec: DataSpec, tokenizer):
    if spec.chat_template:
        # Set on the tokenizer (which is saved with the adapter) so inference uses the template trained on.
        tokenizer.chat_template = CHATML if spec.chat_template == "chatml" else spec.chat_template
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template", where="data.chat_template",
                        fix="set data.chat_template: chatml or a Jinja template")

    def render(messages: list[dict], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() inside templates
            raise DataError(f"the chat template failed: {e}", where="data.chat_template",
                            fix="check the template, or set data.chat_template: chatml") from None
    return render


# ----------------------------------------------------------------------------------------------
# Inference


def inference_prompt(prompt: str, tokenizer, spec: DataSpec | None, *, system: str | None = None) -> str:
    """The text a model is asked at inference: the prompt part of a row whose response is still empty,
    rendered by the same format function as in training. Without a recipe: the chat template when the
    tokenizer has one, else the prompt as it is."""
    if spec is None:  # no training run to match: the model's own template, or the plain prompt
        if not getattr(tokenizer, "chat_template", None):
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cols = spec.columns
    fmt = spec.format
    if fmt == "alpaca":
        row = {cols.instruction: prompt, cols.output: ""}
    elif fmt == "completion":
        row = {cols.prompt: prompt, cols.completion: ""}
    elif fmt == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        row = {cols.messages: messages + [{"role": "assistant", "content": ""}]}
    else:  # text (and classification): the whole row is the input
        return prompt
    render = chat_renderer(spec, tokenizer) if fmt == "chat" else None
    return "".join(text for text, is_response in FORMATS[fmt](row, "prompt", spec, render) if not is_response)


def row_text(row: dict, spec: DataSpec, tokenizer, loc: str = "row") -> str:
    """A whole training row as the model reads it (prompt and response), e.g. to score a merged model."""
    render = chat_renderer(spec, tokenizer) if spec.format == "chat" else None
    if spec.format == "classification":
        return column(row, loc, spec, "text", "text to classify") or ""
    return "".join(text for text, _ in FORMATS[spec.format](row, loc, spec, render))


def encode(text: str, tokenizer) -> list[int]:
    """Token ids of *text* as training builds them: no special tokens but BOS, added once when the
    tokenizer adds one and the text (a rendered chat template) does not already start with it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = bos_id(tokenizer)
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def bos_id(tokenizer) -> int | None:
    """The BOS id when this tokenizer adds one (Llama-style), None when it does not (GPT-2 style)."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a").input_ids[:1] != [bos]:
        return None
    return bos
