"""Evaluate stage: held-out loss of base + adapter and of the base alone, on the same rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

from lorafit.errors import LorafitError
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


def evaluate_adapter(path: Path, data: Path | None) -> dict:
    """`lorafit evaluate`: a run dir (its recipe and eval split) or an adapter dir (with --data)."""
    from lorafit.log import quiet_libraries

    quiet_libraries()
    from transformers import TrainingArguments

    from lorafit.stages.train import build_trainer

    from lorafit.adapters import find_adapter
    from lorafit.pipeline import class_count
    from lorafit.recipe import load_recipe
    from lorafit.stages.data import build_datasets
    from lorafit.stages.load import load_model, load_tokenizer, materialize_gguf, resolve_precision

    source = find_adapter(path)
    adapter_dir = source.adapter_dir
    recipe_file = source.run_dir / "recipe.yaml" if source.run_dir else None
    if recipe_file is None or not recipe_file.is_file():
        raise LorafitError(f"no recipe.yaml next to {adapter_dir}", where=str(path),
                           fix="pass the run directory that `lorafit train` wrote")
    overrides = [f"data.train={data}", "data.eval=null", "data.eval_fraction=0"] if data else []
    recipe = load_recipe(recipe_file, overrides)
    model_spec = materialize_gguf(recipe.model)
    tokenizer = load_tokenizer(model_spec)
    bundle = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels)
    dataset = bundle.train if data else bundle.eval
    if dataset is None:
        raise LorafitError("the run has no held-out split", where="--data", fix="pass --data FILE")
    precision = resolve_precision(recipe.training)
    model = load_model(model_spec, recipe.quantization, precision,
                       num_labels=class_count(recipe.model.num_labels, bundle.label_names),
                       label_names=bundle.label_names, pad_token_id=tokenizer.pad_token_id)
    if recipe.quantization.bits == 4:
        from lorafit.stages.quantize import cpu_safe

        cpu_safe(model)
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(adapter_dir))
    import tempfile

    import torch

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="lorafit-eval-"),
                             per_device_eval_batch_size=recipe.evaluation.batch_size or recipe.training.batch_size,
                             report_to=[], disable_tqdm=True, remove_unused_columns=False,
                             use_cpu=not torch.cuda.is_available(), save_strategy="no")
    trainer = build_trainer(model, args, bundle.collator)
    result = evaluate_model(trainer, dataset, recipe.evaluation)
    result["data"] = str(data) if data else "held-out split of the run"
    result["adapter"] = str(adapter_dir)
    return json.loads(json.dumps(result, default=str))
