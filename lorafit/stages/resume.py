"""Resume rules: when a run may start, continue or start over in its run directory, in one place.

`--resume` continues the latest (or a named) checkpoint, and refuses a recipe changed in what shapes the
result (`--force` accepts it, recorded in metrics.json), a checkpoint of another adapter shape and a
finished run; `--overwrite` starts again; without either, a run dir holding an adapter or an interrupted
run is refused. Checkpoints a resume must never pick up (past a NaN loss, cut short mid-save) are dropped.
Every check here writes nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from lorafit.core import rundir
from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import OutputSpec, Recipe


def check_run_dir(spec: OutputSpec, *, resume: str | None) -> Path:
    """Refuse a run directory we must not write into. Creates nothing: a run that fails its checks
    leaves no trace."""
    run_dir = Path(spec.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{run_dir} exists and is a file", where="output.dir", fix="choose a directory path")
    if (run_dir / rundir.ADAPTER).exists() and not spec.overwrite and resume is None:
        raise RecipeError(f"{run_dir} already holds a trained adapter", where="output.dir",
                          fix="choose another output.dir (--output-dir DIR), pass --overwrite (output.overwrite: "
                              "true) to start again (the old run's adapter and files are deleted first), or train "
                              "it further with --resume and a higher training.max_steps (--set "
                              "training.max_steps=N)")
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
               "output.", "evaluation.", "advice.", "data.strict")


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
    """--resume from a checkpoint past the run's end (a lowered max_steps) would train on from there and call it
    shorter: refuse, naming the checkpoints it could resume. At the end itself, a run with its adapter is finished
    (resuming would rewrite its metrics): refuse; without one (its final save was cut short) the resume trains
    nothing and saves and evaluates the checkpoint's adapter."""
    state_file = Path(checkpoint) / "trainer_state.json"
    if not state_file.is_file():
        return
    state = json.loads(state_file.read_text(encoding="utf-8"))
    step, tr = state.get("global_step", 0), recipe.training
    name = Path(checkpoint).name
    if tr.max_steps is not None:
        end, where, asked = tr.max_steps, "training.max_steps", tr.max_steps
    else:  # epochs: the run's own length scaled to the epochs asked for (the same data, the same steps per epoch)
        planned, epochs = state.get("max_steps"), state.get("num_train_epochs")
        end = math.ceil(planned * tr.epochs / epochs - 1e-9) if planned and epochs else None
        where, asked = "training.epochs", tr.epochs
    if end is not None and step > end:
        earlier = sorted((p for p in Path(checkpoint).parent.glob("checkpoint-*")
                          if _step_of(p) is not None and _step_of(p) <= end), key=_step_of)
        resume = (f"resume from {earlier[-1].name} (--resume {earlier[-1]})" if earlier
                  else "train afresh with --overwrite")
        raise RecipeError(f"{name} is at step {step}, past the end of the run the recipe asks for ({where} {asked}: "
                          f"{end} steps): a resume cannot take steps back", where=where,
                          fix=f"{resume}, set {where} to reach step {step} or beyond, or --overwrite to start again")
    if (run_dir / rundir.ADAPTER).exists() and end is not None and step >= end:
        raise RecipeError(f"{run_dir} is a finished run: {name} is its last step ({where} {asked}); "
                          "resuming would train past its end", where=where,
                          fix=f"raise {where} (--set {where}=...) to train further, or use --overwrite to start again")


def _step_of(path: Path) -> int | None:
    suffix = path.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else None


def find_checkpoint(checkpoints_dir: Path, resume: str | None) -> str | None:
    """--resume → the latest checkpoint in the run; --resume PATH → that checkpoint."""
    if resume is None:
        return None
    if resume == "latest":
        last = latest_checkpoint(checkpoints_dir)
        if last is None:
            raise LorafitError(f"no checkpoint to resume from in {checkpoints_dir}", where="--resume",
                               fix="train without --resume, or pass a checkpoint directory")
        return last
    path = Path(resume)
    if not path.exists():
        raise LorafitError(f"checkpoint not found: {path}", where="--resume",
                           fix=f"pass one of {checkpoints_dir}/checkpoint-*, or --resume alone for the latest")
    if not (path / "trainer_state.json").is_file():
        raise LorafitError(f"{path} is not a checkpoint (no trainer_state.json)", where="--resume",
                           fix=f"pass one of {checkpoints_dir}/checkpoint-*")
    return str(path)


RESUME_KEYS = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "modules_to_save", "layers_to_transform")


def check_checkpoint(checkpoint: str, peft_model) -> None:
    """The checkpoint's adapter must have the shape the recipe now asks for, or loading it fails deep."""
    saved_file = Path(checkpoint) / "adapter_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text(encoding="utf-8"))
    current = peft_model.peft_config["default"].to_dict()

    def norm(value):
        return sorted(value) if isinstance(value, (list, set, tuple)) else value

    for key in RESUME_KEYS:
        if key in saved and norm(saved[key]) != norm(current.get(key)):
            raise LorafitError(f"{Path(checkpoint).name} was trained with {key}={norm(saved[key])}, the recipe now "
                               f"gives {norm(current.get(key))}", where="--resume",
                               fix="resume with the recipe that made the checkpoint, or train afresh without --resume")


def latest_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint (checkpoint-N, highest N; a .partial- one never), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None


def drop_checkpoints_after(checkpoints: Path, step: int) -> list[str]:
    """Remove the checkpoints past *step*: past the last finite loss they may hold NaN weights, and past the
    checkpoint a run resumes from they belong to steps it abandons. --resume must never pick them up. Returns
    their names."""
    dropped = []
    for ckpt in sorted(Path(checkpoints).glob("checkpoint-*"), key=lambda p: _step_of(p) or 0):
        if _step_of(ckpt) is not None and _step_of(ckpt) > step:
            shutil.rmtree(ckpt, ignore_errors=True)
            dropped.append(ckpt.name)
    return dropped


def drop_partial_checkpoints(checkpoints: Path) -> None:
    """A checkpoint save cut short (a second Ctrl-C) leaves .partial-checkpoint-N: never resumed, removed."""
    for partial in Path(checkpoints).glob(".partial-checkpoint-*"):
        shutil.rmtree(partial, ignore_errors=True)
