"""The whole run on one screen: load → quantize → inject → train → save → evaluate.

``validate`` runs every check of ``train`` that needs no training and writes nothing. Both return data;
the CLI's rendering layer (render.py) turns it into lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lorafit import log, render
from lorafit.core import distributed, flops, libs, memory, models, policies, quantization, rundir
from lorafit.core.secrets import command_line
from lorafit.core.targets import build_meta_model, layout, load_config, resolve_targets
from lorafit.errors import RecipeError
from lorafit.recipe import Recipe
from lorafit.stages import advise, packing
from lorafit.stages.data import build_datasets
from lorafit.stages.data.example import show_train_row
from lorafit.stages.evaluate import after_training, evaluate_model, not_evaluated
from lorafit.stages.inject import inject_lora
from lorafit.stages.quantize import prepare_quantized
from lorafit.stages.report import eval_loss_history, write_report
from lorafit.stages.retain import prepare_retain
from lorafit.stages.resume import check_checkpoint, check_resume, check_run_dir, find_checkpoint
from lorafit.stages.save import save_adapter, start_run_dir, write_json
from lorafit.stages.train import peak_memory, run_arguments, train_model, warn_if_untrained


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict


def train(recipe: Recipe, *, resume: str | None = None, force: bool = False) -> TrainResult:
    from transformers import set_seed

    libs.quiet_libraries()
    run_dir = check_run_dir(recipe.output, resume=resume)
    checkpoint = find_checkpoint(run_dir / rundir.CHECKPOINTS, resume)
    forced_changes = check_resume(run_dir, recipe, checkpoint, force=force)  # --force: resumed despite these
    precision = policies.precision(recipe.training)
    config, model_layout = check_model(recipe)  # validate's model checks, in ms: before data, weights, or any write

    # Data first: a bad row should fail in seconds, before gigabytes of weights load. Under torchrun the
    # main process converts and tokenizes first; the others then agree on the data or stop.
    with distributed.main_process_first():
        model_spec = models.materialize_gguf(recipe.model)  # the recipe keeps naming the GGUF file
        tokenizer = models.load_tokenizer(model_spec)
        model_config = load_config(model_spec.name, revision=model_spec.revision,
                                   trust_remote_code=model_spec.trust_remote_code)
        policies.check_max_length(recipe.data, model_config, tokenizer, recipe.model.name)
        policies.check_prompts(recipe, model_config, tokenizer)
        data = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels)
    distributed.check_ranks_agree(data.stats)
    log.info(f"data: {render.data_summary(data.stats)}")
    advice = advise.check(recipe, data.stats, tokenizer, model_config, model_layout)  # validate's; exit 2 if strict
    for line in render.advice_lines(advice.given):
        log.warn(line)
    num_labels = policies.class_count(recipe.model.num_labels, data.label_names)
    # transformers' own refusals (precision, device, a distributed config): validate's, before any weight loads
    args = run_arguments(recipe, run_dir=run_dir, precision=precision, has_eval=data.eval is not None,
                         model_type=config.model_type)

    # load → quantize → inject. Seeded first: a new head's initial weights and LoRA's A are part of the run.
    set_seed(recipe.training.seed)
    dtype = policies.weights_dtype(model_spec, recipe.quantization, precision)
    model = models.load_model(model_spec, recipe.quantization, dtype,
                              num_labels=num_labels, label_names=data.label_names, pad_token_id=tokenizer.pad_token_id,
                              sharded=distributed.sharding(recipe.training.distributed),
                              attn_implementation=policies.attention(model_spec, dtype, config))
    use_gc = policies.gradient_checkpointing(recipe)
    if recipe.quantization.bits is not None:
        model = prepare_quantized(model, recipe.quantization, gradient_checkpointing=use_gc)
        log.info(f"quantization: {quantization.describe(recipe.quantization, policies.this_device())}")
    model, injection = inject_lora(model, recipe.lora, recipe.model.task, model_name=recipe.model.name,
                                   revision=recipe.model.revision)
    if recipe.data.packing:
        packing.prepare_model(model, data.collator)  # attention that keeps rows apart; no KV cache in the forward
    if checkpoint:
        check_checkpoint(checkpoint, model)
    start_run_dir(run_dir, recipe, resume=resume, checkpoint=checkpoint)  # the first write: every refusal above
    # leaves the dir as it was; a fresh run clears the old run's artifacts, a resume the checkpoints it abandons
    log.info(f"lora: {injection.adapted_modules} modules ({', '.join(injection.target_keys)}), "
             f"{injection.trainable_params:,} trainable params ({injection.trainable_percent:.4f} %)")
    if injection.saved_modules:
        labels = f", {num_labels} labels" if num_labels else ""
        log.info(f"head: {', '.join(injection.saved_modules)} trained in full (peft modules_to_save){labels}")

    # train → evaluate
    use_liger = policies.liger(recipe.training, recipe.model.task, config.model_type)
    # forgetting: the rows the base answers right, asked now, before training (rank 0 alone, the weights whole)
    alone = distributed.is_main_process() and not distributed.sharded_weights(recipe.training.distributed)
    retain = prepare_retain(recipe, model, tokenizer) if alone else None
    trainer, summary = train_model(model, data, args, resume_from=checkpoint,
                                   save_minutes=recipe.training.save_minutes)
    summary.update(flops.train_throughput_or_none(model, data.train, task=recipe.model.task, precision=precision,
                                                  tokens_per_second=summary["train_tokens_per_second"],
                                                  world_size=distributed.world_size()))
    warn_if_untrained(summary)

    # save (main process only), then evaluate: an evaluation cut short (Ctrl-C, SIGTERM, out of memory) leaves
    # the adapter and metrics.json, and says how to measure it later
    metrics = {
        "trainable_params": injection.trainable_params,
        "total_params": injection.total_params,
        "trainable_percent": injection.trainable_percent,
        "target_modules": injection.target_keys,
        "precision": precision,
        "gradient_checkpointing": use_gc,
        "attn_implementation": models.attention_implementation(model),
        "compile": recipe.training.compile,
        "liger": use_liger,
        "train": summary,
        "eval": not_evaluated(run_dir, trainer.state.log_history),
        "data": data.stats,
        "memory": peak_memory(),
        "versions": libs.versions(),
        "command": command_line(),
        "seed": recipe.training.seed,
        "world_size": distributed.world_size(),
        "distributed": recipe.training.distributed.strategy if distributed.world_size() > 1 else None,
        "packing": recipe.data.packing,
        "data_seed": recipe.data.seed,
        "resumed_from": checkpoint,
        "advice": advice.record(),  # what was said before training, and what advice.ignore silenced
    }
    if forced_changes:
        metrics["resume_forced_changes"] = forced_changes
    origin = models.gguf_origin(recipe.model)  # a GGUF base: the weights trained on are not the original ones
    if origin:
        metrics["base_origin"] = origin
    gathered = distributed.gather_adapter_state(trainer)  # FSDP / ZeRO-3: every rank takes part in the gather
    if distributed.is_main_process():
        save_adapter(trainer.model, tokenizer, run_dir, expected_modules=injection.adapted_modules,
                     state_dict=gathered)
        write_json(run_dir / rundir.METRICS, metrics)
    with after_training(run_dir, recipe, metrics):  # Ctrl-C / SIGTERM: exit 130 / 143, the adapter kept
        metrics["eval"] = evaluate_model(trainer, data.eval, recipe.evaluation, recipe=recipe, tokenizer=tokenizer,
                                         label_names=data.label_names, rows=data.eval_rows, train_rows=data.train_rows,
                                         retain=retain, out_dir=run_dir if distributed.is_main_process() else None)
        metrics["eval"]["loss_history"] = eval_loss_history(trainer.state.log_history)
    metrics["memory"] = peak_memory()
    if distributed.is_main_process():
        write_json(run_dir / rundir.METRICS, metrics)
        write_report(run_dir, recipe, metrics)  # report.md + loss.png; failing to write them only warns
    return TrainResult(run_dir, metrics)


@dataclass
class ValidationReport:
    recipe: str
    model: dict                 # name, model_type, task, precision
    data: dict                  # the data stage's stats
    plan: dict                  # estimate's report: targets, trainable parameters, memory
    warnings: list[str] = field(default_factory=list)
    example: dict | None = None  # --show-example: one train row as the model sees it
    advice: dict = field(default_factory=dict)  # stages.advise.Findings.record(): given, silenced, ignore


def validate(recipe: Recipe, *, recipe_path: Path | None = None, show_example: int | None = None) -> ValidationReport:
    """Every check of a training run that needs no weights and no training. Writes nothing."""
    libs.quiet_libraries()
    precision = policies.precision(recipe.training)
    spec = recipe.model
    config = check_model_source(recipe)  # the targets: resolved by the estimate's meta model below
    tokenizer = models.load_tokenizer(spec)
    policies.check_max_length(recipe.data, config, tokenizer, spec.name)
    policies.check_prompts(recipe, config, tokenizer)
    data = build_datasets(recipe.data, tokenizer, spec.task, spec.num_labels)
    run_arguments(recipe, run_dir=Path(recipe.output.dir), precision=precision, has_eval=data.eval is not None,
                  model_type=config.model_type)  # train's real TrainingArguments: what transformers refuses
    # The estimate builds the meta model and resolves the targets (raising on a name that matches
    # nothing): one pass serves the targets and the memory plan.
    example = show_train_row(data, tokenizer, show_example) if show_example is not None else None
    plan = memory.estimate(recipe)
    report = ValidationReport(str(recipe_path or "recipe"),
                              {"name": spec.name, "model_type": config.model_type, "task": spec.task,
                               "precision": precision}, data.stats, plan)
    try:  # what `train` would refuse in output.dir (stages.resume), said here as a warning
        check_run_dir(recipe.output, resume=None)
    except RecipeError as e:
        report.warnings.append(f"`train` will refuse: {e}")
    report.example = example
    report.advice = advise.check(recipe, data.stats, tokenizer, config, plan["layout"]).record()  # train's advice
    return report


def check_model_source(recipe: Recipe):
    """The tracker, the model's files and config, its code. Returns the config."""
    spec = recipe.model
    policies.check_tracker(recipe.training.report_to)
    distributed.check(recipe.training.distributed)
    models.check_model_files(spec)
    models.warn_remote_code(spec)
    config = load_config(spec.name, revision=spec.revision, trust_remote_code=spec.trust_remote_code,
                         gguf_file=spec.gguf_file)
    models.check_gguf_mapping(spec, config)  # the conversion's own check, from the tensor names: no weight read
    if recipe.data.packing:
        packing.check_model_type(config.model_type)
    # The CUDA levers asked for explicitly: refused here, before any weights load, where they cannot run.
    policies.check_attention(spec, policies.weights_dtype(spec, recipe.quantization,
                                                          policies.precision(recipe.training)), config)
    policies.check_liger(recipe.training, config.model_type)
    return config


def check_model(recipe: Recipe):
    """validate's checks of the model, which train runs before the data, the weights and the run dir:
    check_model_source, and lora.target_modules resolved on the meta model. Returns the config and the model's
    layout (targets.layout: what the advice asks of its modules)."""
    spec = recipe.model
    config = check_model_source(recipe)
    meta = build_meta_model(config, spec.task, trust_remote_code=spec.trust_remote_code,
                            num_labels=policies.config_num_labels(spec, config))
    _, chosen = resolve_targets(meta, recipe.lora.target_modules, model_name=spec.name)
    return config, layout(meta, chosen)
