"""Evaluate stage: held-out loss of base + adapter and of the base alone, on the same rows."""

from __future__ import annotations

import math

from lorafit.recipe import EvaluationSpec


def _perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return round(math.exp(min(loss, 50.0)), 4)


def limit(dataset, spec: EvaluationSpec):
    if dataset is not None and spec.max_samples and len(dataset) > spec.max_samples:
        return dataset.select(range(spec.max_samples))
    return dataset


def evaluate_model(trainer, eval_dataset, spec: EvaluationSpec) -> dict:
    """{eval_loss, eval_perplexity, base_eval_loss, base_eval_perplexity, eval_rows}; empty without eval data."""
    eval_dataset = limit(eval_dataset, spec)
    if eval_dataset is None or len(eval_dataset) == 0:
        return {}
    adapter = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="eval")
    result = {"eval_rows": len(eval_dataset), "eval_loss": adapter["eval_loss"],
              "eval_perplexity": _perplexity(adapter["eval_loss"])}
    if spec.compare_base:
        with trainer.model.disable_adapter():
            base = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="base")
        result["base_eval_loss"] = base["base_loss"]
        result["base_eval_perplexity"] = _perplexity(base["base_loss"])
    return result
