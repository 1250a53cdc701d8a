"""token_cls metrics for the evaluate stage (its core.tasks row names it: scorer): token accuracy and
entity-level precision / recall / F1 (seqeval-style: exact span and type), overall and per entity type, base
head vs adapter; each row right only when every tag is.

Each word is read at its first sub-token, as training labelled it (stages.data.tokens.align_labels); the forward
pass is stages.eval_common.predict_in_order (dataset order, shared with seq_cls), the arithmetic
core.metrics'. Entity scores need tag names (B-PER, I-PER, O): with integer tags only token_accuracy.
"""

from __future__ import annotations

from lorafit.core import metrics as M
from lorafit.core.prompts import IGNORE
from lorafit.stages.eval_common import by_metric, passes, predict_in_order, preview

SCORES = ("token_accuracy", "entity_precision", "entity_recall", "entity_f1")


def word_tags(classes: list[int], labels: list[int], names: list[str] | None) -> list[str]:
    """The tags of a row's words: *classes* read where *labels* marks a word's first sub-token."""
    return [names[c] if names and 0 <= c < len(names) else str(c) for c, gold in zip(classes, labels) if gold != IGNORE]


def tag_names(ctx) -> list[str] | None:
    """The tag names to score entities by: the data's, else the model's id2label when it names every class
    (a base already trained for NER); None when the tags are integer ids with no names."""
    if M.has_tag_names(ctx.label_names):
        return ctx.label_names
    id2label = getattr(getattr(ctx.trainer.model, "config", None), "id2label", None) or {}
    n = len(ctx.label_names) if ctx.label_names else len(id2label)
    names = [id2label.get(i, id2label.get(str(i))) for i in range(n)]
    return names if n and all(isinstance(x, str) for x in names) and M.has_tag_names(names) else None


def token_metrics(ctx) -> dict:
    """The evaluate stage's TaskMetrics for token_cls: {metrics, rows, samples[, note]}."""
    notes = ["evaluation.prompts are generated for causal_lm only"] if ctx.spec.prompts else []
    out: dict = {"note": notes[0]} if notes else {}
    if not ctx.spec.metrics or ctx.dataset is None:
        return out
    if ctx.planning:
        return {"plan": [f"tags of {len(ctx.dataset)} rows ({' and '.join(passes(ctx))})"]}
    found = predict_in_order(ctx, "tag")
    if found is None:
        return out
    names = tag_names(ctx)
    labels = found["adapter"][1]
    refs = [word_tags(row, row, names) for row in labels]
    tags = {w: [word_tags(p, gold, names) for p, gold in zip(pred, labels)] for w, (pred, _) in found.items()}
    if names is None:  # "0", "1", ... are no entity types: spans of them would be scored as nonsense
        notes.append("entity precision/recall/F1 need tag names (B-PER, I-PER, O): the tags are integer ids, "
                     "so token_accuracy only; give the tags as names in the data")
        scores = {w: {"token_accuracy": M.token_accuracy(refs, t)} for w, t in tags.items()}
    else:
        scores = {w: {k: v for k, v in M.entity_scores(refs, t).items() if k in SCORES} for w, t in tags.items()}
        out["per_entity"] = {w: M.per_entity_type(refs, t) for w, t in tags.items()}
    out["metrics"] = by_metric(scores)
    out["rows"] = len(refs)
    if notes:
        out["note"] = "; ".join(notes)
    texts = [preview(ctx, i) for i in range(len(refs))]
    out["samples"] = [{"prompt": texts[i], "reference": " ".join(refs[i]), **{w: " ".join(t[i]) for w, t in tags.items()}}
                      for i in range(min(len(refs), ctx.spec.report_samples))]
    # A row is wrong when any of its words has a wrong tag.
    out["records"] = {i: {"prompt": texts[i], "measured": "tagged", "reference": " ".join(ref),
                          **{w: " ".join(t[i]) for w, t in tags.items()}, "correct": tags["adapter"][i] == ref,
                          "wrong_tags": sum(1 for a, b in zip(tags["adapter"][i], ref) if a != b),
                          **({"base_correct": tags["base"][i] == ref} if "base" in tags else {})}
                      for i, ref in enumerate(refs)}
    return out
