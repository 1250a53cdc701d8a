"""Evaluation's generation is bounded (issue 25): max_new_tokens capped unless set, never past the context,
and its cost said before it starts."""

from __future__ import annotations

from lorafit.recipe import EvaluationSpec
from lorafit.stages.eval_common import GENERATION_CAP, generation_cost, new_tokens


def test_the_longest_reference_decides_below_the_cap():
    assert new_tokens(EvaluationSpec(), [10, 20], [5, 6], None) == (28, None)
    assert new_tokens(EvaluationSpec(), [], [5], None) == (64, None)


def test_a_long_reference_is_capped_and_said_unless_max_new_tokens_is_set():
    tokens, note = new_tokens(EvaluationSpec(), [1000, 12], [5, 5], None)
    assert tokens == GENERATION_CAP
    assert "1 reference" in note and "evaluation.max_new_tokens" in note
    assert new_tokens(EvaluationSpec(max_new_tokens=600), [1000], [5], None) == (600, None)


def test_never_past_the_context():
    tokens, _ = new_tokens(EvaluationSpec(max_new_tokens=600), [10], [100, 40], (300, "max_position_embeddings"))
    assert tokens == 200


def test_the_cost_counts_every_pass_and_batch():
    line = generation_cost(rows=50, prompts=2, max_new=24, passes=("base", "adapter"), batch_size=8)
    assert line.startswith("greedy generation of 50 eval rows and 2 prompts (base and adapter)")
    assert "generated tokens at most 2,496" in line and "7 batches" in line
