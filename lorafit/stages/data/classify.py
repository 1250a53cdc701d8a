"""seq_cls rows → tokens: a text and one class per row; and the class map (names or ids → ids) that
token_cls's tags share."""

from __future__ import annotations

from typing import Any

from lorafit.core.prompts import column, kind
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data.read import Source, Tokenized, fingerprint


def tokenize(sources: list[Source], spec: DataSpec, tokenizer, *, num_labels: int | None = None,
             label_names: list[str] | None = None) -> Tokenized:
    """Every source's rows as input_ids + a class id. *label_names*: the classes of a head already trained
    (rows are mapped onto those), else the map is built from the train rows (*num_labels* bounds it)."""
    label_ids, names = (given_map(sources, label_names, lambda r, loc: [_label(r, loc, spec)], "label")
                        if label_names else _label_map(sources, spec, num_labels))
    built = [_classification_dataset(s, spec, tokenizer, label_ids) for s in sources]
    lengths = [n for _, _, d in built for n in d["lengths"]]
    return Tokenized([ds for ds, _, _ in built], names, sum(t for _, t, _ in built), [], lengths, [])


def _classification_dataset(src: Source, spec: DataSpec, tokenizer, label_ids: dict) -> tuple[Any, int, dict]:
    import datasets

    texts = [column(r, loc, spec, "text", "text to classify") for r, loc in zip(src.rows, src.locs)]
    labels = [label_ids[_label(r, loc, spec)] for r, loc in zip(src.rows, src.locs)]

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=spec.max_length)
        full = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": enc["input_ids"], "truncated": [len(f) > spec.max_length for f in full],
                "length": [len(f) for f in full]}

    ds = datasets.Dataset.from_dict({"text": texts, "labels": labels, "row": list(range(len(texts)))}).map(
        encode, batched=True, remove_columns=["text"], new_fingerprint=fingerprint(src, spec, tokenizer), desc="tokenize")
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


def _label_map(sources: list[Source], spec: DataSpec, num_labels: int | None) -> tuple[dict, list[str]]:
    """Label → id from the train rows: names sorted, or ids 0..max (model.num_labels wins)."""
    return class_map(sources, lambda r, loc: [_label(r, loc, spec)], "label", num_labels, sort_key=None)


def class_map(sources: list[Source], values, what: str, num_labels: int | None, sort_key) -> tuple[dict, list[str]]:
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


def _check_values(sources: list[Source], values, ids: dict, message, fix: str) -> None:
    """Every value of every row of *sources* (values(row, loc) → the row's labels or tags) must be a key of
    *ids*; the first that is not is the data's mistake: DataError(message(value)) at its file:line."""
    for src in sources:
        for r, loc in zip(src.rows, src.locs):
            for v in values(r, loc):
                if v not in ids:
                    raise DataError(message(v), where=loc, fix=fix)


def given_map(sources: list[Source], names: list[str], values, what: str) -> tuple[dict, list[str]]:
    """Labels or tags → the ids of a trained head's classes *names* (its id2label order); an integer id
    counts as itself. A value the head has no class for is the data's mistake, at its file:line."""
    ids: dict = {n: i for i, n in enumerate(names)}
    ids.update({i: i for i in range(len(names))})
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    _check_values(sources, values, ids,
                  lambda v: f"{what} {v!r} is not one of the adapter's {len(names)} classes ({shown})",
                  fix=f"evaluate on rows whose {what}s the adapter was trained on")
    return ids, list(names)
