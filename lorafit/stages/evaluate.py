"""Evaluate stage: held-out loss of base + adapter and of the base alone, on the same rows; then the task's
metrics (the function its core.tasks row names), base and adapter on the same weights (peft's
disable_adapter, no second load)."""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from pathlib import Path
from typing import Callable

from lorafit import log
from lorafit.core import distributed, tasks
from lorafit.core import metrics as M
from lorafit.stages.eval_common import (EvalContext, base_and_adapter, by_metric, generation_metrics,  # noqa: F401
                                        held_out_loss, passes, predict_in_order, preview, row_losses, split_row)
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
                   label_names: list[str] | None = None, rows=None, train_rows=None, retain=None,
                   out_dir: Path | None = None) -> dict:
    """{eval_loss, eval_perplexity, base_eval_loss, base_eval_perplexity, eval_rows}; empty without eval data.

    Given the recipe and the tokenizer, also the task's metrics (metric_function), under the keys metrics,
    metric_rows, samples, prompts and metrics_note (see task_metrics); the rows the adapter gets wrong (failures,
    wrong_rows, outcome_rows); forgetting on *retain* (stages.retain); overfitting seen in training's evaluations.
    What it will cost is said before it starts. *rows* / *train_rows*: the rows as read (stages.data.Rows), for
    previews and the few-shot baseline. *out_dir* (a run dir): eval_predictions.jsonl written there, one line
    per eval row. Perplexity only where the task generates text (a classifier's exp(loss) means nothing)."""
    eval_dataset = limit(eval_dataset, spec)
    measured = eval_dataset is not None and len(eval_dataset) > 0
    overfit = overfitting(getattr(getattr(trainer, "state", None), "log_history", None) or [])  # training's own
    ctx = None
    if recipe is not None and tokenizer is not None:
        ctx = EvalContext(trainer, eval_dataset if measured else None, tokenizer, recipe, label_names,
                          distributed.is_main_process(), rows=_aligned(rows, eval_dataset), train_rows=train_rows)
    # Measured already when training evaluated these very rows at the step whose weights these are: not twice.
    known = logged_loss(trainer, eval_dataset) if measured else None
    say_plan(ctx, eval_dataset if measured else None, known, retain)
    ppl = tasks.task(recipe.model.task).generates if recipe is not None else True
    result: dict = {}
    if measured:
        adapter = known if known is not None else held_out_loss(trainer, eval_dataset, "eval")
        result = {"eval_rows": len(eval_dataset), "eval_loss": adapter,
                  **({"eval_perplexity": _perplexity(adapter)} if ppl else {})}
        if spec.compare_base:
            with trainer.model.disable_adapter():
                base = held_out_loss(trainer, eval_dataset, "base")
            result["base_eval_loss"] = base
            if ppl:
                result["base_eval_perplexity"] = _perplexity(base)
    if ctx is not None:
        found = task_metrics(ctx)
        records = found.pop("records", None) or {}
        result.update(found)
        if measured:
            result.update(outcomes(ctx, records, found.get("metrics_note"), out_dir))
    if retain is not None and ctx is not None:
        from lorafit.stages.retain import measure_retain

        result["retain"] = measure_retain(ctx, retain)
    if overfit:
        result["overfitting"] = overfit
    return result


def _aligned(rows, dataset):
    """The rows as read for the eval rows measured (evaluation.max_samples keeps the first ones)."""
    if rows is None or dataset is None:
        return None
    return rows if len(rows) == len(dataset) else _First(rows, len(dataset)) if len(rows) > len(dataset) else None


class _First:
    def __init__(self, rows, n: int):
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.rows[i]


def say_plan(ctx: EvalContext | None, dataset, known: float | None, retain) -> None:
    """One line before evaluation starts: what each figure will cost (generation first: the dearest)."""
    if ctx is None or not ctx.main_process:
        return
    ctx.planning = True
    try:
        plan = list(task_metrics_plan(ctx))
    finally:
        ctx.planning = False
    if dataset is not None:
        loss = [] if known is not None else ["adapter"]
        loss += ["base"] if ctx.spec.compare_base else []
        if loss:
            plan.append(f"held-out loss of {len(dataset)} rows ({' and '.join(loss)})")
    if retain is not None and not retain.skipped:
        plan.append(retain.cost(ctx.spec.compare_base))
    if plan:
        log.info("evaluate: " + "; ".join(plan))


