"""Save stage: the run directory, written so that a failed run never leaves a half-written adapter."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import OutputSpec, Recipe, dump_recipe


def check_run_dir(spec: OutputSpec, *, resume: str | None) -> Path:
    """Refuse a run directory we must not write into. Creates nothing: a run that fails its checks
    leaves no trace."""
    run_dir = Path(spec.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"{run_dir} exists and is a file", where="output.dir", fix="choose a directory path")
    if (run_dir / "adapter").exists() and not spec.overwrite and resume is None:
        raise RecipeError(f"{run_dir} already holds a trained adapter", where="output.dir",
                          fix="choose another output.dir (--output-dir DIR), set output.overwrite: true, or --resume")
    return run_dir


def start_run_dir(run_dir: Path, recipe: Recipe, *, resume: str | None) -> None:
    """Create the run directory and write the resolved recipe. A fresh run over an old one (overwrite)
    drops the old checkpoints: --resume must never pick up another recipe's state."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        (run_dir / "metrics.json").unlink(missing_ok=True)
    write_recipe(run_dir, recipe)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, doc: dict) -> None:
    write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")


def write_recipe(run_dir: Path, recipe: Recipe) -> None:
    write_text_atomic(run_dir / "recipe.yaml", dump_recipe(recipe))


def save_adapter(model, tokenizer, run_dir: Path, *, expected_modules: int) -> Path:
    """Write adapter/ via a temporary sibling and an atomic rename, after checking what was written."""
    from safetensors import safe_open

    final = run_dir / "adapter"
    tmp = run_dir / f".adapter.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        weights = tmp / "adapter_model.safetensors"
        if not (tmp / "adapter_config.json").is_file() or not weights.is_file():
            raise LorafitError(f"peft wrote no adapter files to {tmp}")
        with safe_open(str(weights), "pt") as f:
            n_a = sum(1 for k in f.keys() if "lora_A" in k)
        if n_a < expected_modules:  # e.g. an empty adapter gathered from sharded training
            raise LorafitError(f"the saved adapter holds {n_a} LoRA matrices, expected {expected_modules}")
        old = run_dir / f".adapter.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
