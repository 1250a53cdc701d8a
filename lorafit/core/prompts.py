"""Prompt formats: how a data row becomes text, for training and for inference alike.

Each ``data.format`` turns a row into (text, is_response) segments; the data stage tokenizes them and
trains on the response segments. Inference (generate, evaluate, verify) renders its prompt through the
same functions, so a model is always asked in exactly the text it was trained on.
"""

from __future__ import annotations

import difflib
import json
import re
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
        other = infer_format(row)
        if other not in (None, spec.format, "text" if spec.format == "classification" else None):
            # the row is another format's, not a renamed column
            raise DataError(f"missing column '{name}' ({what}) of data.format {spec.format}; the row has: "
                            f"{', '.join(map(str, row))}, the columns of the {other} format", where=loc,
                            fix=f"set data.format: {other}")
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
        prompt = fill_template(spec.prompt_template, instruction=instruction, input=extra)
    else:
        prompt = fill_template(spec.prompt_template_no_input, instruction=instruction)
    return [(prompt, False), (output, True)]


_TEMPLATE_TOKEN = re.compile(r"\{\{|\}\}|\{(instruction|input)\}")


def fill_template(template: str, **values: str) -> str:
    """An alpaca prompt template with {instruction} and {input} filled in. Every other brace is literal text (a
    template may show JSON); ``{{`` and ``}}`` still stand for one brace, as in a str.format template."""
    def one(match) -> str:
        token = match.group(0)
        return token[0] if match.group(1) is None else values.get(match.group(1), token)

    return _TEMPLATE_TOKEN.sub(one, template)


def _completion_segments(row, loc, spec, render):
    return [(column(row, loc, spec, "prompt", "prompt"), False),
            (column(row, loc, spec, "completion", "completion"), True)]


def chat_messages(row, loc, spec) -> list[dict]:
    """A row's conversation, checked, up to its last assistant turn (what follows trains nothing)."""
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
    return [{"role": m["role"], "content": m["content"]} for m in messages[: turns[-1] + 1]]


def _seq2seq_segments(row, loc, spec, render):
    """The source is the encoder's input, the target the decoder's labels: two sequences, not one text."""
    return [(column(row, loc, spec, "source", "encoder input"), False),
            (column(row, loc, spec, "target", "target text to learn"), True)]


def seq2seq_pair(row: dict, spec: DataSpec, loc: str = "row") -> tuple[str, str]:
    """A seq2seq row's (source, target), checked."""
    (source, _), (target, _) = _seq2seq_segments(row, loc, spec, None)
    return source, target


FORMATS = {"text": _text_segments, "alpaca": _alpaca_segments, "completion": _completion_segments,
           "seq2seq": _seq2seq_segments}


# ----------------------------------------------------------------------------------------------
# Chat: the tokenizer's own template, rendered once for the whole conversation


def has_generation_markers(template: str | None) -> bool:
    """Templates with {% generation %} blocks let transformers mark the assistant tokens itself."""
    return bool(template) and re.search(r"{%-?\s*generation\s*-?%}", template) is not None


def chat_tokens(messages: list[dict], tokenizer, render, loc: str, *, train_on_inputs: bool = False):
    """(input_ids, labels) of one conversation: the ids are the tokenized full render (exactly what
    ``apply_chat_template(messages)`` gives); labels cover each assistant reply and its end-of-turn token.

    Templates with {% generation %} markers: transformers' assistant mask. Others: each assistant reply
    is located in the one full render (no prefix stability needed, so templates that move the system
    prompt, like Mistral v0.3's, work) and the special token that closes it is found after it."""
    text = render(messages, False, loc)
    if has_generation_markers(getattr(tokenizer, "chat_template", None)):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        if not any(mask):
            raise DataError("the chat template's {% generation %} blocks marked no assistant token", where=loc,
                            fix=template_fix(tokenizer))
    else:
        spans = assistant_spans(text, messages, tokenizer, loc)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        # A token overlapping a reply is the model's to produce (" Bonjour" after "[/INST]" takes the space).
        mask = [any(a < end and b > start for start, end in spans) for a, b in enc["offset_mapping"]]
    labels = list(ids) if train_on_inputs else [t if m else IGNORE for t, m in zip(ids, mask)]
    return ids, labels


def special_tokens(tokenizer) -> list[str]:
    """Every special / added token's text, longest first (for matching in rendered text)."""
    found = set(tokenizer.all_special_tokens)
    found.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    return sorted((t for t in found if t), key=len, reverse=True)


