"""The data doctor: what the data stage finds beyond hard errors (docs/data.md), as figures in its stats: token
lengths, truncated rows and the ones that lost their trained EOS, rows dropped with nothing left to train,
duplicates, held-out rows also in train, empty fields, each with its first row (file:line). What they mean for a
run is advice (core/advice.py, one threshold each), said by `validate` and `train`; the data stage says nothing."""

from __future__ import annotations

import hashlib
import json

from lorafit.recipe import DataSpec
from lorafit.stages.data.read import Source, Tokenized


def examine(stats: dict, sources: list[Source], spec: DataSpec, found: Tokenized, *, split=None) -> None:
    """Add the doctor's figures to the data stage's *stats*: token_lengths, eos_cut, duplicates, eval_in_train,
    empty_fields, and first_rows (the first offending row of each, file:line). *split*: (train, eval) datasets
    when the held-out rows were split from data.train (data.eval_fraction): eval_in_train then counts held-out
    rows equal to a training row, token for token (duplicates of data.train that landed on both sides)."""
    stats["token_lengths"] = _percentiles(found.lengths)
    stats["eos_cut"] = len(found.eos_cut)
    checks = _row_checks(sources, spec)
    stats.update({k: len(v) for k, v in checks.items()})
    if split is not None and checks["duplicates"]:  # distinct rows cannot land on both sides
        stats["eval_in_train"] = _split_leak(*split)
    first = {k: v[0] for k, v in checks.items() if v}
    first.update({k: v[0] for k, v in (("dropped", found.dropped), ("eos_cut", found.eos_cut)) if v})
    stats["first_rows"] = first


def top_token(parts) -> dict | None:
    """The highest token id of the tokenized rows and the first row (file:line) that holds it, over (input_ids,
    Rows or None, source) *parts*: a split's ids, each row's place in its source, the source. An id past the
    model's input embedding is an error before any weight loads (stages/advise.check_vocabulary)."""
    best = None
    for ids_of_rows, rows, source in parts:
        for i, ids in enumerate(ids_of_rows):
            top = max(ids, default=-1)
            if best is None or top > best["id"]:
                place = rows.index[i] if rows is not None else None
                best = {"id": top, "where": source.locs[place] if place is not None and place < len(source.locs)
                        else source.name}
    return best


def _split_leak(train, evaluation) -> int:
    """Held-out rows whose input_ids and labels equal a training row's."""
    def keys(ds):
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            yield tuple(ids), (labels if isinstance(labels, int) else tuple(labels))

    seen = set(keys(train))
    return sum(1 for key in keys(evaluation) if key in seen)


# The columns of each format that must not be blank; the ones two rows must share to be duplicates.
_REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
             "chat": ("messages",), "classification": ("text", "label"), "tokens": ("tokens", "tags"),
             "seq2seq": ("source", "target")}
_COMPARED = {**_REQUIRED, "alpaca": ("instruction", "input", "output")}


def _percentiles(lengths: list[int]) -> dict:
    """Tokens per row before truncation: p50 / p95 / p99 (nearest rank) and max."""
    if not lengths:
        return {"p50": 0, "p95": 0, "p99": 0, "max": 0}
    xs = sorted(lengths)

    def rank(q: int) -> int:
        return int(xs[max(0, -(-len(xs) * q // 100) - 1)])  # ceil(n·q/100), 1-based

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": int(xs[-1])}


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


def _row_checks(sources: list[Source], spec: DataSpec) -> dict[str, list[str]]:
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