def outcomes(ctx: EvalContext, records: dict, note: str | None, out_dir: Path | None) -> dict:
    """Every eval row's line of eval_predictions.jsonl: its outcome where it was generated or classified (records,
    from the task's metric function), else its loss alone (measured here, marked so); the first
    evaluation.report_failures rows the adapter gets wrong. Written to *out_dir* when given (main process)."""
    if not ctx.main_process:
        return {}
    missing = [i for i in range(len(ctx.dataset)) if i not in records]
    if missing and not ctx.sharded:
        why = ("not generated: beyond evaluation.generate_samples" if records else
               f"no outcome: {note}" if note else "no outcome: evaluation.metrics is off" if not ctx.spec.metrics
               else "no outcome for this row")
        for i, loss in zip(missing, row_losses(ctx, missing)):
            records[i] = {"prompt": preview(ctx, i), "measured": "loss only", "loss": loss, "why": why}
    lines = [{"row": i + 1, **records[i]} for i in sorted(records)]
    wrong = [r for r in lines if r.get("correct") is False]
    keep = ("row", "prompt", "reference", "adapter", "base", "few_shot")
    out = {"outcome_rows": sum(1 for r in lines if "correct" in r), "wrong_rows": len(wrong),
           "failures": [{k: r[k] for k in keep if k in r} for r in wrong[:ctx.spec.report_failures]]}
    if out_dir is not None and lines:
        from lorafit.core import rundir
        from lorafit.core.files import atomic_write_text

        atomic_write_text(Path(out_dir) / rundir.PREDICTIONS,
                          "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in lines))
        out["predictions"] = rundir.PREDICTIONS
    return out


# Eval loss this much above its lowest, at the last evaluation, while train loss still falls: overfitting.
OVERFIT_RISE = 0.01


def overfitting(log_history: list[dict]) -> dict | None:
    """With 3 or more evaluations during training: the step with the lowest eval loss, when eval loss has turned
    up since (by more than OVERFIT_RISE, relative) while the train loss kept falling; else None."""
    from lorafit.stages.report import eval_loss_history

    evals = eval_loss_history(log_history)
    if len(evals) < 3:
        return None
    best, last = min(evals, key=lambda e: e["eval_loss"]), evals[-1]
    if best["step"] == last["step"] or last["eval_loss"] <= best["eval_loss"] * (1 + OVERFIT_RISE):
        return None
    train = sorted((e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e)

    def train_at(step: int) -> float | None:
        return next((loss for s, loss in reversed(train) if s <= step), None)

    then, now = train_at(best["step"]), train_at(last["step"])
    if then is None or now is None or now >= then:
        return None
    return {"best_step": best["step"], "best_eval_loss": best["eval_loss"], "last_step": last["step"],
            "last_eval_loss": last["eval_loss"], "train_loss_at_best": then, "train_loss_at_last": now}


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


def logged_loss(trainer, dataset) -> float | None:
    """The eval loss training logged at the step whose weights the model holds (the last step's, or the best
    one's under training.keep_best), when it was measured on *dataset* itself (the Trainer's own eval set,
    evaluation.max_samples cutting nothing); else None."""
    state = getattr(trainer, "state", None)
    if dataset is None or dataset is not getattr(trainer, "eval_dataset", None) or not state or not state.global_step:
        return None
    step = state.global_step
    if getattr(trainer.args, "load_best_model_at_end", False) and state.best_model_checkpoint and state.best_global_step:
        step = state.best_global_step
    return next((e["eval_loss"] for e in reversed(state.log_history)
                 if "eval_loss" in e and e.get("step") == step), None)


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
    order (eval_common.predict_in_order); the confusion matrix (rows: the true class, columns: the predicted one)
    and precision / recall / F1 / support per class, base and adapter."""
    out: dict = {"note": "evaluation.prompts are generated for causal_lm only"} if ctx.spec.prompts else {}
    if not ctx.spec.metrics or ctx.dataset is None:
        return out
    if ctx.planning:
        return {"plan": [f"classes of {len(ctx.dataset)} rows ({' and '.join(passes(ctx))})"]}
    found = predict_in_order(ctx, "classify")
    if found is None:
        return out
    labels = found["adapter"][1]
    out["metrics"] = by_metric({w: M.classification_scores(p, labels) for w, (p, _) in found.items()})
    out["rows"] = len(labels)
    names = ctx.label_names

    def name(c: int) -> str:
        return names[c] if names and 0 <= c < len(names) else str(c)

    classes = max(len(names or []), 1 + max([*labels, *(c for p, _ in found.values() for c in p)], default=0))
    matrices = {w: M.confusion_matrix(p, labels, classes) for w, (p, _) in found.items()}
    shown = [name(c) for c in range(len(matrices["adapter"]))]
    out["confusion"] = {"labels": shown, **matrices}
    out["per_class"] = {w: M.per_class(m, shown) for w, m in matrices.items()}
    texts = [preview(ctx, i) for i in range(len(labels))]
    out["samples"] = [{"prompt": texts[i], "reference": name(labels[i]), **{w: name(p[i]) for w, (p, _) in found.items()}}
                      for i in range(min(len(labels), ctx.spec.report_samples))]
    out["records"] = {i: {"prompt": texts[i], "measured": "classified", "reference": name(y),
                          **{w: name(p[i]) for w, (p, _) in found.items()}, "correct": found["adapter"][0][i] == y,
                          **({"base_correct": found["base"][0][i] == y} if "base" in found else {})}
                      for i, y in enumerate(labels)}
    return out


def metric_function(task: str) -> TaskMetrics | None:
    """The TaskMetrics function the task table names for *task* (its row's scorer, "module:function")."""
    import importlib

    scorer = tasks.task(task).scorer
    if not scorer:
        return None
    module, _, name = scorer.partition(":")
    return getattr(importlib.import_module(module), name)


# The metric functions' keys → metrics.json["eval"]'s.
KEYS = {"metrics": "metrics", "rows": "metric_rows", "samples": "samples", "prompts": "prompts", "note": "metrics_note",
        "records": "records", "few_shot_k": "few_shot_k", "confusion": "confusion", "per_class": "per_class",
        "per_entity": "per_entity"}


def task_metrics(ctx: EvalContext) -> dict:
    """The task's metric function (core.tasks: its scorer), its result under metrics.json["eval"]'s keys:
    metrics, metric_rows, samples, prompts, metrics_note, few_shot_k, confusion, per_class, per_entity; and
    records (each measured row's outcome, by eval row index: written to eval_predictions.jsonl, not metrics.json)."""
    fn = metric_function(ctx.recipe.model.task)
    if fn is None:
        return {"metrics_note": f"no metrics for task {ctx.recipe.model.task} yet: loss and perplexity only"}
    found = fn(ctx)
    return {KEYS[k]: v for k, v in found.items() if k in KEYS and v is not None}


def task_metrics_plan(ctx: EvalContext) -> list[str]:
    """What the task's metric function will cost (ctx.planning), one phrase per figure."""
    fn = metric_function(ctx.recipe.model.task)
    return list((fn(ctx) if fn is not None else {}).get("plan") or [])
