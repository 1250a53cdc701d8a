"""Evaluate stage: held-out loss of base + adapter and of the base alone, on the same rows; then the task's
metrics (the function its core.tasks row names), base and adapter on the same weights (peft's
disable_adapter, no second load)."""

from __future__ import annotations

import math
from typing import Callable

from lorafit import log
from lorafit.core import distributed, tasks
from lorafit.core import metrics as M
from lorafit.core.prompts import IGNORE
from lorafit.stages.eval_common import (EvalContext, base_and_adapter, by_metric, generation_metrics,
                                        predict_in_order)
from lorafit.recipe import EvaluationSpec, Recipe


def _perplexity(loss: float | None) -> float | None:
    if loss is None or not math.isfinite(loss):
        return None
    return round(math.exp(min(loss, 50.0)), 4)


def limit(dataset, spec: EvaluationSpec):
    if dataset is not None and spec.max_samples and len(dataset) > spec.max_samples:
        return dataset.select(range(spec.max_samples))
    return dataset


def evaluate_model(trainer, eval_dataset, spec: EvaluationSpec, *, recipe: Recipe | None = None, tokenizer=None,
                   label_names: list[str] | None = None) -> dict:
    """{eval_loss, eval_perplexity, base_eval_loss, base_eval_perplexity, eval_rows}; empty without eval data.

    Given the recipe and the tokenizer, also the task's metrics (metric_function), under the keys metrics,
    metric_rows, samples, prompts and metrics_note (see task_metrics)."""
    eval_dataset = limit(eval_dataset, spec)
    result: dict = {}
    if eval_dataset is not None and len(eval_dataset) > 0:
        adapter = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="eval")
        result = {"eval_rows": len(eval_dataset), "eval_loss": adapter["eval_loss"],
                  "eval_perplexity": _perplexity(adapter["eval_loss"])}
        if spec.compare_base:
            with trainer.model.disable_adapter():
                base = trainer.evaluate(eval_dataset=eval_dataset, metric_key_prefix="base")
            result["base_eval_loss"] = base["base_loss"]
            result["base_eval_perplexity"] = _perplexity(base["base_loss"])
    if recipe is not None and tokenizer is not None:
        result.update(task_metrics(EvalContext(trainer, eval_dataset if result else None, tokenizer, recipe,
                                               label_names, distributed.is_main_process())))
    return result


def batch_progress():
    """A TrainerCallback counting evaluation / prediction batches through log.Progress (a bar on a terminal,
    a line per quarter elsewhere): for `lorafit evaluate`, whose Trainer has no training progress."""
    from transformers import TrainerCallback

    class BatchProgress(TrainerCallback):
        def __init__(self):
            self.progress = None

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            if self.progress is None:
                try:
                    total = len(eval_dataloader)
                except TypeError:
                    return
                self.progress = log.Progress("eval loss", total=total).__enter__()
            self.progress.update()

        def _close(self, *args, **kw):
            if self.progress is not None:
                self.progress.__exit__(None, None, None)
                self.progress = None

        on_evaluate = on_predict = _close

    return BatchProgress()


# ----------------------------------------------------------------------------------------------
# Task metrics: one function per model.task, base vs adapter on the same weights


TaskMetrics = Callable[[EvalContext], dict]
"""A task's metric function: ``fn(ctx) -> dict`` with any of these keys (absent = nothing to say):

    metrics  {name: {"adapter": float | None, "base": float | None}}   base only under evaluation.compare_base
    rows     int: eval rows the metrics cover
    samples  [{"prompt", "reference", "base", "adapter"}: str]  at most evaluation.report_samples eval rows
    prompts  [{"prompt", "base", "adapter"}: str]  evaluation.prompts, answered by base and by adapter
    note     str: what the metrics cover, or why they are not applicable

It honours evaluation.metrics (False: no metrics or samples, but still evaluation.prompts), measures the base
with ``base_and_adapter`` (the adapter disabled on the same weights, never a second load), and sends
long loops through ``log.Progress`` (stages.eval_common holds the shared pieces). Under torchrun it runs
on every rank; what runs on rank 0 alone (generation, the in-order classification pass) returns early
elsewhere (ctx.main_process), and when the weights are sharded (ctx.sharded) a forward pass runs on every
rank or not at all."""


def split_row(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of a trained row: the reference is its last trained span (the response,
    or the last assistant turn of a chat, with its closing token), the prompt everything before it, token
    for token as training built it. None when nothing is trained."""
    trained = [i for i, x in enumerate(labels) if x != IGNORE]
    if not trained:
        return None
    end = start = trained[-1]
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end + 1])


def causal_lm_metrics(ctx: EvalContext) -> dict:
    """exact_match and contains of greedy generations against each eval row's reference (its response, or
    its last assistant turn: split_row), on the first evaluation.generate_samples rows; and evaluation.prompts."""
    data, note = ctx.recipe.data, None
    if data.format == "text":
        note = "exact_match/contains not applicable: data.format text has no reference answer to compare with"
    elif data.train_on_inputs:
        note = ("exact_match/contains not applicable: with data.train_on_inputs the trained rows do not say "
                "where the prompt ends")
    if note is not None and (not ctx.spec.metrics or ctx.dataset is None):
        note = None  # no metrics were asked for: nothing to explain
    split = None if note else (lambda r: split_row(r["input_ids"], r["labels"]))
    return generation_metrics(ctx, split, note)


def classification_metrics(ctx: EvalContext) -> dict:
    """accuracy and macro-F1 of the predicted classes (argmax of the logits) on the eval rows, in dataset
    order (eval_common.predict_in_order)."""
    out: dict = {"note": "evaluation.prompts are generated for causal_lm only"} if ctx.spec.prompts else {}
    if not ctx.spec.metrics or ctx.dataset is None:
        return out
    found = predict_in_order(ctx, "classify")
    if found is None:
        return out
    labels = found["adapter"][1]
    out["metrics"] = by_metric({w: M.classification_scores(p, labels) for w, (p, _) in found.items()})
    out["rows"] = len(labels)
    names = ctx.label_names

    def name(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    texts = ctx.dataset.select(range(min(len(ctx.dataset), ctx.spec.report_samples)))["input_ids"]
    out["samples"] = [{"prompt": ctx.tokenizer.decode(ids, skip_special_tokens=True), "reference": name(labels[i]),
                       **{w: name(p[i]) for w, (p, _) in found.items()}} for i, ids in enumerate(texts)]
    return out


def metric_function(task: str) -> TaskMetrics | None:
    """The TaskMetrics function the task table names for *task* (its row's scorer, "module:function")."""
    import importlib

    scorer = tasks.task(task).scorer
    if not scorer:
        return None
    module, _, name = scorer.partition(":")
    return getattr(importlib.import_module(module), name)


def task_metrics(ctx: EvalContext) -> dict:
    """The task's metric function (core.tasks: its scorer), its result under metrics.json["eval"]'s keys:
    metrics, metric_rows, samples, prompts, metrics_note."""
    fn = metric_function(ctx.recipe.model.task)
    if fn is None:
        return {"metrics_note": f"no metrics for task {ctx.recipe.model.task} yet: loss and perplexity only"}
    found = fn(ctx)
    keys = {"metrics": "metrics", "rows": "metric_rows", "samples": "samples", "prompts": "prompts",
            "note": "metrics_note"}
    return {keys[k]: v for k, v in found.items() if k in keys and v is not None}
