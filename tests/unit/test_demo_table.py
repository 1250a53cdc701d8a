"""The demo's before/after table, from a run's metrics.json (the real run: tests/e2e/test_demo.py, slow)."""

from __future__ import annotations

from lorafit.recipe import load_recipe
from lorafit.tools import demo


def test_the_table_reads_exact_match_loss_tokens_and_examples_from_the_metrics():
    recipe = load_recipe(demo.RECIPE)
    samples = [{"prompt": f"system\nYou are SmolLM\nuser\nNormalise the date to YYYY-MM-DD: {d}\nassistant\n",
                "reference": iso, "base": "The date is " + d, "adapter": iso}
               for d, iso in [("x1", "2005-03-24"), ("x2", "1994-04-29"), ("x3", "2001-12-25"), ("x4", "2000-01-01")]]
    metrics = {"train": {"tokens_seen": 31_234, "steps": 60},
               "eval": {"eval_rows": 50, "eval_loss": 0.02, "base_eval_loss": 1.1, "metric_rows": 50,
                        "metrics": {"exact_match": {"base": 0.02, "adapter": 0.9}}, "samples": samples}}
    text = "\n".join(demo.comparison_lines(metrics, recipe, 245))
    assert "exact match          2.0 %    90.0 %" in text
    assert "held-out loss       1.1000    0.0200" in text
    assert "31,234 tokens processed (60 steps of 8 rows)" in text  # a metrics.json from before trained_tokens and "recipes/data/dates-eval.jsonl" in text
    assert text.count("expected: ") == 3 and "prompt  : Normalise the date to YYYY-MM-DD: x1" in text
    assert text.endswith("total wall time: 4 min 5 s")


def test_without_metrics_the_table_says_why():
    recipe = load_recipe(demo.RECIPE)
    text = "\n".join(demo.comparison_lines({"eval": {"metrics_note": "off"}}, recipe, 5))
    assert "exact match: not measured (off)" in text and "expected" not in text


def test_the_table_shows_the_few_shot_baseline_the_misses_and_the_retain_figure():
    recipe = load_recipe(demo.RECIPE)
    metrics = {"train": {"tokens_seen": 1000, "steps": 60},
               "eval": {"eval_rows": 50, "eval_loss": 0.02, "base_eval_loss": 1.1, "metric_rows": 50, "few_shot_k": 3,
                        "metrics": {"exact_match": {"base": 0.02, "few_shot": 0.4, "adapter": 0.98}},
                        "outcome_rows": 50, "wrong_rows": 1,
                        "failures": [{"row": 7, "prompt": "Normalise the date to YYYY-MM-DD: 2nd of April 1989",
                                      "reference": "1989-04-02", "adapter": "1989-04-2"}],
                        "retain": {"source": "lorafit's built-in general questions (21 of 40 the base answers right)",
                                   "rows": 21, "tolerance": 0.1, "flagged": ["contains 1.0000 → 0.5238 (-48%)"],
                                   "metrics": {"loss": {"base": 2.0, "adapter": 3.1},
                                               "contains": {"base": 1.0, "adapter": 0.5238}},
                                   "samples": [{"prompt": "What is the capital of France?", "reference": "Paris",
                                                "base": "Paris.", "adapter": "Français"}]}}}
    text = "\n".join(demo.comparison_lines(metrics, recipe, 245))
    assert "exact match          2.0 %        40.0 %    98.0 %" in text, text
    assert "missed: 1 of 50 held-out dates" in text and "'1989-04-2' (expected 1989-04-02)" in text
    assert "still answered (contains) base 100.0 % → adapter 52.4 %" in text and "FORGETTING flagged" in text
    assert "What is the capital of France? base 'Paris.', adapter 'Français'" in text
