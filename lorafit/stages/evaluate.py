"""Evaluate stage: held-out loss of base + adapter and of the base alone, on the same rows; then the task's
metrics (the function its core.tasks row names), base and adapter on the same weights (peft's
disable_adapter, no second load)."""

from __future__ import annotations

import contextlib
import math
import shlex
from pathlib import Path
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
        # Measured already when training evaluated these very rows at its last step: not measured (nor said) twice.
        adapter = logged_loss(trainer, eval_dataset)
        if adapter is None:
            adapter = held_out_loss(trainer, eval_dataset, "eval")
        result = {"eval_rows": len(eval_dataset), "eval_loss": adapter, "eval_perplexity": _perplexity(adapter)}
        if spec.compare_base:
            with trainer.model.disable_adapter():
                base = held_out_loss(trainer, eval_dataset, "base")
            result["base_eval_loss"] = base
            result["base_eval_perplexity"] = _perplexity(base)
    if recipe is not None and tokenizer is not None:
        result.update(task_metrics(EvalContext(trainer, eval_dataset if result else None, tokenizer, recipe,
                                               label_names, distributed.is_main_process())))
    return result


def not_evaluated(run_dir: Path, log_history: list[dict], why: str = "the final evaluation did not finish") -> dict:
    """metrics.json["eval"] of a run whose adapter is saved but not (yet) measured: why, how to measure it later
    (`lorafit evaluate RUN`), and the evaluations training made on the way."""
    from lorafit.stages.report import eval_loss_history

    later = f"lorafit evaluate {shlex.quote(str(run_dir))}"
    return {"not_measured": f"{why}: the adapter is saved; run `{later}` to measure it",
            "loss_history": eval_loss_history(log_history)}


@contextlib.contextmanager
def after_training(run_dir: Path, recipe: Recipe, metrics: dict):
    """The final evaluation of `train`, its adapter already saved. Ctrl-C / SIGTERM stop it at once
    (EvaluationInterrupted: exit 130 / 143) and an out-of-memory even at batch size 1 ends it (OutOfMemory); either
    way metrics.json and report.md (main process) say what was not measured and how to measure it later."""
    import signal
    import threading

    from lorafit.core import rundir
    from lorafit.errors import EvaluationInterrupted, OutOfMemory

    def stop(signum, frame):
        raise EvaluationInterrupted(signum, str(run_dir))

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore():
        for s, handler in handlers.items():
            signal.signal(s, handler)
        handlers.clear()

    try:
        yield
    except (EvaluationInterrupted, OutOfMemory) as e:
        restore()  # a signal now would cut the writes below, which say the truth
        interrupted = isinstance(e, EvaluationInterrupted)
        why = (f"{signal.Signals(e.signum).name} during the final evaluation" if interrupted
               else f"the final evaluation ran out of memory ({e.message})")
        history = (metrics.get("eval") or {}).get("loss_history") or []
        metrics["eval"] = {**not_evaluated(run_dir, [], why), "loss_history": history}
        if distributed.is_main_process():
            from lorafit.stages.report import write_report
            from lorafit.stages.save import write_json

            write_json(Path(run_dir) / rundir.METRICS, metrics)
            write_report(Path(run_dir), recipe, metrics)
        if not interrupted:
            e.message = f"{e.message}; the adapter is saved in {Path(run_dir) / rundir.ADAPTER}"
            e.fix = f"evaluate it later with `lorafit evaluate {shlex.quote(str(run_dir))}`: {e.fix}"
            e.args = (str(e),)
        raise
    finally:
        restore()


def held_out_loss(trainer, dataset, prefix: str) -> float:
    """The Trainer's mean loss over *dataset*; an out-of-memory halves the eval batch and starts the pass again
    (core.oom.halving); the recipe's batch size is put back after."""
    from lorafit.core.oom import halving

    batch = trainer.args.per_device_eval_batch_size

    def run(size: int) -> float:
        trainer.args.per_device_eval_batch_size = size
        return trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)[f"{prefix}_loss"]

    try:
        return halving(run, batch, what=f"the {'base model' if prefix == 'base' else 'adapter'}'s held-out loss")
    finally:
        trainer.args.per_device_eval_batch_size = batch


def logged_loss(trainer, dataset) -> float | None:
    """The eval loss training logged at its last step, when it was measured on *dataset* itself (the Trainer's
    own eval set, evaluation.max_samples cutting nothing); else None."""
    state = getattr(trainer, "state", None)
    if dataset is None or dataset is not getattr(trainer, "eval_dataset", None) or not state or not state.global_step:
        return None
    return next((e["eval_loss"] for e in reversed(state.log_history)
                 if "eval_loss" in e and e.get("step") == state.global_step), None)


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
