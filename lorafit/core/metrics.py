"""Metric arithmetic, free of torch: text normalisation, exact match and containment of generations,
accuracy and macro-F1 of class predictions. The evaluate stage feeds these; they only count."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Text as answers are compared: Unicode NFKC, case-folded, punctuation removed, whitespace collapsed.

    Language-neutral on purpose (no English article stripping): "Paris." == "paris" but "Paris" != "Pariss"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACE.sub(" ", text).strip()


def exact_match(prediction: str, reference: str) -> bool:
    """The normalised generation equals the normalised reference."""
    return normalize(prediction) == normalize(reference)


def contains(prediction: str, reference: str) -> bool:
    """The normalised reference appears in the normalised generation as whole words ("four" is not found
    in "fourteen"). An empty reference is contained only in an empty generation."""
    ref, pred = normalize(reference), normalize(prediction)
    if not ref:
        return not pred
    return f" {ref} " in f" {pred} "


def mean(flags: Sequence[bool | float]) -> float | None:
    """Fraction of true flags (None for no rows), rounded for metrics.json."""
    return round(sum(float(f) for f in flags) / len(flags), 4) if flags else None


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """{exact_match, contains}: fractions of rows, over the pairs given."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return {"exact_match": mean([exact_match(p, r) for p, r in zip(predictions, references)]),
            "contains": mean([contains(p, r) for p, r in zip(predictions, references)])}


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float | None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return mean([p == y for p, y in zip(predictions, labels)])


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float | None:
    """Unweighted mean of each class's F1 over the classes that occur in the labels or the predictions
    (scikit-learn's ``f1_score(average="macro")``); a class never predicted and never true counts nowhere,
    one predicted but never right counts 0."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        return None
    scores = []
    for c in sorted(set(labels) | set(predictions)):
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return round(sum(scores) / len(scores), 4)


def classification_scores(predictions: Sequence[int], labels: Sequence[int]) -> dict:
    """{accuracy, macro_f1}."""
    return {"accuracy": accuracy(predictions, labels), "macro_f1": macro_f1(predictions, labels)}


# ----------------------------------------------------------------------------------------------
# token_cls: word-level tag sequences (one tag per word, e.g. ["B-PER", "I-PER", "O"])


def token_accuracy(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> float | None:
    """Words whose predicted tag equals the reference tag, over all words (None when there are none)."""
    total = correct = 0
    for ref, pred in zip(references, predictions):
        total += len(ref)
        correct += sum(1 for r, p in zip(ref, pred) if r == p)
    return correct / total if total else None


_ID_TAG = re.compile(r"(LABEL_)?\d+")


def has_tag_names(names: Sequence[str] | None) -> bool:
    """The tags are names (B-PER, O, ...) that entity spans can be read from; not integer ids ("0", "1", ...)
    nor transformers' default LABEL_0, LABEL_1, ..., which name no entity type."""
    return bool(names) and not any(_ID_TAG.fullmatch(str(n)) for n in names)


def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' → ('B', 'PER'); 'O' → ('O', ''); a tag without a B/I/E/S prefix ('PER') → ('I', 'PER'),
    so that IO-tagged data forms one entity per run of the same type. Integer ids ("0", "1") are no
    entity types: callers score them with token_accuracy alone (has_tag_names)."""
    if tag in ("O", ""):
        return "O", ""
    for sep in ("-", "_"):
        prefix, found, kind = tag.partition(sep)
        if found and prefix in ("B", "I", "E", "S"):
            return prefix, kind
    return "I", tag


def entity_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first word, last word), read the way conlleval and
    seqeval's default mode read IOB2 / IOB1 / IOBES: an entity starts at B (or S), at an I whose type
    differs from the word before, or at an I after O; it ends before O, B, S, or a change of type."""
    spans: set[tuple[str, int, int]] = set()
    start, current = None, ""
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, kind = _split_tag(tag)
        begins = prefix in ("B", "S") or (prefix in ("I", "E") and kind != current)
        if start is not None and (prefix == "O" or begins):
            spans.add((current, start, i - 1))
            start, current = None, ""
        if prefix != "O" and start is None:
            start, current = i, kind
        if prefix in ("E", "S") and start is not None:  # IOBES: the entity closes on this word
            spans.add((current, start, i))
            start, current = None, ""
    return spans


def entity_scores(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """Entity-level micro precision / recall / F1 (an entity counts when its span and type match exactly),
    seqeval's default, and token accuracy. Rows are scored apart: an entity never spans two rows."""
    true = pred = hit = 0
    for ref, out in zip(references, predictions):
        r, p = entity_spans(ref), entity_spans(out)
        true, pred, hit = true + len(r), pred + len(p), hit + len(r & p)
    precision = hit / pred if pred else 0.0
    recall = hit / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"token_accuracy": token_accuracy(references, predictions), "entity_precision": precision,
            "entity_recall": recall, "entity_f1": f1, "entities": true, "predicted_entities": pred}


# ----------------------------------------------------------------------------------------------
# Where a classifier goes wrong: its confusion matrix, and precision / recall / F1 per class or entity type


def confusion_matrix(predictions: Sequence[int], labels: Sequence[int], classes: int) -> list[list[int]]:
    """matrix[true][predicted]: how many rows of each true class were predicted as each class."""
    n = max([classes, *(x + 1 for x in predictions), *(y + 1 for y in labels)]) if (predictions or labels) else classes
    matrix = [[0] * n for _ in range(n)]
    for p, y in zip(predictions, labels):
        matrix[y][p] += 1
    return matrix


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": tp + fn}


def per_class(matrix: list[list[int]], names: Sequence[str]) -> dict:
    """{class name: {precision, recall, f1, support}} from a confusion matrix (support: rows truly of the class)."""
    out = {}
    for c, name in enumerate(names):
        tp = matrix[c][c]
        fp = sum(matrix[y][c] for y in range(len(matrix))) - tp
        fn = sum(matrix[c]) - tp
        out[str(name)] = _prf(tp, fp, fn)
    return out


def per_entity_type(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict:
    """{entity type: {precision, recall, f1, support}}: entity-level scores (exact span and type, as
    entity_scores), one entity type at a time; support is the reference entities of that type."""
    counts: dict[str, list[int]] = {}
    for ref, out in zip(references, predictions):
        r, p = entity_spans(ref), entity_spans(out)
        for kind in {k for k, *_ in r | p}:
            rk, pk = {s for s in r if s[0] == kind}, {s for s in p if s[0] == kind}
            tp, fp, fn = counts.setdefault(kind, [0, 0, 0])
            counts[kind] = [tp + len(rk & pk), fp + len(pk - rk), fn + len(rk - pk)]
    return {kind: _prf(*counts[kind]) for kind in sorted(counts)}
