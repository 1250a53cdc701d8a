"""The whole run on one screen: load → quantize → inject → train → evaluate → save.

``validate`` runs every check of ``train`` that needs no training and writes nothing.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import __version__, log
from lorafit.recipe import Recipe


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        lines = [f"run: {self.run_dir}", f"adapter: {self.run_dir / 'adapter'}",
                 f"trainable params: {m['trainable_params']:,} ({m['trainable_percent']:.4f} %)",
                 f"train loss: {m['train']['first_loss']:.4f} → {m['train']['final_loss']:.4f} "
                 f"({m['train']['steps']} steps, {m['train']['train_tokens_per_second'] or 0:,.0f} tokens/s)"]
        ev = m.get("eval") or {}
        if "eval_loss" in ev:
            base = f"base {ev['base_eval_loss']:.4f} → " if "base_eval_loss" in ev else ""
            lines.append(f"eval loss: {base}adapter {ev['eval_loss']:.4f} on {ev['eval_rows']} held-out rows")
        return "\n".join(lines)


def class_count(num_labels: int | None, label_names: list[str] | None) -> int | None:
    """The recipe's model.num_labels wins (the data may not show every class); else the data's classes."""
    if num_labels is not None:
        return num_labels
    return len(label_names) if label_names else None


def gradient_checkpointing(recipe: Recipe) -> bool:
    flag = recipe.training.gradient_checkpointing
    return flag if flag is not None else recipe.quantization.bits is not None


def train(recipe: Recipe, *, resume: str | None = None) -> TrainResult:
    from lorafit.stages.data import build_datasets
    from lorafit.stages.evaluate import evaluate_model
    from lorafit.stages.inject import inject_lora
    from lorafit.stages.load import load_model, load_tokenizer, materialize_gguf, resolve_precision
    from lorafit.stages.save import check_run_dir, save_adapter, start_run_dir, write_json
    from lorafit.stages.train import (check_checkpoint, find_checkpoint, peak_memory, train_model,
                                      training_arguments, warn_if_untrained)

    log.quiet_libraries()
    run_dir = check_run_dir(recipe.output, resume=resume)
    checkpoint = find_checkpoint(run_dir / "checkpoints", resume)
    precision = resolve_precision(recipe.training)

    # Data first: a bad row should fail in seconds, before gigabytes of weights load.
    model_spec = materialize_gguf(recipe.model)  # the recipe keeps naming the GGUF file
    tokenizer = load_tokenizer(model_spec)
    data = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels)
    num_labels = class_count(recipe.model.num_labels, data.label_names)
    start_run_dir(run_dir, recipe, resume=resume)

    # load → quantize → inject
    model = load_model(model_spec, recipe.quantization, precision, num_labels=num_labels,
                       label_names=data.label_names, pad_token_id=tokenizer.pad_token_id)
    use_gc = gradient_checkpointing(recipe)
    if recipe.quantization.bits is not None:
        from lorafit.stages.quantize import prepare_quantized

        model = prepare_quantized(model, recipe.quantization, gradient_checkpointing=use_gc)
    from transformers import set_seed

    set_seed(recipe.training.seed)  # before LoRA init: resume and reruns must draw the same A
    model, injection = inject_lora(model, recipe.lora, recipe.model.task, model_name=recipe.model.name)
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
    checks: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, what: str, detail: str) -> None:
        self.checks.append((what, detail))

    def lines(self) -> list[str]:
        out = [f"ok  {what:<10} {detail}" for what, detail in self.checks]
        out += [f"warning: {w}" for w in self.warnings]
        return out


def validate(recipe: Recipe, *, recipe_path: Path | None = None) -> ValidationReport:
    """Every check of a training run that needs no weights and no training. Writes nothing."""
    from lorafit.stages.data import build_datasets
    from lorafit.stages.load import check_model_files, load_tokenizer, resolve_precision
    from lorafit.targets import load_config

    log.quiet_libraries()
    report = ValidationReport()
    report.add("recipe", f"{recipe_path or 'recipe'}: schema ok")
    precision = resolve_precision(recipe.training)
    spec = recipe.model
    check_model_files(spec)
    config = load_config(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                         gguf_file=spec.gguf_file)
    tokenizer = load_tokenizer(spec)
    report.add("model", f"{spec.name} ({config.model_type}, task {spec.task}, precision {precision})")

    data = build_datasets(recipe.data, tokenizer, spec.task, spec.num_labels)
    s = data.stats
    report.add("data", f"{s['train_rows']} train / {s['eval_rows']} eval rows, {s['train_tokens']:,} train tokens "
                       f"({s['trainable_tokens']:,} trained), {s['truncated']} truncated, "
                       f"{s['dropped_fully_masked']} dropped")

    # The estimate builds the meta model and resolves the targets (raising on a name that matches
    # nothing): one pass serves the targets line and the memory headline.
    from lorafit import estimate as est

    plan = est.estimate(recipe)
    t = plan["trainable"]
    report.add("targets", f"{', '.join(t['target_modules'])} → {t['adapted_modules']} modules, "
                          f"{t['lora_params'] + t['dora_params']:,} LoRA params at r={t['r']}")
    headline = est.headline(plan)
    for line in headline[:2]:
        report.add("estimate", line)
    report.warnings += headline[2:]  # the plan exceeds this machine's memory
    out = Path(recipe.output.dir)
    if (out / "adapter").exists() and not recipe.output.overwrite:
        report.warnings.append(f"output.dir {out} already holds an adapter: `train` will refuse "
                               "(set output.overwrite: true or choose another dir)")
    return report


def versions() -> dict:
    import importlib.metadata as md

    found = {"lorafit": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return found
