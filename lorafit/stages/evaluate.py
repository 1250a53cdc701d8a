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


def _adapter_recipe(source, data: Path | None):
    """The recipe to evaluate with: the run's own (its eval split, or --data in the same format), or for a
    standalone adapter one built from adapter_config.json and the format the --data rows show."""
    from lorafit.recipe import load_recipe, validate_recipe
    from lorafit.stages.data import infer_format, read_rows
    from lorafit.stages.inject import TASK_TYPES

    recipe_file = source.run_dir / "recipe.yaml" if source.run_dir else None
    if recipe_file is not None and recipe_file.is_file():
        overrides = [f"data.train={data}", "data.eval=null", "data.eval_fraction=0"] if data else []
        return load_recipe(recipe_file, overrides)
    if data is None:
        raise LorafitError(f"{source.adapter_dir} is not inside a lorafit run, so it has no held-out split",
                           where="--data", fix="pass --data FILE with the rows to evaluate on")
    rows = read_rows(str(data), where="--data")
    fmt = infer_format(rows[0])
    if fmt is None:
        raise LorafitError(f"cannot tell the format of {data} from its columns ({', '.join(rows[0])})",
                           where="--data", fix="use the columns of a lorafit format: text; instruction/input/output; "
                                               "messages; prompt/completion; text/label")
    task = {v: k for k, v in TASK_TYPES.items()}.get(source.config.get("task_type") or "CAUSAL_LM", "causal_lm")
    return validate_recipe({"model": {"name": source.base, "task": task},
                            "data": {"train": str(data), "format": fmt, "eval_fraction": 0}}, source="--data")


def evaluate_adapter(path: Path, data: Path | None) -> dict:
    """`lorafit evaluate`: held-out loss of base and base + adapter, for a run dir or an adapter dir."""
    from lorafit.adapters import find_adapter

    source = find_adapter(path)  # before the heavy imports: a wrong path fails at once
    recipe = _adapter_recipe(source, data)

    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, TrainingArguments

    from lorafit.log import quiet_libraries
    from lorafit.pipeline import class_count
    from lorafit.stages.data import build_datasets
    from lorafit.stages.load import load_model, load_tokenizer, materialize_gguf, resolve_precision
    from lorafit.stages.train import build_trainer

    quiet_libraries()
    model_spec = materialize_gguf(recipe.model)
    # The adapter's own tokenizer is the one training used (pad token, chat template).
    has_tokenizer = any((source.adapter_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(str(source.adapter_dir)) if has_tokenizer else load_tokenizer(model_spec)
    bundle = build_datasets(recipe.data, tokenizer, recipe.model.task, recipe.model.num_labels)
    dataset = bundle.train if data else bundle.eval
    if dataset is None:
        raise LorafitError("the run has no held-out split (data.eval_fraction was 0)", where="--data",
                           fix="pass --data FILE")
    model = load_model(model_spec, recipe.quantization, resolve_precision(recipe.training),
                       num_labels=class_count(recipe.model.num_labels, bundle.label_names),
                       label_names=bundle.label_names, pad_token_id=tokenizer.pad_token_id)
    if recipe.quantization.bits == 4:
        from lorafit.stages.quantize import cpu_safe

        cpu_safe(model)
    model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="lorafit-eval-"),
                             per_device_eval_batch_size=recipe.evaluation.batch_size or recipe.training.batch_size,
                             report_to=[], disable_tqdm=True, remove_unused_columns=False,
                             use_cpu=not torch.cuda.is_available(), save_strategy="no")
    result = evaluate_model(build_trainer(model, args, bundle.collator), dataset, recipe.evaluation)
    result["data"] = str(data) if data else "held-out split of the run"
    result["adapter"] = str(source.adapter_dir)
    return json.loads(json.dumps(result, default=str))
