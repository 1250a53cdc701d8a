"""causal_lm and seq2seq_lm rows → tokens: prompt / response text (text, alpaca, completion, chat) or
source / target (seq2seq).

Rows of text / alpaca / completion data become (text, is_response) segments; each segment is tokenized
on its own without special tokens and the ids are concatenated, because at inference the prompt is
tokenized alone: tokenizing prompt+response in one go can merge tokens across the boundary and teach a
split never seen later. Chat rows are the tokenizer's own template rendered once for the whole
conversation, labels on each assistant reply and its end-of-turn token (core.prompts.chat_tokens).
Labels are built explicitly (never derived from pad positions), so a real EOS survives pad == eos.
"""

from __future__ import annotations

from lorafit.core.prompts import (FORMATS, IGNORE, bos_id, chat_messages, chat_renderer, chat_tokens, cut_source,
                                  seq2seq_tokens)
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data.read import Source, Tokenized, fingerprint


def tokenize(sources: list[Source], spec: DataSpec, tokenizer, *, num_labels: int | None = None,
             label_names: list[str] | None = None) -> Tokenized:
    """Every source's rows as input_ids + labels (no classes: *num_labels* and *label_names* are unused)."""
    eos = tokenizer.eos_token_id
    bos = bos_id(tokenizer)  # None when this tokenizer adds no BOS (GPT-2 style): neither do we
    parts, truncated, dropped, lengths, eos_cut = [], 0, [], [], []
    for src in sources:
        ds, t, d, found = _causal_dataset(src, spec, tokenizer, bos, eos)
        parts.append(ds)
        truncated, dropped = truncated + t, dropped + d
        lengths += found["lengths"]
        eos_cut += found["eos_cut"]
    return Tokenized(parts, None, truncated, dropped, lengths, eos_cut)


def _tokenize_causal(batch: dict, tokenizer, spec: DataSpec, bos: int | None, eos: int | None) -> dict:
    """Segments (text / alpaca / completion) → ids + labels: each segment tokenized alone, BOS once, EOS learnt."""
    flat = [t for texts in batch["texts"] for t in texts]
    ids_flat = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    out = {"input_ids": [], "labels": [], "truncated": [], "masked": [], "length": [], "eos_cut": []}
    for responses in batch["is_response"]:
        ids, labels = [], []
        pieces = [next(ids_flat) for _ in responses]
        if bos is not None and not (pieces and pieces[0] and pieces[0][0] == bos):
            ids, labels = [bos], [IGNORE]
        for piece, is_response in zip(pieces, responses):
            ids += piece
            labels += piece if (is_response or spec.train_on_inputs) else [IGNORE] * len(piece)
        last = pieces[-1] if pieces else []
        # The end of the response must be learnt or the model never stops.
        if eos is not None and not (last and last[-1] == eos):
            ids, labels = ids + [eos], labels + [eos]
        _finish(out, ids, labels, spec)
    return out


def _tokenize_seq2seq(batch: dict, tokenizer, spec: DataSpec, bos: int | None, eos: int | None) -> dict:
    """(source, target) segments → encoder input_ids and decoder labels (core.prompts.seq2seq_tokens), each
    cut to data.max_length: the source keeps its closing EOS (the encoder was pre-trained on closed inputs);
    a target cut loses its EOS, counted like a causal row's (eos_cut)."""
    inputs, targets = seq2seq_tokens([t[0] for t in batch["texts"]], [t[1] for t in batch["texts"]], tokenizer)
    out = {"input_ids": [], "labels": [], "truncated": [], "masked": [], "length": [], "eos_cut": []}
    n = spec.max_length
    for ids, labels in zip(inputs, targets):
        out["truncated"].append(len(ids) > n or len(labels) > n)
        out["length"].append(max(len(ids), len(labels)))
        out["eos_cut"].append(len(labels) > n)
        out["input_ids"].append(cut_source(ids, n, eos))
        out["labels"].append(labels[:n])  # every target token is trained: the decoder predicts all of them
        out["masked"].append(not labels)
    return out


def _finish_chat(batch: dict, spec: DataSpec) -> dict:
    out = {"truncated": [], "masked": [], "input_ids": [], "labels": [], "length": [], "eos_cut": []}
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        _finish(out, list(ids), list(labels), spec)
    return out


