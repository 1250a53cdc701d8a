"""Save stage: the run directory, written so that a failed run never leaves a half-written adapter.

Whether a run may start here at all (a finished run, an interrupted one, --resume, --overwrite) is decided
first, in stages.resume."""

from __future__ import annotations

import json
from pathlib import Path

from lorafit import log
from lorafit.core import rundir
from lorafit.core.files import atomic_dir, atomic_write_text
from lorafit.core.weights import lora_modules, read_header
from lorafit.errors import LorafitError
from lorafit.recipe import Recipe, dump_recipe
from lorafit.stages.resume import drop_checkpoints_after, drop_partial_checkpoints
from lorafit.stages.resume import recipe_changes  # noqa: F401  (moved to stages.resume; lorafit.sweep imports it here)


def start_run_dir(run_dir: Path, recipe: Recipe, *, resume: str | None, checkpoint: str | None = None) -> list[str]:
    """Create the run directory and write the resolved recipe. A fresh run over an old one (overwrite)
    clears every artifact of the old run (core.rundir), its adapter included: --resume must never pick up
    another recipe's state, no old figure may describe the new run, and a new run that fails leaves no old
    adapter beside its recipe. A resume from *checkpoint* drops the later checkpoints it abandons. Returns
    their names."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:
        rundir.clear_for_fresh_run(run_dir)
    drop_partial_checkpoints(run_dir / rundir.CHECKPOINTS)
    dropped = []
    step = _checkpoint_step(checkpoint)
    if step is not None:
        dropped = drop_checkpoints_after(run_dir / rundir.CHECKPOINTS, step)
        if dropped:
            log.info(f"dropped {', '.join(dropped)}: the run continues from {Path(checkpoint).name}, "
                     "their steps are trained again")
    write_recipe(run_dir, recipe)
    return dropped


def _checkpoint_step(checkpoint: str | None) -> int | None:
    suffix = Path(checkpoint).name.rsplit("-", 1)[-1] if checkpoint else ""
    return int(suffix) if suffix.isdigit() else None


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
