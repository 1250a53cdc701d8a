"""Data stage: read rows, check them against ``data.format``, tokenize into input_ids + labels.

Rows become (text, is_response) segments; each segment is tokenized on its own without special
tokens and the ids are concatenated, because at inference the prompt is tokenized alone: tokenizing
prompt+response in one go can merge tokens across the boundary and teach a split never seen later.
Labels are built explicitly (never derived from pad positions), so a real EOS survives pad == eos.

Files are read as bytes and parsed here rather than by ``datasets``, so that every bad row is
reported as ``file:line``. ``datasets``/``torch`` are imported inside functions: the CLI starts fast.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lorafit import log
from lorafit.errors import DataError
from lorafit.recipe import DataSpec

IGNORE = -100
ROLES = ("system", "user", "assistant")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
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
    rows: list[dict]
    locs: list[str]                     # "file:line" of each row, for error messages
    digest: bytes                       # sha256 of the file bytes (of the rows for a hub dataset)
    name: str


# ----------------------------------------------------------------------------------------------
# Reading


def read_rows(path: str, *, where: str = "data.train", split: str = "train") -> list[dict]:
    """The rows of a local .jsonl/.json/.csv/.parquet file or of a cached hub dataset."""
    return _read(path, where, split).rows


def _read(path: str, where: str, split: str) -> _Source:
    p = Path(path)
    if not p.exists():
        if not p.suffix and _HUB_ID.match(path):
            return _read_hub(path, where, split)
        raise DataError(f"file not found: {path}", where=where, fix=_READ_FIX)
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
            raise DataError(f"expected a JSON object ({{...}}), got {_kind(row)}", where=f"{path}:{n}",
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
            raise DataError(f"expected a JSON object ({{...}}), got {_kind(item)}", where=f"{path}:{line}",
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
    rows = ds.to_list()
    if not rows:
        raise DataError(f"no rows in split '{split}' of dataset '{name}'", where=where)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).digest()
    return _Source(rows, [f"{name}[{split}] row {n}" for n in range(1, len(rows) + 1)], digest, name)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), f"a number ({value!r})")


# ----------------------------------------------------------------------------------------------
# Checking rows: each format turns a row into (text, is_response) segments


def _column(row: dict, loc: str, spec: DataSpec, key: str, what: str, optional: bool = False) -> str | None:
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
        raise DataError(f"column '{name}' must be a string, got {_kind(value)}", where=loc,
                        fix=f"check data.format ({spec.format}) and data.columns.{key}")
    return value


def _text_segments(row, loc, spec, render):
    return [(_column(row, loc, spec, "text", "text to train on"), True)]


def _alpaca_segments(row, loc, spec, render):
    instruction = _column(row, loc, spec, "instruction", "instruction")
    extra = _column(row, loc, spec, "input", "optional input", optional=True)
    output = _column(row, loc, spec, "output", "response")
    if extra and extra.strip():
        prompt = spec.prompt_template.format(instruction=instruction, input=extra)
    else:
        prompt = spec.prompt_template_no_input.format(instruction=instruction)
    return [(prompt, False), (output, True)]


def _completion_segments(row, loc, spec, render):
    return [(_column(row, loc, spec, "prompt", "prompt"), False),
            (_column(row, loc, spec, "completion", "completion"), True)]


def _chat_segments(row, loc, spec, render):
    key = spec.columns.messages
    if key not in row:
        _column(row, loc, spec, "messages", "list of {role, content} messages")
    messages = row[key]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"column '{key}' must be a non-empty list of {{role, content}} messages, "
                        f"got {_kind(messages)}", where=loc)
    for n, m in enumerate(messages, 1):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            got = json.dumps(m)[:80] if isinstance(m, dict) else _kind(m)
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


def _chat_renderer(spec: DataSpec, tokenizer):
    if spec.chat_template:
        from lorafit.tiny import CHATML

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
# Tokenizing


def _tokenize_causal(batch: dict, tokenizer, spec: DataSpec, bos: int | None, eos: int | None, chat: bool) -> dict:
    flat = [t for texts in batch["texts"] for t in texts]
    ids_flat = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    out = {"input_ids": [], "labels": [], "truncated": [], "masked": []}
    for responses in batch["is_response"]:
        ids, labels = [], []
        pieces = [next(ids_flat) for _ in responses]
        if bos is not None and not (pieces and pieces[0] and pieces[0][0] == bos):
            ids, labels = [bos], [IGNORE]
        for piece, is_response in zip(pieces, responses):
            ids += piece
            labels += piece if (is_response or spec.train_on_inputs) else [IGNORE] * len(piece)
        last = pieces[-1] if pieces else []
        # The end of the response must be learnt or the model never stops; chat turns may end in EOS
        # mid-segment (e.g. <|im_end|> == eos followed by a newline).
        has_eos = (eos in last) if chat else (bool(last) and last[-1] == eos)
        if eos is not None and not has_eos:
            ids, labels = ids + [eos], labels + [eos]
        if labels:
            labels[0] = IGNORE  # nothing predicts the first token: a label there only inflates counts
        truncated = len(ids) > spec.max_length
        ids, labels = ids[: spec.max_length], labels[: spec.max_length]
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
        out["masked"].append(all(x == IGNORE for x in labels))
    return out


def _causal_dataset(src: _Source, spec: DataSpec, tokenizer, bos, eos):
    import datasets

    render = _chat_renderer(spec, tokenizer) if spec.format == "chat" else None
    to_segments = FORMATS[spec.format]
    records = {"texts": [], "is_response": [], "loc": src.locs}
    for row, loc in zip(src.rows, src.locs):
        segments = to_segments(row, loc, spec, render)
        records["texts"].append([t for t, _ in segments])
        records["is_response"].append([r for _, r in segments])
    ds = datasets.Dataset.from_dict(records).map(
        _tokenize_causal, batched=True, remove_columns=["texts", "is_response"],
        fn_kwargs=dict(tokenizer=tokenizer, spec=spec, bos=bos, eos=eos, chat=spec.format == "chat"),
        new_fingerprint=_fingerprint(src, spec), desc="tokenize")
    truncated, masked = sum(ds["truncated"]), ds["masked"]
    dropped = [loc for loc, m in zip(ds["loc"], masked) if m]
    ds = ds.filter(lambda m: not m, input_columns="masked") if dropped else ds
    ds = ds.remove_columns(["truncated", "masked", "loc"])
    if len(ds) == 0:
        goal = "train on" if src.name == spec.train else "evaluate"
        raise DataError(f"nothing to {goal}: all {len(src.rows)} rows have no response tokens left within "
                        f"data.max_length={spec.max_length}", where=src.name,
                        fix="raise data.max_length or shorten the prompts")
    return ds, truncated, dropped


def _classification_dataset(src: _Source, spec: DataSpec, tokenizer, label_ids: dict) -> tuple[Any, int]:
    import datasets

    texts = [_column(r, loc, spec, "text", "text to classify") for r, loc in zip(src.rows, src.locs)]
    labels = [label_ids[_label(r, loc, spec)] for r, loc in zip(src.rows, src.locs)]

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
        full = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": enc["input_ids"], "truncated": [len(f) > spec.max_length for f in full]}

    ds = datasets.Dataset.from_dict({"text": texts, "labels": labels}).map(
        encode, batched=True, remove_columns=["text"], new_fingerprint=_fingerprint(src, spec), desc="tokenize")
    truncated = sum(ds["truncated"])
    return ds.remove_columns(["truncated"]), truncated


def _label(row: dict, loc: str, spec: DataSpec) -> int | str:
    name = spec.columns.label
    if name not in row:
        _column(row, loc, spec, "label", "label (class id or name)")
    value = row[name]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)  # CSV gives every field as text: "1" is the class id 1
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"label must be an integer class id or a class name, got {_kind(value)}", where=loc,
                        fix=f"check data.columns.label (now '{name}')")
    return value


def _label_map(sources: list[_Source], spec: DataSpec, num_labels: int | None) -> tuple[dict, list[str]]:
    train, *rest = sources
    seen = [(_label(r, loc, spec), loc) for r, loc in zip(train.rows, train.locs)]
    kinds = {type(v) for v, _ in seen}
    if len(kinds) > 1:
        v, loc = next((v, loc) for v, loc in seen if type(v) is not type(seen[0][0]))
        raise DataError(f"label {v!r} mixes class names and integer ids", where=loc,
                        fix="use either names or ids for every row")
    if kinds == {int}:
        for v, loc in seen:
            if v < 0 or (num_labels is not None and v >= num_labels):
                bound = f"[0, {num_labels})" if num_labels else "≥ 0"
                raise DataError(f"label {v} is out of range {bound}", where=loc,
                                fix="fix the label or set model.num_labels")
        names = [str(i) for i in range(num_labels or max(v for v, _ in seen) + 1)]
        ids = {i: i for i in range(len(names))}
    else:
        names = sorted({v for v, _ in seen})
        if num_labels is not None and len(names) > num_labels:
            raise DataError(f"{len(names)} class names in the data but model.num_labels is {num_labels}: "
                            f"{', '.join(names)}", where=train.name, fix="raise model.num_labels or fix the labels")
        ids = {n: i for i, n in enumerate(names)}
    for src in rest:
        for r, loc in zip(src.rows, src.locs):
            v = _label(r, loc, spec)
            if v not in ids:
                raise DataError(f"label {v!r} does not occur in the train data ({', '.join(names)})",
                                where=loc, fix="every eval class must also be in data.train")
    return ids, names


def _fingerprint(src: _Source, spec: DataSpec) -> str:
    return hashlib.sha256(src.digest + spec.model_dump_json().encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------------------
# The stage


def build_datasets(spec: DataSpec, tokenizer, task: str = "causal_lm", num_labels: int | None = None) -> DataBundle:
    """Read, check, tokenize and split ``spec``'s data for ``task`` (causal_lm or seq_cls)."""
    if task not in ("causal_lm", "seq_cls"):
        raise DataError(f"task '{task}' is not supported by the data stage yet", where="model.task",
                        fix="use causal_lm or seq_cls")
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

    label_names, dropped, truncated = None, [], 0
    if task == "seq_cls":
        label_ids, label_names = _label_map(sources, spec, num_labels)
        built = [_classification_dataset(s, spec, tokenizer, label_ids) for s in sources]
        truncated = sum(t for _, t in built)
        parts = [ds for ds, _ in built]
    else:
        eos = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        if bos is not None and tokenizer("a").input_ids[:1] != [bos]:
            bos = None  # this tokenizer does not add BOS (GPT-2 style): neither do we
        parts = []
        for src in sources:
            ds, t, d = _causal_dataset(src, spec, tokenizer, bos, eos)
            parts.append(ds)
            truncated, dropped = truncated + t, dropped + d

    train, evaluation = parts[0], (parts[1] if len(parts) > 1 else None)
    if evaluation is None and spec.eval_fraction > 0 and len(train) >= 2:
        n_eval = min(len(train) - 1, max(1, round(len(train) * spec.eval_fraction)))
        split = train.train_test_split(test_size=n_eval, seed=spec.seed)
        train, evaluation = split["train"], split["test"]

    if truncated or dropped:
        where = f", first at {dropped[0]}" if dropped else ""
        log.warn(f"data: {truncated} rows longer than data.max_length={spec.max_length} truncated; "
                 f"{len(dropped)} rows dropped with no response tokens left{where}; "
                 "raise data.max_length or shorten the prompts")

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
        "format": spec.format,
    }
    return DataBundle(train, evaluation, make_collator(tokenizer, task), stats, label_names)


def make_collator(tokenizer, task: str) -> Callable:
    """Right-pad each batch to its own longest row; labels pad with -100 (causal) or stack (seq_cls)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad  # attention_mask hides it; any valid id will do

    def collate(features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if task == "seq_cls":
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        else:
            labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
            for i, f in enumerate(features):
                labels[i, : len(f["labels"])] = torch.as_tensor(f["labels"], dtype=torch.long)
            batch["labels"] = labels
        return batch

    return collate