def _finish(out: dict, ids: list[int], labels: list[int], spec: DataSpec) -> None:
    """Truncate to data.max_length and note what that did; the first token is never a label."""
    if labels:
        labels[0] = IGNORE  # nothing predicts the first token: a label there only inflates counts
    out["truncated"].append(len(ids) > spec.max_length)
    out["length"].append(len(ids))
    # The last trained token (EOS, or the chat end-of-turn) past max_length: the row still trains, but
    # teaches the model to go on where it should stop.
    last = max((i for i, x in enumerate(labels) if x != IGNORE), default=-1)
    ids, labels = ids[: spec.max_length], labels[: spec.max_length]
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    masked = all(x == IGNORE for x in labels)
    out["masked"].append(masked)
    out["eos_cut"].append(last >= spec.max_length and not masked)


def _causal_dataset(src: Source, spec: DataSpec, tokenizer, bos, eos):
    import datasets

    chat = spec.format == "chat"
    render = chat_renderer(spec, tokenizer) if chat else None
    if isinstance(src.rows, list):
        records = datasets.Dataset.from_dict(_prepare_rows(src.rows, src.locs, spec, tokenizer, render,
                                                           list(range(len(src.rows)))))
    else:  # a hub dataset: prepared by datasets itself, in parallel when it is large
        records = src.rows.map(
            lambda batch, idx: _prepare_rows([dict(zip(batch, v)) for v in zip(*batch.values())],
                                             [src.locs[i] for i in idx], spec, tokenizer, render, list(idx)),
            batched=True, with_indices=True, remove_columns=src.rows.column_names,
            num_proc=_num_proc(len(src.rows)), new_fingerprint=fingerprint(src, spec, tokenizer) + "-format",
            desc="format")
    if chat:
        ds = records.map(_finish_chat, batched=True, fn_kwargs=dict(spec=spec),
                         new_fingerprint=fingerprint(src, spec, tokenizer), desc="tokenize")
    else:
        tokenize = _tokenize_seq2seq if spec.format == "seq2seq" else _tokenize_causal
        ds = records.map(tokenize, batched=True, remove_columns=["texts", "is_response"],
                         fn_kwargs=dict(tokenizer=tokenizer, spec=spec, bos=bos, eos=eos),
                         new_fingerprint=fingerprint(src, spec, tokenizer), desc="tokenize")
    truncated, masked = sum(ds["truncated"]), ds["masked"]
    dropped = [loc for loc, m in zip(ds["loc"], masked) if m]
    doctor = {"lengths": list(ds["length"]), "eos_cut": [loc for loc, c in zip(ds["loc"], ds["eos_cut"]) if c]}
    ds = ds.filter(lambda m: not m, input_columns="masked") if dropped else ds
    ds = ds.remove_columns(["truncated", "masked", "loc", "length", "eos_cut"])
    if len(ds) == 0:
        goal = "train on" if src.name == spec.train else "evaluate"
        raise DataError(f"nothing to {goal}: all {len(src.rows)} rows have no response tokens left within "
                        f"data.max_length={spec.max_length}", where=src.name,
                        fix="raise data.max_length or shorten the prompts")
    return ds, truncated, dropped, doctor


def _prepare_rows(rows: list[dict], locs: list[str], spec: DataSpec, tokenizer, render, index: list[int]) -> dict:
    """Rows → columns, through core.prompts: chat rows straight to input_ids / labels (the template's
    own render); other formats to texts / is_response segments, tokenized next. *index*: each row's place in
    its source ("row", kept through the split: evaluation shows the row as the user wrote it)."""
    if spec.format == "chat":
        out = {"input_ids": [], "labels": [], "loc": list(locs), "row": list(index)}
        for row, loc in zip(rows, locs):
            ids, labels = chat_tokens(chat_messages(row, loc, spec), tokenizer, render, loc,
                                      train_on_inputs=spec.train_on_inputs)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out
    to_segments = FORMATS[spec.format]
    out = {"texts": [], "is_response": [], "loc": list(locs), "row": list(index)}
    for row, loc in zip(rows, locs):
        segments = to_segments(row, loc, spec, render)
        out["texts"].append([t for t, _ in segments])
        out["is_response"].append([r for _, r in segments])
    return out


def _num_proc(rows: int) -> int | None:
    """Worker processes for datasets.map: worth their start-up only on large data."""
    import os

    return min(8, os.cpu_count() or 1) if rows >= 50_000 and (os.cpu_count() or 1) > 1 else None
