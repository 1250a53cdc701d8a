"""`lorafit sweep --apply`: the recommended recipe is validated before it is written (never an invalid file left
beside the recipe), written whole, and never over an existing one without --overwrite (refused before any
training)."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import load_recipe
from lorafit.sweep import space
from lorafit.sweep.plan import make_plan
from lorafit.sweep.results import apply_recommendation, recommend
from tests.conftest import REPO, run_cli, write_recipe


def _recipe(tmp_path):
    return write_recipe(tmp_path / "tiny.yaml", {
        "model": {"name": str(REPO / "examples" / "tiny-llama")},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-alpaca.jsonl"), "format": "alpaca"},
        "output": {"dir": str(tmp_path / "out")}})


def _recommended(plan, point) -> dict:
    record = {"name": point.name, "values": {}, "texts": dict(point.values), "status": "finished", "metric": 0.5,
              "trainable_params": 1000, "adapter_bytes": 4000, "eval_loss": 1.0}
    return recommend(plan.metric, plan.tolerance, [record])


def test_the_recommended_recipe_is_validated_first_and_never_replaces_one_silently(tmp_path):
    plan = make_plan(_recipe(tmp_path), [], [space.parse_grid("lora.dropout=0.1,1.5")], search="grid", trials=None,
                     max_steps=2, metric=None, tolerance=0.01, parallel=1, overwrite=False)
    good, bad = plan.points  # dropout 1.5: not a recipe (a point that changed since it was checked)
    target = tmp_path / "tiny.recommended.yaml"
    with pytest.raises(RecipeError, match="does not validate.*lora.dropout"):
        apply_recommendation(plan, _recommended(plan, bad))
    assert not target.exists()
    assert apply_recommendation(plan, _recommended(plan, good)) == target
    assert load_recipe(target).lora.dropout == 0.1 and load_recipe(target).training.max_steps is None
    target.write_text("# my own\n")
    with pytest.raises(LorafitError, match="exists"):
        apply_recommendation(plan, _recommended(plan, good))
    assert target.read_text() == "# my own\n"
    apply_recommendation(plan, _recommended(plan, good), overwrite=True)
    assert load_recipe(target).lora.dropout == 0.1


def test_an_existing_recommended_recipe_is_refused_before_any_training(tmp_path):
    recipe = _recipe(tmp_path)
    (tmp_path / "tiny.recommended.yaml").write_text("# my own\n")
    result = run_cli("sweep", recipe, "--grid", "lora.r=2,4", "--max-steps", "2", "--apply")
    assert result.returncode == 2 and result.stderr.startswith("error: --apply: "), result.stderr
    assert "tiny.recommended.yaml exists" in result.stderr and "--overwrite" in result.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "tiny.recommended.yaml").read_text() == "# my own\n"
