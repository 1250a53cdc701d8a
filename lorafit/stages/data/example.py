"""One train row as the model sees it (`lorafit validate --show-example N`): the very ids and labels training
uses, decoded span by span, each span marked trained or not. render.example_lines turns it into text."""

from __future__ import annotations

from lorafit.core.prompts import IGNORE
from lorafit.errors import LorafitError


def show_train_row(data, tokenizer, n: int) -> dict:
    """Row ``n`` (1-based) of the train split, before the Trainer shuffles it, as (text, trained) segments:
    the very ids and labels training uses, decoded span by span."""
    rows = len(data.train)
    if not 1 <= n <= rows:
        raise LorafitError(f"row {n} does not exist: the train split has {rows} rows", where="--show-example",
                           fix=f"give a row number from 1 to {rows}")
    row = data.train[n - 1]
    ids, labels = list(row["input_ids"]), row["labels"]
    example = {"row": n, "rows": rows, "tokens": len(ids)}
    if isinstance(labels, int):  # seq_cls: one class for the whole text
        names = data.label_names
        return {**example, "trained_tokens": 0, "segments": [[_decode_span(tokenizer, ids, 0, len(ids)), False]],
                "label": names[labels] if names else labels}
    if len(labels) != len(ids):  # seq2seq: the encoder reads the source, the decoder learns the whole target
        return {**example, "tokens": len(ids) + len(labels), "trained_tokens": len(labels),
                "segments": [[_decode_span(tokenizer, ids, 0, len(ids)), False],
                             [_decode_span(tokenizer, labels, 0, len(labels)), True]]}
    trained = [x != IGNORE for x in labels]
    segments, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or trained[i] != trained[start]:
            segments.append([_decode_span(tokenizer, ids, start, i), trained[start]])
            start = i
    return {**example, "trained_tokens": sum(trained), "segments": segments}


def _decode_span(tokenizer, ids: list[int], start: int, end: int) -> str:
    """ids[start:end] as they read inside the row: sentencepiece drops a span's leading space when decoded alone."""
    def text(part):
        return tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head, whole = text(ids[:start]), text(ids[:end])
    return whole[len(head):] if whole.startswith(head) else text(ids[start:end])