def assistant_spans(text: str, messages: list[dict], tokenizer, loc: str) -> list[tuple[int, int]]:
    """Character spans of each assistant reply in the full render, each with its end-of-turn token."""
    specials = special_tokens(tokenizer)
    spans, cursor = [], 0
    for n, m in enumerate(messages, 1):
        content = m["content"].strip()  # templates often trim
        if m["role"] != "assistant":
            # Move past the prompt text, so a reply that repeats words of the prompt is found after it.
            # (Mistral v0.3 renders the system prompt late: only user turns move the cursor.)
            at = text.find(content, cursor) if content and m["role"] == "user" else -1
            cursor = at + len(content) if at >= 0 else cursor
            continue
        start = text.find(content, cursor) if content else cursor
        if start < 0:
            raise DataError(f"the chat template does not render assistant message {n} as written, so its "
                            "tokens cannot be located", where=loc, fix=template_fix(tokenizer))
        end = start + len(content)
        after = re.match(r"[ \t]*", text[end:]).end() + end
        closing = next((t for t in specials if text.startswith(t, after)), None)
        if closing is None:
            raise DataError(f"the chat template ends assistant message {n} without a special end-of-turn token: "
                            "the model would never learn to stop", where=loc, fix=template_fix(tokenizer))
        spans.append((start, after + len(closing)))
        cursor = after + len(closing)
    return spans


def template_fix(tokenizer) -> str:
    """A fix that works with this tokenizer: never a template whose special tokens it lacks."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "set data.chat_template: chatml (this tokenizer has its tokens)"
    eos = tokenizer.eos_token or "its EOS token"
    return (f"set data.chat_template to a Jinja template that writes each message's content unchanged and ends "
            f"assistant turns with {eos}, or use data.format: completion")


def end_of_turn_ids(tokenizer, spec: DataSpec | None = None) -> list[int]:
    """Token ids that end an assistant turn in this tokenizer's chat template (to stop generation)."""
    if not getattr(tokenizer, "chat_template", None) and not (spec and spec.chat_template):
        return []
    try:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
        render = chat_renderer(spec or DataSpec(train="-", format="chat"), tokenizer)
        text = render(messages, False)
        start, end = assistant_spans(text, messages, tokenizer, "template")[-1]
    except DataError:
        return []
    closing = text[start + len("Yes"):end].strip()
    vocab = tokenizer.get_vocab()
    return [vocab[closing]] if closing in vocab else []


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
    if {"tokens", "tags"} <= keys:
        return "tokens"
    if {"source", "target"} <= keys:
        return "seq2seq"
    if "text" in keys:
        return "text"
    return None


def chat_renderer(spec: DataSpec, tokenizer):
    if spec.chat_template:
        # Set on the tokenizer (which is saved with the adapter) so inference uses the template trained on.
        tokenizer.chat_template = CHATML if spec.chat_template == "chatml" else spec.chat_template
    if not tokenizer.chat_template:
        raise DataError("the tokenizer has no chat template", where="data.chat_template",
                        fix=template_fix(tokenizer))

    def render(messages: list[dict], generation_prompt: bool, loc: str = "data.chat_template") -> str:
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja errors, raise_exception() inside templates
            if any(m["role"] == "system" for m in messages) and "system" in str(e).lower():
                fix = "this template has no system role: fold the system message into the first user message"
            else:
                fix = template_fix(tokenizer)
            raise DataError(f"the chat template failed: {e}", where=loc, fix=fix) from None
    return render


# ----------------------------------------------------------------------------------------------
# Inference


