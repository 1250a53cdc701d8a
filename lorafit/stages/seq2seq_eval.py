"""seq2seq_lm metrics for the evaluate stage (its core.tasks row names it: scorer): exact_match and
contains of greedy generations from each eval row's source against its target, base vs adapter.

The source is the row's encoder input_ids and the reference its labels, token for token as training built
them (stages.data); the rest is stages.eval_common.generation_metrics, shared with causal_lm.
"""

from __future__ import annotations

from lorafit.core.prompts import IGNORE
from lorafit.stages.eval_common import generation_metrics


def source_and_target(row: dict) -> tuple[list[int], list[int]]:
    """(encoder ids, target ids) of a trained seq2seq row: its input_ids, and its labels (EOS included)."""
    return list(row["input_ids"]), [t for t in row["labels"] if t != IGNORE]


def seq2seq_metrics(ctx) -> dict:
    """The evaluate stage's TaskMetrics for seq2seq_lm: {metrics, rows, samples, prompts[, note]}."""
    return generation_metrics(ctx, source_and_target)
