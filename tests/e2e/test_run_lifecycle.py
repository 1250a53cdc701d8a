"""The run directory's life: no trace when checks fail, overwrite starts clean, resume only what fits."""

from __future__ import annotations

import json
import shutil

from tests.conftest import REPO, run_cli

SMOKE = REPO / "recipes" / "tiny-smoke.yaml"


def test_a_run_that_fails_its_checks_creates_no_directory(tmp_path):
    run = tmp_path / "run"
    proc = run_cli("train", SMOKE, "--output-dir", run, "--set", f"data.train={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 2 and "data.train" in proc.stderr
    assert not run.exists()


def test_overwrite_drops_old_checkpoints_and_resume_refuses_another_recipes_state(tmp_path):
    run = tmp_path / "run"
    first = run_cli("train", SMOKE, "--output-dir", run, "--set", "lora.r=4", "--set", "training.max_steps=2",
                    "--set", "training.save_steps=1")
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]

    # --resume placed before the recipe still means "the latest checkpoint".
    # The recipe comparison refuses first; --force (a changed recipe accepted) still meets the shape check.
    mismatch = run_cli("train", "--resume", SMOKE, "--output-dir", run, "--set", "lora.r=2")
    assert mismatch.returncode == 2
    assert mismatch.stderr.startswith("error: --resume: the recipe changed since checkpoint-2 was written: "
                                      "lora.r: 4 → 2")
    assert "Traceback" not in mismatch.stderr
    recipe_before = (run / "recipe.yaml").read_text()
    forced = run_cli("train", "--resume", SMOKE, "--output-dir", run, "--set", "lora.r=2", "--set",
                     "training.max_steps=3", "--force")
    assert forced.returncode == 2
    assert "\nerror: --resume: checkpoint-2 was trained with r=4, the recipe now gives 2" in forced.stderr
    assert (run / "recipe.yaml").read_text() == recipe_before  # a refused resume writes nothing

    again = run_cli("train", SMOKE, "--output-dir", run, "--set", "lora.r=2", "--set", "output.overwrite=true",
                    "--set", "training.max_steps=1")
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-1"]


def test_evaluate_a_standalone_adapter_infers_the_format(tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", SMOKE, "--output-dir", run, "--set", "training.max_steps=10").returncode == 0
    solo = tmp_path / "solo"
    shutil.copytree(run / "adapter", solo)  # no recipe.yaml around it: a peft adapter from elsewhere
    data = REPO / "examples" / "data" / "tiny-alpaca.jsonl"
    proc = run_cli("evaluate", solo, "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["eval_rows"] == 32 and report["eval_loss"] < report["base_eval_loss"]
    lonely = run_cli("evaluate", solo)
    assert lonely.returncode == 2 and "--data" in lonely.stderr
