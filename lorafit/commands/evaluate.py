"""`lorafit evaluate`: held-out loss of the base and of base + adapter, for a run dir or an adapter dir.

Uses the pipeline's own stages: the data stage builds the rows, the evaluate stage measures them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from lorafit.core import libs, models, policies, rundir
from lorafit.core.adapters import find_adapter
from lorafit.core.prompts import infer_format
from lorafit.errors import LorafitError
from lorafit.recipe import Recipe, validate_recipe
from lorafit.stages.data import build_datasets, read_rows
from lorafit.stages import harness
from lorafit.stages.evaluate import batch_progress, evaluate_model, limit
from lorafit.stages.retain import prepare_retain
from lorafit.stages.train import build_trainer


def _adapter_recipe(source, data: Path | None) -> Recipe:
    """The recipe to evaluate with: the run's own (its eval split, or --data in the same format), or for a
    standalone adapter one built from adapter_config.json and the format the --data rows show."""
    if data is not None and data.suffix and not data.is_file():  # (a hub dataset id has no suffix)
        raise LorafitError(f"file not found: {data}", where="--data",
                           fix="pass a .jsonl, .json, .csv or .parquet file with the rows to evaluate on")
    overrides = [f"data.train={data}", "data.eval=null", "data.eval_fraction=0"] if data else []
    # Evaluation measures each row alone: a run trained with data.packing is evaluated unpacked.
    recipe = source.run_recipe(overrides + ["data.packing=false"])
    if recipe is not None:
        return recipe
    if data is None:
        raise LorafitError(f"{source.adapter_dir} is not inside a lorafit run, so it has no held-out split",
                           where="--data", fix="pass --data FILE with the rows to evaluate on")
    rows = read_rows(str(data), where="--data")
    fmt = infer_format(rows[0])
    if fmt is None:
        raise LorafitError(f"cannot tell the format of {data} from its columns ({', '.join(rows[0])})",
                           where="--data", fix="use the columns of a lorafit format: text; instruction/input/output; "
                                               "messages; prompt/completion; text/label")
    return validate_recipe({"model": {"name": source.base, "task": source.task.name},
                            "data": {"train": str(data), "format": fmt, "eval_fraction": 0}}, source="--data")


def evaluate_adapter(path: Path, data: Path | None, lm_eval: str | None = None) -> dict:
    """Base (adapter disabled) vs base + adapter on the same rows: loss, the task's metrics, the rows the adapter
    gets wrong, forgetting (evaluation.retain), the baselines; with *lm_eval* (comma-separated task names),
    EleutherAI's lm-evaluation-harness on both. A run's eval_predictions.jsonl and report.md are rewritten."""
    source = find_adapter(path)  # before the heavy imports: a wrong path fails at once
    recipe = _adapter_recipe(source, data)
    if data is None:
        check_data_unchanged(source)
    import torch
    from transformers import TrainingArguments

    libs.quiet_libraries()
    tokenizer = models.load_adapter_tokenizer(source)
    try:
        # A classifier's rows are mapped onto the classes its head was trained with (the adapter's saved
        # id2label), not a map rebuilt from these rows: a class missing from --data must not shift the ids.
        bundle = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels,
                                label_names=models.saved_label_names(source))
    except LorafitError as e:  # --data stands in for the run's data.train: name what the user typed
        if data is not None and e.where in ("data.train", recipe.data.train):
            e.where = f"--data {data}" if e.where == "data.train" else e.where
            e.args = (str(e),)
        raise
    dataset = bundle.train if data else bundle.eval
    if dataset is None:
        raise LorafitError(f"the run {source.adapter_dir.parent} has no held-out split (its data.eval_fraction was 0 "
                           "and it had no data.eval)", where=str(path), fix="pass --data FILE with the rows to evaluate on")
    tasks_asked = harness.task_names(lm_eval) if lm_eval else []  # a bad list fails before the model loads
    model, _ = models.load_adapted(source, num_labels=policies.class_count(recipe.model.num_labels, bundle.label_names),
                                   label_names=bundle.label_names)
    run_dir = source.run_dir if source.recipe_file is not None else None
    retain = prepare_retain(recipe, model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="lorafit-eval-") as scratch:  # the Trainer's output_dir, removed after
        args = TrainingArguments(output_dir=scratch,
                                 per_device_eval_batch_size=recipe.evaluation.batch_size or recipe.training.batch_size,
                                 report_to=[], disable_tqdm=True, remove_unused_columns=False,
                                 use_cpu=not torch.cuda.is_available(), save_strategy="no")
        trainer = build_trainer(model, args, bundle.collator)
        trainer.add_callback(batch_progress())
        rows = bundle.train_rows if data else bundle.eval_rows
        result = evaluate_model(trainer, dataset, recipe.evaluation, recipe=recipe, tokenizer=tokenizer,
                                label_names=bundle.label_names, rows=rows,
                                train_rows=None if data else bundle.train_rows, retain=retain, out_dir=run_dir)
    if tasks_asked:
        result["lm_eval"] = harness.run(model, tokenizer, recipe, tasks_asked, dataset=limit(dataset, recipe.evaluation))
    # The rows measured: the whole --data file, else the run's held-out rows (data.eval or its eval split).
    result["data"] = str(data) if data else f"held-out rows of the run ({recipe.data.eval or 'its eval split'})"
    result["adapter"] = str(source.adapter_dir)
    result = json.loads(json.dumps(result, default=str))
    if source.recipe_file is not None:  # a lorafit run: its report.md now shows these figures
        report = _rewrite_report(source, result, data)  # None: not writable (warned), the figures still count
        if report is not None:
            result["report"] = str(report)
    return result


def check_data_unchanged(source) -> None:
    """The run's held-out split is re-drawn from its data files: a file changed since training (its sha256 in
    metrics.json) would split differently, and rows the adapter trained on could be measured as held out."""
    import hashlib

    if source.run_dir is None:
        return
    try:
        recorded = (json.loads((source.run_dir / rundir.METRICS).read_text(encoding="utf-8")).get("data") or {})
    except (OSError, ValueError):
        return
    for entry in recorded.get("files") or []:
        path = Path(str(entry.get("path", "")))
        if not entry.get("sha256") or not path.is_file():  # a hub dataset (its fingerprint), or gone: read as before
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != entry["sha256"]:
            raise LorafitError(f"changed since the run trained on it (sha256 {entry['sha256'][:12]}… in "
                               f"{source.run_dir / rundir.METRICS}, now {digest[:12]}…): its held-out rows would no "
                               "longer be the ones kept out of training", where=str(path),
                               fix=f"restore the file, or pass --data FILE to evaluate on rows of your choosing "
                                   f"(--data {path} for the file as it is now)")


def _rewrite_report(source, result: dict, data: Path | None) -> Path | None:
    """The run's report.md with this evaluation in place of training's (metrics.json is left as written)."""
    from lorafit.recipe import load_recipe
    from lorafit.stages.report import write_report

    try:
        metrics = json.loads((source.run_dir / rundir.METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = {}
    evaluated = {k: v for k, v in result.items() if k not in ("data", "adapter")}
    trained = metrics.get("eval") or {}  # what only training saw: its eval loss history, the overfitting in it
    metrics["eval"] = {**evaluated, **{k: trained[k] for k in ("loss_history", "overfitting") if trained.get(k)}}
    where = f"--data {data}" if data else "the run's held-out rows"
    return write_report(source.run_dir, load_recipe(source.recipe_file), metrics,
                        evaluated_by=f"`lorafit evaluate` on {where}")
