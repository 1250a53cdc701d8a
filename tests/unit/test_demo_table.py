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
