"""core.rundir: one list of a run dir's artifacts, which --overwrite clears and push uploads."""

from __future__ import annotations

from lorafit.core import rundir
from lorafit.recipe import validate_recipe
from lorafit.stages.save import start_run_dir


def _old_run(tmp_path):
    run = tmp_path / "run"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/.hidden",
                 "adapter/README.md", "checkpoints/checkpoint-2/trainer_state.json", "recipe.yaml",
                 "metrics.json", "report.md", "loss.png", "notes.txt"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("old")
    return run


def test_a_fresh_run_clears_every_artifact_of_the_old_run_adapter_included(tmp_path):
    run = _old_run(tmp_path)
    for name in ("eval_predictions.jsonl", "confusion.png"):
        (run / name).write_text("old")
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "d.jsonl"}, "output": {"dir": str(run)}})
    start_run_dir(run, recipe, resume=None)
    left = sorted(p.name for p in run.iterdir())
    # Every artifact is gone before the new run writes (a failed new run leaves no old adapter beside its new
    # recipe.yaml); the user's own file stays.
    assert left == ["notes.txt", "recipe.yaml"]
    assert {a.name for a in rundir.ARTIFACTS if a.overwrite == "cleared"}.isdisjoint(left)
    assert (run / "recipe.yaml").read_text() != "old"


def test_resuming_an_older_checkpoint_drops_the_later_ones(tmp_path):
    run = _old_run(tmp_path)
    for step in (4, 6):
        (run / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "d.jsonl"}, "output": {"dir": str(run)}})
    dropped = start_run_dir(run, recipe, resume=str(run / "checkpoints" / "checkpoint-4"),
                            checkpoint=str(run / "checkpoints" / "checkpoint-4"))
    assert dropped == ["checkpoint-6"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_resume_keeps_everything(tmp_path):
    run = _old_run(tmp_path)
    recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "d.jsonl"}, "output": {"dir": str(run)}})
    start_run_dir(run, recipe, resume="latest")
    assert (run / "metrics.json").is_file() and (run / "checkpoints" / "checkpoint-2").is_dir()


def test_push_uploads_the_pushed_artifacts_only(tmp_path):
    run = _old_run(tmp_path)
    files = rundir.pushed_files(run / "adapter", run)
    assert sorted(files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # hidden: never
    assert all(a.name == rundir.ADAPTER for a in rundir.ARTIFACTS if a.pushed)
