"""Greedy generation in batches, for `generate`, `predict`, the evaluate stage and `lorafit evaluate`: prompts
are token ids rendered and tokenized as training did (prompt_ids, the one way every command asks a model),
left-padded for a decoder-only model so that every row continues at once, right-padded for an
encoder-decoder's source (absolute positions, as BART's, must not shift)."""

from __future__ import annotations

from lorafit import log
from lorafit.core.oom import in_batches
from lorafit.core.prompts import (FORMATS, chat_messages, chat_renderer, column, cut_source, encode, end_of_turn_ids,
                                  inference_prompt, seq2seq_tokens)
from lorafit.recipe import DataSpec


def is_chat(tokenizer, spec: DataSpec | None) -> bool:
    """Chat rendering: the recipe trained chat, or (without a recipe) the tokenizer has a template."""
    return spec.format == "chat" if spec else bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt: str | dict, tokenizer, spec: DataSpec | None, *, system: str | None = None,
                  loc: str = "prompt") -> str:
    """The text a model is asked: a free-text *prompt* (core.prompts.inference_prompt, *system* first for chat),
    or a data *row* (a dict, `predict`) up to where its response starts, by training's own format function
    (a response already in the row is not read)."""
    if not isinstance(prompt, dict):
        return inference_prompt(prompt, tokenizer, spec, system=system)
    row, cols = prompt, spec.columns
    if spec.format == "chat":  # the conversation up to its last user turn, and the generation prompt
        messages = row.get(cols.messages)
        if isinstance(messages, list):  # a reply already there is dropped; an empty one stands in for chat_messages
            if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
                messages = messages[:-1]
            row = {**row, cols.messages: list(messages) + [{"role": "assistant", "content": ""}]}
        return chat_renderer(spec, tokenizer)(chat_messages(row, loc, spec)[:-1], True, loc)
    if spec.format in ("alpaca", "completion"):
        response = cols.output if spec.format == "alpaca" else cols.completion
        segments = FORMATS[spec.format]({**row, response: ""}, loc, spec, None)
        return "".join(text for text, is_response in segments if not is_response)
    if spec.format == "seq2seq":  # the source alone: a target already there is not read
        return column(row, loc, spec, "source", "source text") or ""
    return column(row, loc, spec, "text", "prompt text") or ""


def prompt_tokens(text: str, tokenizer, spec: DataSpec | None, *, seq2seq: bool | None = None) -> list[int]:
    """Token ids of a rendered prompt, as training tokenized its rows: an encoder-decoder's source with the
    tokenizer's special tokens, cut to data.max_length keeping its closing EOS (core.prompts); else encode()
    (BOS once; a chat template taken as rendered). *seq2seq* None: the recipe's format decides."""
    if seq2seq is None:
        seq2seq = spec is not None and spec.format == "seq2seq"
    if seq2seq:
        ids = seq2seq_tokens([text], None, tokenizer)[0][0]
        return cut_source(ids, spec.max_length, tokenizer.eos_token_id) if spec is not None else ids
    return encode(text, tokenizer, chat=is_chat(tokenizer, spec))


def prompt_ids(prompt: str | dict, tokenizer, spec: DataSpec | None, *, system: str | None = None,
               seq2seq: bool | None = None, loc: str = "prompt") -> list[int]:
    """A prompt (free text, or a data row) as the model is asked it: render_prompt, then prompt_tokens. The one
    way `generate`, `predict` and the evaluate stage build a model's input."""
    return prompt_tokens(render_prompt(prompt, tokenizer, spec, system=system, loc=loc), tokenizer, spec,
                         seq2seq=seq2seq)


def stop_ids(tokenizer, spec: DataSpec | None) -> list[int]:
    """EOS, and for chat also the token that closes an assistant turn in the template trained on."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if is_chat(tokenizer, spec):
        stop += [i for i in end_of_turn_ids(tokenizer, spec) if i not in stop]
    return stop


def generate_greedy(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, stop: list[int],
                    batch_size: int = 8, desc: str = "generate") -> list[str]:
    """Greedy continuations of *prompts* (token ids), decoded up to the first stop id, stripped.

    A decoder-only model's batches are left-padded (a pad id under attention_mask 0), so each row's
    continuation starts right after its own last token; an encoder-decoder's sources are right-padded, so
    each keeps the positions it has alone (BART and mBART embed absolute positions, and the decoder starts
    afresh anyway). Rows are sorted by length first so a batch wastes little padding. A batch that runs out of
    memory is halved and the rest go on at that size (core.oom)."""
    import torch

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)

    def padded(row: list[int], fill, width: int) -> list:
        return list(row) + [fill] * (width - len(row)) if encoder_decoder else [fill] * (width - len(row)) + list(row)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)

    def run_batch(batch: list[int]) -> list[str]:
        width = max(len(prompts[i]) for i in batch)
        ids = torch.tensor([padded(prompts[i], pad, width) for i in batch], device=model.device)
        mask = torch.tensor([padded([1] * len(prompts[i]), 0, width) for i in batch], device=model.device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, temperature=None, top_p=None, top_k=None,
                                   eos_token_id=stop or None, pad_token_id=pad,
                                   use_cache=True)  # training may have turned the cache off
        # A decoder-only model returns prompt + continuation; an encoder-decoder the decoder's output
        # alone, opened by its start token (BART's is EOS: dropped before looking for a stop).
        new = generated[:, 1:] if encoder_decoder else generated[:, width:]
        texts = []
        for row in new.tolist():
            end = next((k for k, t in enumerate(row) if t in stop), len(row))
            texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
        return texts

    with log.Progress(desc, total=len(order), unit="row") as progress, torch.no_grad():
        texts = in_batches(order, batch_size, run_batch, what=desc, progress=progress)
    for i, text in zip(order, texts):
        out[i] = text
    return out
