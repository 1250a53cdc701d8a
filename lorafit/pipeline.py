"""The whole run on one screen: load → quantize → inject → train → evaluate → save.

``validate`` runs every check of ``train`` that needs no training and writes nothing. Both return data;
the CLI's rendering layer (render.py) turns it into lines.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import __version__, log
from lorafit.commands import estimate as est
from lorafit.core import models, policies
from lorafit.core.targets import load_config
from lorafit.recipe import Recipe
from lorafit.stages.data import build_datasets
from lorafit.stages.evaluate import evaluate_model
from lorafit.stages.inject import inject_lora
from lorafit.stages.quantize import prepare_quantized
from lorafit.stages.save import check_run_dir, save_adapter, start_run_dir, write_json
from lorafit.stages.train import (check_checkpoint, find_checkpoint, peak_memory, train_model, training_arguments,
                                  warn_if_untrained)


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


def train(recipe: Recipe, *, resume: str | None = None) -> TrainResult:
    from transformers import set_seed

    log.quiet_libraries()
    run_dir = check_run_dir(recipe.output, resume=resume)
    checkpoint = find_checkpoint(run_dir / "checkpoints", resume)
    precision = policies.precision(recipe.training)

    # Data first: a bad row should fail in seconds, before gigabytes of weights load. Under torchrun the
    # main process converts and tokenizes first; the others then agree on the data or stop.
    with main_process_first():
        model_spec = models.materialize_gguf(recipe.model)  # the recipe keeps naming the GGUF file
        tokenizer = models.load_tokenizer(model_spec)
        policies.check_max_length(recipe.data, load_config(model_spec.name, revision=model_spec.revision,
                                                           trust_remote_code=model_spec.trust_remote_code),
                                  tokenizer, recipe.model.name)
        data = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels)
    check_ranks_agree(data.stats)
    num_labels = policies.class_count(recipe.model.num_labels, data.label_names)
    start_run_dir(run_dir, recipe, resume=resume)

    # load → quantize → inject. Seeded first: a new head's initial weights and LoRA's A are part of the run.
    set_seed(recipe.training.seed)
    model = models.load_model(model_spec, recipe.quantization,
                              policies.weights_dtype(model_spec, recipe.quantization, precision),
                              num_labels=num_labels, label_names=data.label_names, pad_token_id=tokenizer.pad_token_id)
    use_gc = policies.gradient_checkpointing(recipe)
    if recipe.quantization.bits is not None:
        model = prepare_quantized(model, recipe.quantization, gradient_checkpointing=use_gc)
    model, injection = inject_lora(model, recipe.lora, recipe.model.task, model_name=recipe.model.name,
                                   revision=recipe.model.revision)
    if checkpoint:
        check_checkpoint(checkpoint, model)
    log.info(f"lora: {injection.adapted_modules} modules ({', '.join(injection.target_keys)}), "
             f"{injection.trainable_params:,} trainable params ({injection.trainable_percent:.4f} %)")

    # train → evaluate
    args = training_arguments(recipe.training, recipe.evaluation, output_dir=run_dir / "checkpoints",
                              precision=precision, gradient_checkpointing=use_gc, has_eval=data.eval is not None,
                              run_name=recipe.output.run_name or run_dir.name)
    trainer, summary = train_model(model, data, args, resume_from=checkpoint)
    warn_if_untrained(summary)
    eval_metrics = evaluate_model(trainer, data.eval, recipe.evaluation)

    # save (main process only)
    metrics = {
        "trainable_params": injection.trainable_params,
        "total_params": injection.total_params,
        "trainable_percent": injection.trainable_percent,
        "target_modules": injection.target_keys,
        "precision": precision,
        "gradient_checkpointing": use_gc,
        "train": summary,
        "eval": eval_metrics,
        "data": data.stats,
        "memory": peak_memory(),
        "versions": versions(),
        "resumed_from": checkpoint,
    }
    if trainer.is_world_process_zero():
        save_adapter(trainer.model, tokenizer, run_dir, expected_modules=injection.adapted_modules)
        write_json(run_dir / "metrics.json", metrics)
    return TrainResult(run_dir, metrics)


@dataclass
class ValidationReport:
    recipe: str
    model: dict                 # name, model_type, task, precision
    data: dict                  # the data stage's stats
    plan: dict                  # estimate's report: targets, trainable parameters, memory
    warnings: list[str] = field(default_factory=list)


def validate(recipe: Recipe, *, recipe_path: Path | None = None) -> ValidationReport:
    """Every check of a training run that needs no weights and no training. Writes nothing."""
    log.quiet_libraries()
    precision = policies.precision(recipe.training)
    spec = recipe.model
    models.check_model_files(spec)
    config = load_config(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                         gguf_file=spec.gguf_file)
    tokenizer = models.load_tokenizer(spec)
    policies.check_max_length(recipe.data, config, tokenizer, spec.name)
    data = build_datasets(recipe.data, tokenizer, spec.task, spec.num_labels)
    # The estimate builds the meta model and resolves the targets (raising on a name that matches
    # nothing): one pass serves the targets and the memory plan.
    plan = est.estimate(recipe)
    report = ValidationReport(str(recipe_path or "recipe"),
                              {"name": spec.name, "model_type": config.model_type, "task": spec.task,
                               "precision": precision}, data.stats, plan)
    out = Path(recipe.output.dir)
    if (out / "adapter").exists() and not recipe.output.overwrite:
        report.warnings.append(f"output.dir {out} already holds an adapter: `train` will refuse "
                               "(set output.overwrite: true or choose another dir)")
    return report


@contextlib.contextmanager
def main_process_first():
    """Alone: nothing. Under torchrun: rank 0 runs the block first (GGUF conversion, tokenization and
    datasets' caches happen once), then the others (accelerate's PartialState)."""
    if log.world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().main_process_first():
        yield


def check_ranks_agree(stats: dict) -> None:
    """Every rank must train on the same rows: compare the data fingerprints across processes."""
    if log.world_size() == 1:
        return
    import torch.distributed as dist

    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (stats["fingerprint"], stats["train_rows"]))
    if len(set(seen)) > 1:
        raise RuntimeError(f"the processes built different training data: {seen}")


def versions() -> dict:
    import importlib.metadata as md

    found = {"lorafit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found
