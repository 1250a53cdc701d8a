"""Save stage: the run directory, written so that a failed run never leaves a half-written adapter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lorafit.core import rundir
from lorafit.core.files import atomic_dir, atomic_write_text
from lorafit.core.weights import lora_modules, read_header
from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import OutputSpec, Recipe, dump_recipe


def check_run_dir(spec: OutputSpec, *, resume: str | None) -> Path:
    """Refuse a run directory we must not write into. Creates nothing: a run that fails its checks
    leaves no trace."""
    run_dir = Path(spec.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{run_dir} exists and is a file", where="output.dir", fix="choose a directory path")
    if (run_dir / rundir.ADAPTER).exists() and not spec.overwrite and resume is None:
        raise RecipeError(f"{run_dir} already holds a trained adapter", where="output.dir",
                          fix="choose another output.dir (--output-dir DIR), pass --overwrite (output.overwrite: "
                              "true) to replace it, or --resume to train it further")
    checkpoints = sorted(p.name for p in (run_dir / rundir.CHECKPOINTS).glob("checkpoint-*")) if run_dir.is_dir() else []
    if checkpoints and not (run_dir / rundir.ADAPTER).exists() and not spec.overwrite and resume is None:
        raise RecipeError(f"{run_dir} holds the checkpoints of an interrupted run ({', '.join(checkpoints)}) and "
                          "no adapter", where="output.dir",
                          fix="add --resume to continue it, --overwrite to start again (deleting them), or "
                              "choose another output.dir (--output-dir DIR)")
    return run_dir


# What may change between a run and its resume: run length, logging/eval/save frequency, trackers, the
# run directory, the final evaluation, and memory- or speed-only switches. Everything else shapes the adapter.
RESUME_FREE = ("training.epochs", "training.max_steps", "training.logging_steps", "training.eval_steps",
               "training.save_steps", "training.save_minutes", "training.save_total_limit", "training.report_to",
               "training.gradient_checkpointing", "training.compile", "training.liger", "model.attn_implementation",
               "output.", "evaluation.")


def check_resume(run_dir: Path, recipe: Recipe, checkpoint: str | None, *, force: bool) -> list[str]:
    """--resume: refuse a recipe that changed in what shapes the result (unless force: then the changes
    are returned, for metrics.json), and a run that is already finished. Writes nothing."""
    if checkpoint is None:
        return []
    # The recipe of the run that wrote the checkpoint (the run dir's own, for --resume alone).
    source = next((p for p in (Path(checkpoint).parent.parent / rundir.RECIPE, run_dir / rundir.RECIPE)
                   if p.is_file()), None)
    changes = recipe_changes(source, recipe) if source else []
    if changes and not force:
        shown = "; ".join(changes[:8]) + (f"; ... ({len(changes) - 8} more)" if len(changes) > 8 else "")
        raise RecipeError(f"the recipe changed since {Path(checkpoint).name} was written: {shown}", where="--resume",
                          fix=f"resume with the recipe in {source}, add --force to resume anyway (the changes are "
                              "recorded in metrics.json), or train afresh with --overwrite")
    check_not_finished(run_dir, checkpoint, recipe)
    return changes


def recipe_changes(old_file: Path, recipe: Recipe) -> list[str]:
    """'dotted.path: old → new' for each field that shapes the result and differs."""
    import yaml

    from lorafit.recipe import validate_recipe

    raw = yaml.safe_load(old_file.read_text(encoding="utf-8")) or {}
    try:  # fill in defaults a recipe.yaml from an older lorafit lacks
        raw = validate_recipe(raw, source=str(old_file)).model_dump(mode="json")
    except RecipeError:
        pass
    old, new = _flatten(raw), _flatten(recipe.model_dump(mode="json"))
    return [f"{key}: {old.get(key, '(unset)')!r} → {new.get(key, '(unset)')!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not key.startswith(RESUME_FREE)]


def _flatten(doc, prefix: str = "") -> dict:
    out = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_not_finished(run_dir: Path, checkpoint: str, recipe: Recipe) -> None:
    """--resume on a finished run would train past its end (step 9/8) and rewrite its metrics: refuse."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not (run_dir / rundir.ADAPTER).exists() or not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    step, tr = state.get("global_step", 0), recipe.training
    if tr.max_steps is not None:
        finished, where, end = step >= tr.max_steps, "training.max_steps", tr.max_steps
    else:  # epochs: finished when the run was epoch-based too and did not ask for more
        finished = step >= state.get("max_steps", step + 1) and tr.epochs <= state.get("num_train_epochs", 0)
        where, end = "training.epochs", tr.epochs
    if finished:
        raise RecipeError(f"{run_dir} is a finished run: {Path(checkpoint).name} is its last step ({where} {end}); "
                          "resuming would train past its end", where=where,
                          fix=f"raise {where} (--set {where}=...) to train further, or use --overwrite to start again")


def start_run_dir(run_dir: Path, recipe: Recipe, *, resume: str | None) -> None:
    """Create the run directory and write the resolved recipe. A fresh run over an old one (overwrite)
    clears the old run's artifacts (core.rundir): --resume must never pick up another recipe's state, and
    no old figure may describe the new run. The old adapter stays until the new one replaces it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        rundir.clear_for_fresh_run(run_dir)
    for partial in (run_dir / rundir.CHECKPOINTS).glob(".partial-checkpoint-*"):  # a save cut short by a 2nd Ctrl-C
        shutil.rmtree(partial, ignore_errors=True)
    write_recipe(run_dir, recipe)


def write_json(path: Path, doc: dict) -> None:
    atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    atomic_write_text(run_dir / rundir.RECIPE, dump_recipe(recipe))


def save_label_config(model, directory: Path) -> None:
    """A classification head's classes travel with the adapter: the trained model's config.json (num_labels,
    id2label, label2id, pad_token_id) beside adapter_config.json. peft records none of them, and a head
    reloaded with the base's own config would have the wrong size and no class names."""
    from lorafit.core import tasks

    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and tasks.from_peft_type(getattr(config, "task_type", None)).labelled:
        model.config.to_json_file(str(Path(directory) / "config.json"))


def save_adapter(model, tokenizer, run_dir: Path, *, expected_modules: int, state_dict: dict | None = None) -> Path:
    """Write adapter/ via a temporary sibling and an atomic rename (core.files), after checking what was written.
    *state_dict*: the full state gathered from sharded training (core.distributed.gather_adapter_state);
    peft keeps the adapter's part of it. None: the live weights, whole in this process."""
    final = run_dir / rundir.ADAPTER
    with atomic_dir(final) as tmp:
        # save_embedding_layers=False: lorafit never resizes embeddings, and peft would ask the hub (core.libs).
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False,
                              **({"state_dict": state_dict} if state_dict is not None else {}))
        tokenizer.save_pretrained(str(tmp))
        save_label_config(model, tmp)
        weights = tmp / "adapter_model.safetensors"
        if not (tmp / "adapter_config.json").is_file() or not weights.is_file():
            raise LorafitError(f"peft wrote no adapter files to {tmp}")
        header = read_header(weights)
        n_a = len(lora_modules(header))
        empty = [k for k, t in header.items() if 0 in t.shape]
        if empty:  # a shard's empty placeholder saved instead of the gathered tensor
            raise LorafitError(f"the saved adapter holds {len(empty)} empty tensors (first: {empty[0]})")
        if n_a < expected_modules:  # e.g. an empty adapter gathered from sharded training
            raise LorafitError(f"the saved adapter holds {n_a} LoRA matrices, expected {expected_modules}")
    return final