def inference_prompt(prompt: str, tokenizer, spec: DataSpec | None, *, system: str | None = None) -> str:
    """The text a model is asked at inference: the prompt part of a row whose response is still empty,
    rendered by the same format function as in training. Without a recipe: the chat template when the
    tokenizer has one, else the prompt as it is."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if spec is None:  # no training run to match: the model's own template, or the plain prompt
        if not getattr(tokenizer, "chat_template", None):
            return prompt
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cols = spec.columns
    fmt = spec.format
    if fmt == "chat":  # the conversation so far and the template's generation prompt, as trained
        return chat_renderer(spec, tokenizer)(messages, True)
    if fmt == "alpaca":
        row = {cols.instruction: prompt, cols.output: ""}
    elif fmt == "completion":
        row = {cols.prompt: prompt, cols.completion: ""}
    elif fmt == "seq2seq":  # the encoder reads the source as it is
        return prompt
    else:  # text (and classification): the whole row is the input
        return prompt
    return "".join(text for text, is_response in FORMATS[fmt](row, "prompt", spec, None) if not is_response)


def row_text(row: dict, spec: DataSpec, tokenizer, loc: str = "row") -> str:
    """A whole training row as the model reads it (prompt and response), e.g. to score a merged model."""
    if spec.format == "chat":
        return chat_renderer(spec, tokenizer)(chat_messages(row, loc, spec), False)
    if spec.format == "classification":
        return column(row, loc, spec, "text", "text to classify") or ""
    if spec.format == "tokens":  # the words as running text (merge --verify scores the whole sequence)
        words = row.get(spec.columns.tokens)
        return " ".join(w for w in words if isinstance(w, str)) if isinstance(words, list) else ""
    return "".join(text for text, _ in FORMATS[spec.format](row, loc, spec, None))


def user_turn(row: dict, spec: DataSpec) -> str:
    """A row's prompt as the user wrote it, for previews (report samples, failures, eval_predictions.jsonl): the
    last user message before the reply (chat), the instruction and its input (alpaca), the prompt (completion),
    the source (seq2seq), the text (text, classification), the words (tokens); never a template's boilerplate
    or a default system prompt. A row that does not read as its format gives "" (it was checked at training)."""
    cols = spec.columns
    get = lambda key: row.get(getattr(cols, key)) if isinstance(row.get(getattr(cols, key)), str) else ""  # noqa: E731
    if spec.format == "chat":
        messages = row.get(cols.messages) if isinstance(row.get(cols.messages), list) else []
        turns = [m for m in messages if isinstance(m, dict)]
        last = max((i for i, m in enumerate(turns) if m.get("role") == "assistant"), default=len(turns))
        users = [m.get("content") for m in turns[:last] if m.get("role") == "user" and isinstance(m.get("content"), str)]
        return users[-1] if users else ""
    if spec.format == "alpaca":
        extra = get("input")
        return get("instruction") + (f"\n\n{extra}" if extra.strip() else "")
    if spec.format == "completion":
        return get("prompt")
    if spec.format == "seq2seq":
        return get("source")
    if spec.format == "tokens":
        words = row.get(cols.tokens)
        return " ".join(w for w in words if isinstance(w, str)) if isinstance(words, list) else ""
    return get("text")


def encode(text: str, tokenizer, *, chat: bool = False) -> list[int]:
    """Token ids of *text* as training builds them: no special tokens but BOS, added once when the
    tokenizer adds one and the text does not already start with it. A rendered chat template is taken
    as it is (the template decides about BOS, as apply_chat_template does)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if chat:
        return ids
    bos = bos_id(tokenizer)
    return ids if bos is None or ids[:1] == [bos] else [bos] + ids


def seq2seq_tokens(sources: list[str], targets: list[str] | None, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Encoder ids and labels of seq2seq rows, untruncated, as training builds them: the source with the
    tokenizer's own special tokens (T5 closes it with EOS, BART wraps it in <s> ... </s>, as pre-training
    did), the target through ``text_target`` with EOS last, so the model learns where to stop."""
    inputs = tokenizer(list(sources))["input_ids"] if sources else []
    if targets is None:
        return inputs, []
    labels = tokenizer(text_target=list(targets))["input_ids"] if targets else []
    eos = tokenizer.eos_token_id
    if eos is not None:  # a tokenizer without a post-processor adds nothing: EOS must still be learnt
        labels = [ids if ids[-1:] == [eos] else ids + [eos] for ids in labels]
    return inputs, labels


def cut_source(ids: list[int], max_length: int, eos: int | None) -> list[int]:
    """A seq2seq source cut to *max_length*, keeping its closing EOS (the encoder was pre-trained on closed
    inputs): training's cut, and inference's."""
    if len(ids) > max_length and eos is not None and ids[-1:] == [eos]:
        return ids[: max_length - 1] + ids[-1:]
    return ids[:max_length]


def bos_id(tokenizer) -> int | None:
    """The BOS id when this tokenizer adds one (Llama-style), None when it does not (GPT-2 style)."""
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer("a").input_ids[:1] != [bos]:
        return None
    return bos
