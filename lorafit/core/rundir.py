"""The run directory: what `lorafit train` writes under output.dir, listed once.

Each artifact says what a fresh run over an old one (``--overwrite``) does to it and whether ``lorafit push``
uploads it. The save stage, the report, validate's warning, evaluate, push and the adapter finder name
these files through here; a new artifact (a plot, predictions) is one more row.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

ADAPTER = "adapter"
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
REPORT = "report.md"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
PREDICTIONS = "eval_predictions.jsonl"
CONFUSION_PLOT = "confusion.png"


@dataclass(frozen=True)
class Artifact:
    name: str           # path inside the run dir
    what: str
    directory: bool
    overwrite: str      # a fresh run over an old one: "cleared" at its start, or "replaced" as it writes its own
    pushed: bool        # uploaded by `lorafit push RUN_DIR` (the adapter's files at the repo's root)


ARTIFACTS: tuple[Artifact, ...] = (
    # The old adapter goes before the new run writes anything: a new run that fails must not leave the old
    # adapter beside its new recipe.yaml, as if one had made the other.
    Artifact(ADAPTER, "the PEFT adapter + tokenizer (+ a classifier head's config.json)", True, "cleared", True),
    Artifact(RECIPE, "the fully resolved recipe", False, "replaced", False),
    Artifact(METRICS, "losses, base vs adapter, data statistics, versions, command line", False, "cleared", False),
    Artifact(REPORT, "did the adapter help: recipe, data, base vs adapter, failures, samples", False, "cleared", False),
    Artifact(LOSS_PLOT, "train and eval loss by step (beside report.md)", False, "cleared", False),
    Artifact(PREDICTIONS, "one line per eval row: its outcome (answer or class, right or wrong) or its loss",
             False, "cleared", False),
    Artifact(CONFUSION_PLOT, "classifiers: the confusion matrix (beside report.md)", False, "cleared", False),
    # An old run's checkpoints must never be resumed by a new recipe.
    Artifact(CHECKPOINTS, "resumable checkpoints (checkpoint-N)", True, "cleared", False),
)


def clear_for_fresh_run(run_dir: Path) -> list[str]:
    """Remove every artifact a fresh run does not write over at once (overwrite "cleared"): the old run's
    adapter and figures must not describe the new one. Returns the names removed."""
    removed = []
    for a in ARTIFACTS:
        path = Path(run_dir) / a.name
        if a.overwrite == "cleared" and (path.exists() or path.is_symlink()):
            if a.directory and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(a.name)
    return removed


def visible_files(directory: Path, prefix: str = "") -> dict[str, Path]:
    """Every file below *directory* by its path there (under *prefix*), hidden ones (temporaries) left out."""
    files: dict[str, Path] = {}
    for p in sorted(Path(directory).rglob("*")):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            files[prefix + rel] = p
    return files


def pushed_files(adapter_dir: Path, run_dir: Path | None) -> dict[str, Path]:
    """What `lorafit push` uploads of an adapter (and the run around it): path in the repo → local file."""
    files: dict[str, Path] = {}
    for a in ARTIFACTS:
        if not a.pushed:
            continue
        path = Path(adapter_dir) if a.name == ADAPTER else Path(run_dir) / a.name if run_dir else None
        if path is None or not path.exists():
            continue
        files.update(visible_files(path) if a.name == ADAPTER else
                     visible_files(path, f"{a.name}/") if a.directory else {a.name: path})
    return files
