"""Data stage: read rows, check them against ``data.format``, tokenize into input_ids + labels, split, and
report what the data holds.

    read.py       the rows of a file (each with its file:line) or a cached hub dataset
    text.py       causal_lm / seq2seq_lm rows: prompt and response (or source and target) → ids + labels
    classify.py   seq_cls rows: text → ids, label → class id (and the class map token_cls shares)
    tokens.py     token_cls rows: words → ids, a tag on each word's first sub-token
    checks.py     the data doctor: truncation, dropped rows, duplicates, eval rows in train, empty fields
    example.py    one train row as the model sees it (validate --show-example)

``datasets``/``torch`` are imported inside functions: the CLI starts fast.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

from lorafit.core import tasks
from lorafit.core.prompts import IGNORE
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data import checks, classify, text, tokens
from lorafit.stages.data.read import read_located, read_rows, read_source
from lorafit.stages.data.tokens import align_labels, encode_words, read_words, word_tags

__all__ = ["DataBundle", "Rows", "build_datasets", "make_collator", "read_rows", "read_located", "read_words",
           "word_tags", "align_labels", "encode_words"]


class Rows:
    """The rows as read (dicts) behind a tokenized split, in its order: evaluation shows a row as the user wrote
    it (core.prompts.user_turn) and takes few-shot examples from the train rows. Read lazily from the source."""

    def __init__(self, source, index: list[int]):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return dict(self.source[self.index[i]])


@dataclass
class DataBundle:
    train: Any                          # datasets.Dataset: input_ids, labels
    eval: Any | None
    collator: Callable
    stats: dict
    label_names: list[str] | None
    train_rows: Rows | None = None      # the rows as read behind train (before packing) and eval, in their order
    eval_rows: Rows | None = None


def build_datasets(spec: DataSpec, tokenizer, task: str = tasks.DEFAULT, num_labels: int | None = None, *,
                   label_names: list[str] | None = None) -> DataBundle:
    """Read, check, tokenize and split ``spec``'s data for ``task`` (a row of core.tasks).
    *label_names*: the classes or tags of a head already trained (evaluate: the adapter's saved id2label): rows
    are mapped onto those ids, never a map rebuilt from the rows."""
    if task not in tasks.TASKS:
        raise DataError(f"task '{task}' is not supported by the data stage", where="model.task",
                        fix=f"use one of {', '.join(tasks.TASKS)}")
    problem = tasks.format_problem(task, spec.format)
    if problem:
        raise DataError(f"format '{spec.format}' does not fit task '{task}'", where="data.format",
                        fix=problem.split(": ", 1)[1])
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Deliberate: batches need a pad id, and the tokenizer saved with the adapter should carry it.
        # Labels are built explicitly, so the real EOS stays trained even though pad == eos now.
        tokenizer.pad_token = tokenizer.eos_token
    sources = [read_source(spec.train, "data.train", spec.split)]
    if spec.eval:
        sources.append(read_source(spec.eval, "data.eval", "validation"))
    # One tokenizer per kind of row (the data format says which): prompt/response text, classes, tagged words.
    tokenize = {"classification": classify.tokenize, "tokens": tokens.tokenize}.get(spec.format, text.tokenize)
    found = tokenize(sources, spec, tokenizer, num_labels=num_labels, label_names=label_names)

    train, evaluation = found.parts[0], (found.parts[1] if len(found.parts) > 1 else None)
    split = None
    if evaluation is None and spec.eval_fraction > 0 and len(train) >= 2:
        n_eval = min(len(train) - 1, max(1, round(len(train) * spec.eval_fraction)))
        parts = train.train_test_split(test_size=n_eval, seed=spec.seed)
        train, evaluation = split = parts["train"], parts["test"]

    # Each tokenized row's place in its source, then the column goes: the Trainer's collator sees ids and labels.
    eval_source = sources[1] if spec.eval else sources[0]
    train_ids = train["input_ids"]
    eval_ids = evaluation["input_ids"] if evaluation is not None else []
    train, train_rows = _rows_behind(train, sources[0])
    evaluation, eval_rows = _rows_behind(evaluation, eval_source)
    top = checks.top_token([(train_ids, train_rows, sources[0]), (eval_ids, eval_rows, eval_source)])
    lengths = [len(x) for x in train_ids]
    digest = (sources[0].digest if len(sources) == 1
              else hashlib.sha256(b"".join(s.digest for s in sources)).digest()).hex()
    stats = {
        "rows_read": sum(len(s.rows) for s in sources),
        "train_rows": len(train),
        "eval_rows": len(evaluation) if evaluation is not None else 0,
        "truncated": found.truncated,
        "dropped_fully_masked": len(found.dropped),
        "train_tokens": sum(lengths),
        "trainable_tokens": (sum(lengths) if tasks.task(task).row_label  # a class for the whole row
                             else sum(sum(1 for x in row if x != IGNORE) for row in train["labels"])),
        "fingerprint": digest,
        "files": [{"path": s.name, "sha256": s.digest.hex(), "rows": len(s.rows)} for s in sources],
        "format": spec.format,
        "max_length": spec.max_length,
        "top_token": top,
    }
    checks.examine(stats, sources, spec, found, split=split)
    bundle = DataBundle(train, evaluation, make_collator(tokenizer, task), stats, found.label_names, train_rows,
                        eval_rows)
    if getattr(spec, "packing", False) and tasks.task(task).causal:
        from lorafit.stages.packing import pack_bundle

        bundle = pack_bundle(bundle, spec.max_length, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return bundle


def _rows_behind(ds, source) -> tuple[Any, Rows | None]:
    if ds is None or "row" not in ds.column_names:
        return ds, None
    return ds.remove_columns("row"), Rows(source.rows, list(ds["row"]))


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
    if tasks.task(task).row_label:  # one class per row: nothing to pad in the labels
        return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=multiple, return_tensors="pt")
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE, pad_to_multiple_of=multiple,
                                  return_tensors="pt")
