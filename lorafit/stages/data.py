"""Data stage: read rows, check them against ``data.format``, tokenize into input_ids + labels.

Rows of text / alpaca / completion data become (text, is_response) segments; each segment is tokenized
on its own without special tokens and the ids are concatenated, because at inference the prompt is
tokenized alone: tokenizing prompt+response in one go can merge tokens across the boundary and teach a
split never seen later. Chat rows are the tokenizer's own template rendered once for the whole
conversation, labels on each assistant reply and its end-of-turn token (core.prompts.chat_tokens).
Labels are built explicitly (never derived from pad positions), so a real EOS survives pad == eos.

Files are read as bytes and parsed here rather than by ``datasets``, so that every bad row is
reported as ``file:line``. ``datasets``/``torch`` are imported inside functions: the CLI starts fast.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lorafit import log
from lorafit.core.models import is_hub_id
from lorafit.core.prompts import (FORMATS, IGNORE, bos_id, chat_messages, chat_renderer, chat_tokens, column,
                                  cut_source, kind, seq2seq_tokens)
from lorafit.errors import DataError
from lorafit.recipe import DataSpec

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_READ_FIX = "give a .jsonl, .json, .csv or .parquet file, or a hub dataset id (owner/name)"


@dataclass
class DataBundle:
    train: Any                          # datasets.Dataset: input_ids, labels
    eval: Any | None
    collator: Callable
    stats: dict
    label_names: list[str] | None


@dataclass
class _Source:
    rows: Any                           # list[dict] of a local file; a datasets.Dataset for a hub dataset
    locs: list[str]                     # "file:line" of each row, for error messages
    digest: bytes                       # sha256 of the file bytes (the dataset's fingerprint for a hub dataset)
    name: str


# ----------------------------------------------------------------------------------------------
# Reading


def read_rows(path: str, *, where: str = "data.train", split: str = "train") -> list[dict]:
    """The rows of a local .jsonl/.json/.csv/.parquet file or of a cached hub dataset (as dicts)."""
    rows = _read(path, where, split).rows
    return rows if isinstance(rows, list) else rows.to_list()


def read_located(path: str, *, where: str = "data.train", split: str = "train") -> tuple[list[dict], list[str]]:
    """(rows, their "file:line" locations), for commands that check rows one by one (predict)."""
    src = _read(path, where, split)
    return (src.rows if isinstance(src.rows, list) else src.rows.to_list()), src.locs


def _read(path: str, where: str, split: str) -> _Source:
    p = Path(path)
    if not p.exists():
        if not p.suffix and "/" in path and is_hub_id(path):
            return _read_hub(path, where, split)
        import difflib

        folder = p.parent if p.parent.is_dir() else None
        near = difflib.get_close_matches(p.name, [f.name for f in folder.iterdir() if f.is_file()], n=1,
                                         cutoff=0.75) if folder is not None else []
        if near:
            raise DataError(f"file not found: {path}", where=where, fix=f"did you mean {folder / near[0]}?")
        raise DataError(f"file not found: {path}" + ("" if folder is not None else f" (no folder {p.parent})"),
                        where=where, fix=_READ_FIX)
    if p.is_dir():
        raise DataError(f"{path} is a directory", where=where, fix=_READ_FIX)
    suffix = p.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"unsupported file type '{suffix or p.name}'", where=where, fix=_READ_FIX)
    data = p.read_bytes()
    if suffix == ".parquet":
        rows, locs = _read_parquet(p)
    else:
        text = _decode(data, path)
        if suffix == ".csv":
            rows, locs = _read_csv(text, path)
        elif suffix == ".json" and text.lstrip().startswith("["):
            rows, locs = _read_json_array(text, path)
        else:
            rows, locs = _read_json_lines(text, path)
    if not rows:
        what = "is empty" if not data.strip() else "holds no rows"
        raise DataError(f"no rows: the file {what}", where=path, fix="add training examples, one per line")
    return _Source(rows, locs, hashlib.sha256(data).digest(), path)


def _decode(data: bytes, path: str) -> str:
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM, as Excel writes it
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8: byte 0x{data[e.start]:02x} at byte {e.start - line_start + 1} "
                        f"of the line ({e.reason})", where=f"{path}:{line}",
                        fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_json_lines(text: str, path: str) -> tuple[list[dict], list[str]]:
    rows, locs = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{n}",
                            fix="each line must be one complete JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object ({{...}}), got {kind(row)}", where=f"{path}:{n}",
                            fix="each line must be one JSON object with the data.columns as keys")
        rows.append(row)
        locs.append(f"{path}:{n}")
    return rows, locs


def _read_json_array(text: str, path: str) -> tuple[list[dict], list[str]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} (column {e.colno})", where=f"{path}:{e.lineno}",
                        fix="a .json file holds one JSON array of objects, or one object per line") from None
    # Walk the (valid) array once more to learn the line each element starts on.
    decoder, ws = json.JSONDecoder(), re.compile(r"[ \t\r\n]*")
    i, line, prev = text.index("[") + 1, 1, 0
    locs = []
    for item in items:
        i = ws.match(text, i).end()
        line += text.count("\n", prev, i)
        prev = i
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object ({{...}}), got {kind(item)}", where=f"{path}:{line}",
                            fix="the array must hold one object per example")
        locs.append(f"{path}:{line}")
        _, i = decoder.raw_decode(text, i)
        i = ws.match(text, i).end() + 1  # past the comma
    return items, locs


def _read_csv(text: str, path: str) -> tuple[list[dict], list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, locs = [], []
    for row in reader:
        if None in row:
            raise DataError(f"row has more fields than the header ({len(reader.fieldnames)})",
                            where=f"{path}:{reader.line_num}", fix="quote fields that contain commas")
        rows.append(row)
        locs.append(f"{path}:{reader.line_num}")
    return rows, locs


def _read_parquet(p: Path) -> tuple[list[dict], list[str]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet: {e}", where=str(p), fix=_READ_FIX) from None
    return rows, [f"{p} row {n}" for n in range(1, len(rows) + 1)]


def _read_hub(name: str, where: str, split: str) -> _Source:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline misses, unknown split, bad script: all mean "not usable here"
        raise DataError(f"dataset '{name}' not found locally or in the hub cache ({type(e).__name__})",
                        where=where, fix="download it once with network access, or give a local file") from None
    if len(ds) == 0:
        raise DataError(f"no rows in split '{split}' of dataset '{name}'", where=where)
    # The Dataset itself travels on (memory-mapped Arrow, fingerprinted cache, map(num_proc=...)).
    digest = hashlib.sha256(ds._fingerprint.encode()).digest()
    return _Source(ds, [f"{name}[{split}] row {n}" for n in range(1, len(ds) + 1)], digest, name)


# ----------------------------------------------------------------------------------------------
# Tokenizing


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


def _causal_dataset(src: _Source, spec: DataSpec, tokenizer, bos, eos):
    import datasets

    chat = spec.format == "chat"
    render = chat_renderer(spec, tokenizer) if chat else None
    if isinstance(src.rows, list):
        records = datasets.Dataset.from_dict(_prepare_rows(src.rows, src.locs, spec, tokenizer, render))
    else:  # a hub dataset: prepared by datasets itself, in parallel when it is large
        records = src.rows.map(
            lambda batch, idx: _prepare_rows([dict(zip(batch, v)) for v in zip(*batch.values())],
                                             [src.locs[i] for i in idx], spec, tokenizer, render),
            batched=True, with_indices=True, remove_columns=src.rows.column_names,
            num_proc=_num_proc(len(src.rows)), new_fingerprint=_fingerprint(src, spec, tokenizer) + "-format",
            desc="format")
    if chat:
        ds = records.map(_finish_chat, batched=True, fn_kwargs=dict(spec=spec),
                         new_fingerprint=_fingerprint(src, spec, tokenizer), desc="tokenize")
    else:
        tokenize = _tokenize_seq2seq if spec.format == "seq2seq" else _tokenize_causal
        ds = records.map(tokenize, batched=True, remove_columns=["texts", "is_response"],
                         fn_kwargs=dict(tokenizer=tokenizer, spec=spec, bos=bos, eos=eos),
                         new_fingerprint=_fingerprint(src, spec, tokenizer), desc="tokenize")
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


def _prepare_rows(rows: list[dict], locs: list[str], spec: DataSpec, tokenizer, render) -> dict:
    """Rows → columns, through core.prompts: chat rows straight to input_ids / labels (the template's
    own render); other formats to texts / is_response segments, tokenized next."""
    if spec.format == "chat":
        out = {"input_ids": [], "labels": [], "loc": list(locs)}
        for row, loc in zip(rows, locs):
            ids, labels = chat_tokens(chat_messages(row, loc, spec), tokenizer, render, loc,
                                      train_on_inputs=spec.train_on_inputs)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out
    to_segments = FORMATS[spec.format]
    out = {"texts": [], "is_response": [], "loc": list(locs)}
    for row, loc in zip(rows, locs):
        segments = to_segments(row, loc, spec, render)
        out["texts"].append([t for t, _ in segments])
        out["is_response"].append([r for _, r in segments])
    return out


def _num_proc(rows: int) -> int | None:
    """Worker processes for datasets.map: worth their start-up only on large data."""
    import os

    return min(8, os.cpu_count() or 1) if rows >= 50_000 and (os.cpu_count() or 1) > 1 else None


def _classification_dataset(src: _Source, spec: DataSpec, tokenizer, label_ids: dict) -> tuple[Any, int, dict]:
    import datasets

    texts = [column(r, loc, spec, "text", "text to classify") for r, loc in zip(src.rows, src.locs)]
    labels = [label_ids[_label(r, loc, spec)] for r, loc in zip(src.rows, src.locs)]

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
        full = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": enc["input_ids"], "truncated": [len(f) > spec.max_length for f in full],
                "length": [len(f) for f in full]}

    ds = datasets.Dataset.from_dict({"text": texts, "labels": labels}).map(
        encode, batched=True, remove_columns=["text"], new_fingerprint=_fingerprint(src, spec, tokenizer), desc="tokenize")
    truncated = sum(ds["truncated"])
    doctor = {"lengths": list(ds["length"]), "eos_cut": []}  # a class label has no EOS to lose
    return ds.remove_columns(["truncated", "length"]), truncated, doctor


def _label(row: dict, loc: str, spec: DataSpec) -> int | str:
    name = spec.columns.label
    if name not in row:
        column(row, loc, spec, "label", "label (class id or name)")
    value = row[name]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)  # CSV gives every field as text: "1" is the class id 1
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"label must be an integer class id or a class name, got {kind(value)}", where=loc,
                        fix=f"check data.columns.label (now '{name}')")
    return value


def _label_map(sources: list[_Source], spec: DataSpec, num_labels: int | None) -> tuple[dict, list[str]]:
    """Label → id from the train rows: names sorted, or ids 0..max (model.num_labels wins)."""
    return _class_map(sources, lambda r, loc: [_label(r, loc, spec)], "label", num_labels, sort_key=None)


def _class_map(sources: list[_Source], values, what: str, num_labels: int | None, sort_key) -> tuple[dict, list[str]]:
    """Class value → id from the train rows (values(row, loc) → the row's labels or tags): names sorted by
    sort_key, or integer ids 0..max; every eval value must occur in train. Mixed kinds, out-of-range ids and
    more names than model.num_labels are the data's mistake, at file:line."""
    train, *rest = sources
    seen: dict = {}
    for r, loc in zip(train.rows, train.locs):
        for v in values(r, loc):
            seen.setdefault(v, loc)
    kinds = {type(v) for v in seen}
    if len(kinds) > 1:
        first = type(next(iter(seen)))
        v, loc = next((v, loc) for v, loc in seen.items() if type(v) is not first)
        raise DataError(f"{what} {v!r} mixes {what} names and integer ids", where=loc,
                        fix=f"use either names or ids for every {what}")
    if kinds == {int}:
        for v, loc in seen.items():
            if v < 0 or (num_labels is not None and v >= num_labels):
                bound = f"[0, {num_labels})" if num_labels else "≥ 0"
                raise DataError(f"{what} {v} is out of range {bound}", where=loc,
                                fix=f"fix the {what} or set model.num_labels")
        names = [str(i) for i in range(num_labels or max(seen) + 1)]
        ids = {i: i for i in range(len(names))}
    else:
        names = sorted(seen, key=sort_key)
        if num_labels is not None and len(names) > num_labels:
            raise DataError(f"{len(names)} {what} names in the data but model.num_labels is {num_labels}: "
                            f"{', '.join(names)}", where=train.name, fix=f"raise model.num_labels or fix the {what}s")
        ids = {n: i for i, n in enumerate(names)}
    _check_values(rest, values, ids, lambda v: f"{what} {v!r} does not occur in the train data ({', '.join(names)})",
                  fix=f"every eval {what} must also be in data.train")
    return ids, names


def _check_values(sources: list[_Source], values, ids: dict, message, fix: str) -> None:
    """Every value of every row of *sources* (values(row, loc) → the row's labels or tags) must be a key of
    *ids*; the first that is not is the data's mistake: DataError(message(value)) at its file:line."""
    for src in sources:
        for r, loc in zip(src.rows, src.locs):
            for v in values(r, loc):
                if v not in ids:
                    raise DataError(message(v), where=loc, fix=fix)


def _given_map(sources: list[_Source], names: list[str], values, what: str) -> tuple[dict, list[str]]:
    """Labels or tags → the ids of a trained head's classes *names* (its id2label order); an integer id
    counts as itself. A value the head has no class for is the data's mistake, at its file:line."""
    ids: dict = {n: i for i, n in enumerate(names)}
    ids.update({i: i for i in range(len(names))})
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    _check_values(sources, values, ids,
                  lambda v: f"{what} {v!r} is not one of the adapter's {len(names)} classes ({shown})",
                  fix=f"evaluate on rows whose {what}s the adapter was trained on")
    return ids, list(names)


# ----------------------------------------------------------------------------------------------
# token_cls: rows of words with one tag each, labels on each word's first sub-token


def word_tags(row: dict, loc: str, spec: DataSpec) -> tuple[list[str], list[int | str]]:
    """A tokens-format row's (words, tags), checked: lists of the same length, words strings, tags names or ids."""
    words = _word_list(row, loc, spec)
    name = spec.columns.tags
    if name not in row:
        column(row, loc, spec, "tags", "list of tags, one per word")
    tags = row[name]
    if not isinstance(tags, list):
        raise DataError(f"column '{name}' must be a list of tags (one per word), got {kind(tags)}", where=loc,
                        fix=f"check data.columns.tags (now '{name}')")
    if len(tags) != len(words):
        raise DataError(f"{len(words)} tokens but {len(tags)} tags", where=loc,
                        fix=f"give exactly one tag per word in '{spec.columns.tokens}' and '{name}'")
    out: list[int | str] = []
    for tag in tags:
        if isinstance(tag, str) and tag.strip().isdigit():
            tag = int(tag)
        if isinstance(tag, bool) or not isinstance(tag, (int, str)) or tag == "":
            raise DataError(f"tag must be a tag name (B-PER, O, ...) or an integer id, got {kind(tag)}",
                            where=loc, fix=f"check the column '{name}'")
        out.append(tag)
    return words, out


def _word_list(row: dict, loc: str, spec: DataSpec) -> list[str]:
    name = spec.columns.tokens
    if name not in row:
        column(row, loc, spec, "tokens", "list of words")
    words = row[name]
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise DataError(f"column '{name}' must be a list of words (strings), got "
                        f"{kind(words) if not isinstance(words, list) else 'a list holding non-strings'}",
                        where=loc, fix="split each row's text into words: [\"EU\", \"rejects\", \"German\", ...]")
    if not words:
        raise DataError(f"column '{name}' is an empty list: nothing to tag", where=loc, fix="drop the row")
    return words


def read_words(row: dict, loc: str, spec: DataSpec) -> list[str]:
    """The words of a row to tag (predict: tags may be absent)."""
    return _word_list(row, loc, spec)


def _tag_map(sources: list[_Source], spec: DataSpec, num_labels: int | None) -> tuple[dict, list[str]]:
    """Tag → id from the train rows: names sorted with O first, or ids 0..max (model.num_labels wins)."""
    return _class_map(sources, lambda r, loc: word_tags(r, loc, spec)[1], "tag", num_labels,
                      sort_key=lambda t: (t != "O", t))


def align_labels(word_ids: list[int | None], labels: list[int]) -> list[int]:
    """Word labels → sub-token labels: each word's first sub-token carries its label; its other sub-tokens
    and special tokens (word id None) are IGNORE, so that a word counts once in loss and metrics."""
    out, previous = [], None
    for w in word_ids:
        out.append(IGNORE if w is None or w == previous else labels[w])
        previous = w
    return out


def encode_words(tokenizer, words: list[list[str]], max_length: int):
    """Pre-split rows tokenized as words (is_split_into_words): a fast tokenizer's encoding, with word_ids."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"token_cls needs a fast tokenizer (word_ids), and {type(tokenizer).__name__} is not one",
                        where="model.name", fix="use a model that ships tokenizer.json")
    try:
        return tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    except (ValueError, AssertionError) as e:  # RoBERTa/GPT-2 style BPE wants add_prefix_space for words
        raise DataError(f"the tokenizer refuses pre-split words: {str(e).splitlines()[0]}", where="model.name",
                        fix="save the tokenizer with add_prefix_space=True beside the model") from None


def _tokens_dataset(src: _Source, spec: DataSpec, tokenizer, tag_ids: dict) -> tuple[Any, int, dict]:
    import datasets

    rows = [word_tags(r, loc, spec) for r, loc in zip(src.rows, src.locs)]
    enc = encode_words(tokenizer, [w for w, _ in rows], spec.max_length)
    full = encode_words(tokenizer, [w for w, _ in rows], 10**9)["input_ids"]
    labels = [align_labels(enc.word_ids(i), [tag_ids[t] for t in tags]) for i, (_, tags) in enumerate(rows)]
    ds = datasets.Dataset.from_dict({"input_ids": enc["input_ids"], "labels": labels})
    return ds, sum(len(f) > spec.max_length for f in full), {"lengths": [len(f) for f in full]}


_COLUMNS_VERSION = 2  # bump when the tokenize maps' output columns change: cached hub-dataset maps go stale


def _fingerprint(src: _Source, spec: DataSpec, tokenizer) -> str:
    """What the tokenized rows depend on: the data, the data section, the tokenizer (its vocabulary, special
    tokens and chat template) and lorafit's version. datasets caches a hub dataset's maps under it."""
    from lorafit import __version__

    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    who = json.dumps([vocab, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                      getattr(tokenizer, "chat_template", None), __version__, _COLUMNS_VERSION], default=str)
    return hashlib.sha256(src.digest + spec.model_dump_json().encode() + who.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# The stage


# The data doctor: what build_datasets reports beyond hard errors. Every count above 0 is a warning (fatal
# under data.strict); the thresholds and their reasons are in docs/data.md.
_REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
             "chat": ("messages",), "classification": ("text", "label"), "tokens": ("tokens", "tags"),
             "seq2seq": ("source", "target")}
_COMPARED = {**_REQUIRED, "alpaca": ("instruction", "input", "output")}


def _percentiles(lengths: list[int]) -> dict:
    """Tokens per row before truncation: p50 / p95 (nearest rank) and max."""
    if not lengths:
        return {"p50": 0, "p95": 0, "max": 0}
    xs = sorted(lengths)

    def rank(q: int) -> int:
        return int(xs[max(0, -(-len(xs) * q // 100) - 1)])  # ceil(n·q/100), 1-based

    return {"p50": rank(50), "p95": rank(95), "max": int(xs[-1])}


def _empty_field(row: dict, spec: DataSpec) -> str | None:
    """The first required column of this row that is present but blank (a chat message without content)."""
    for key in _REQUIRED[spec.format]:
        name = getattr(spec.columns, key)
        value = row.get(name)
        if isinstance(value, str) and not value.strip():
            return name
        if key == "messages" and isinstance(value, list):
            for i, m in enumerate(value):
                if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip():
                    return f"{name}[{i}].content"
    return None


def _row_checks(sources: list[_Source], spec: DataSpec) -> dict[str, list[str]]:
    """Duplicates (within data.train; data.eval rows also in data.train) and blank fields, as the rows' locations."""
    names = [getattr(spec.columns, key) for key in _COMPARED[spec.format]]
    seen: dict[bytes, str] = {}
    found: dict[str, list[str]] = {"duplicates": [], "eval_in_train": [], "empty_fields": []}
    for n, src in enumerate(sources):
        rows = src.rows
        if not isinstance(rows, list):  # a hub dataset: only the compared columns, streamed from Arrow
            rows = rows.select_columns([c for c in names if c in rows.column_names])
        for row, loc in zip(rows, src.locs):
            key = hashlib.sha256(json.dumps([row.get(c) for c in names], sort_keys=True, default=str).encode()).digest()
            if key in seen:
                found["duplicates" if n == 0 else "eval_in_train"].append(f"{loc} (same as {seen[key]})")
            elif n == 0:
                seen[key] = loc
            blank = _empty_field(row, spec)
            if blank:
                found["empty_fields"].append(f"{loc} ('{blank}')")
    return found


def _doctor_warnings(stats: dict, spec: DataSpec, dropped: list[str], eos_cut: list[str],
                     checks: dict[str, list[str]]) -> list[str]:
    warnings = []
    if stats["truncated"] or dropped:
        lost = f", {len(eos_cut)} of them losing their trained EOS (first at {eos_cut[0]})" if eos_cut else ""
        where = f", first at {dropped[0]}" if dropped else ""
        warnings.append(f"data: {stats['truncated']} rows longer than data.max_length={spec.max_length} truncated"
                        f"{lost}; {len(dropped)} rows dropped with no response tokens left{where}; raise "
                        f"data.max_length (rows have p95 {stats['token_lengths']['p95']}, max "
                        f"{stats['token_lengths']['max']} tokens) or shorten the prompts")
    if checks["duplicates"]:
        warnings.append(f"data: {len(checks['duplicates'])} rows repeat an earlier row, first at "
                        f"{checks['duplicates'][0]}: they weigh more in training and can land in the eval split; "
                        "remove the duplicates")
    if checks["eval_in_train"]:
        warnings.append(f"data: {len(checks['eval_in_train'])} rows of data.eval also occur in data.train, first "
                        f"at {checks['eval_in_train'][0]}: the eval loss overstates what the adapter learnt; "
                        "remove them from one of the files")
    if checks["empty_fields"]:
        warnings.append(f"data: {len(checks['empty_fields'])} rows have an empty field, first at "
                        f"{checks['empty_fields'][0]}; fill or remove them")
    return warnings


def build_datasets(spec: DataSpec, tokenizer, task: str = "causal_lm", num_labels: int | None = None, *,
                   label_names: list[str] | None = None) -> DataBundle:
    """Read, check, tokenize and split ``spec``'s data for ``task`` (causal_lm, seq_cls or token_cls).
    *label_names*: the classes (seq_cls) or tags (token_cls) of a head already trained (evaluate: the adapter's
    saved id2label): rows are mapped onto those ids, never a map rebuilt from the rows."""
    if task not in ("causal_lm", "seq_cls", "token_cls", "seq2seq_lm"):
        raise DataError(f"task '{task}' is not supported by the data stage yet", where="model.task",
                        fix="use causal_lm, seq_cls, token_cls or seq2seq_lm")
    if (task == "seq2seq_lm") != (spec.format == "seq2seq"):
        raise DataError(f"format '{spec.format}' does not fit task '{task}'", where="data.format",
                        fix="seq2seq_lm needs format seq2seq (source and target columns), and format seq2seq "
                            "needs task seq2seq_lm")
    if (task == "seq_cls") != (spec.format == "classification"):
        raise DataError(f"format '{spec.format}' does not fit task '{task}'", where="data.format",
                        fix="seq_cls needs format classification; causal_lm needs text/alpaca/chat/completion")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Deliberate: batches need a pad id, and the tokenizer saved with the adapter should carry it.
        # Labels are built explicitly, so the real EOS stays trained even though pad == eos now.
        tokenizer.pad_token = tokenizer.eos_token
    sources = [_read(spec.train, "data.train", spec.split)]
    if spec.eval:
        sources.append(_read(spec.eval, "data.eval", "validation"))

    given, label_names, dropped, truncated, parts = label_names, None, [], 0, []
    doctor = {"lengths": [], "eos_cut": []}
    if task == "seq_cls":
        label_ids, label_names = (_given_map(sources, given, lambda r, loc: [_label(r, loc, spec)], "label")
                                  if given else _label_map(sources, spec, num_labels))
        built = [_classification_dataset(s, spec, tokenizer, label_ids) for s in sources]
        truncated = sum(t for _, t, _ in built)
        parts = [ds for ds, _, _ in built]
        for _, _, d in built:
            doctor["lengths"] += d["lengths"]
    elif task == "token_cls":
        tag_ids, label_names = (_given_map(sources, given, lambda r, loc: word_tags(r, loc, spec)[1], "tag")
                                if given else _tag_map(sources, spec, num_labels))
        for src in sources:
            ds, t, d = _tokens_dataset(src, spec, tokenizer, tag_ids)
            parts.append(ds)
            truncated += t
            doctor["lengths"] += d["lengths"]
    else:
        eos = tokenizer.eos_token_id
        bos = bos_id(tokenizer)  # None when this tokenizer adds no BOS (GPT-2 style): neither do we
        parts = []
        for src in sources:
            ds, t, d, found = _causal_dataset(src, spec, tokenizer, bos, eos)
            parts.append(ds)
            truncated, dropped = truncated + t, dropped + d
            doctor["lengths"] += found["lengths"]
            doctor["eos_cut"] += found["eos_cut"]

    train, evaluation = parts[0], (parts[1] if len(parts) > 1 else None)
    if evaluation is None and spec.eval_fraction > 0 and len(train) >= 2:
        n_eval = min(len(train) - 1, max(1, round(len(train) * spec.eval_fraction)))
        split = train.train_test_split(test_size=n_eval, seed=spec.seed)
        train, evaluation = split["train"], split["test"]

    lengths = [len(x) for x in train["input_ids"]]
    fingerprint = (sources[0].digest if len(sources) == 1
                   else hashlib.sha256(b"".join(s.digest for s in sources)).digest()).hex()
    stats = {
        "rows_read": sum(len(s.rows) for s in sources),
        "train_rows": len(train),
        "eval_rows": len(evaluation) if evaluation is not None else 0,
        "truncated": truncated,
        "dropped_fully_masked": len(dropped),
        "train_tokens": sum(lengths),
        "trainable_tokens": (sum(lengths) if task == "seq_cls"
                             else sum(sum(1 for x in row if x != IGNORE) for row in train["labels"])),
        "fingerprint": fingerprint,
        "files": [{"path": s.name, "sha256": s.digest.hex()} for s in sources],
        "format": spec.format,
        "max_length": spec.max_length,
        "token_lengths": _percentiles(doctor["lengths"]),
        "eos_cut": len(doctor["eos_cut"]),
    }
    checks = _row_checks(sources, spec)
    stats.update({k: len(v) for k, v in checks.items()})
    stats["warnings"] = _doctor_warnings(stats, spec, dropped, doctor["eos_cut"], checks)
    if spec.strict and stats["warnings"]:
        raise DataError(f"{len(stats['warnings'])} data warning(s) are errors under data.strict: "
                        + "; ".join(w.removeprefix("data: ") for w in stats["warnings"]), where="data.strict",
                        fix="fix the data, or set data.strict: false to train despite the warnings")
    for warning in stats["warnings"]:
        log.warn(warning)
    bundle = DataBundle(train, evaluation, make_collator(tokenizer, task), stats, label_names)
    if getattr(spec, "packing", False) and task == "causal_lm":
        from lorafit.stages.packing import pack_bundle

        bundle = pack_bundle(bundle, spec.max_length, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return bundle


def make_collator(tokenizer, task: str) -> Callable:
    """Right-pad each batch to its own longest row (to a multiple of 8 on GPU, for tensor cores):
    transformers' DataCollatorWithPadding for classification, DataCollatorForSeq2Seq for token labels
    (labels padded with -100, never trained on)."""
    import copy

    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    tokenizer = copy.deepcopy(tokenizer)  # the padding side is the collator's choice, not the saved tokenizer's
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:  # attention_mask hides pad positions: any valid id will do
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    multiple = 8 if torch.cuda.is_available() else None
    if task == "seq_cls":
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=multiple,
                                  return_tensors="pt")
