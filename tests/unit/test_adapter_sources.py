"""Adapter and run directories as the commands beside train read them: a blend's recorded recipe, the recipe
`lorafit evaluate` measures with, and where `lorafit blend` may write. Files only: no model is loaded."""

from __future__ import annotations

import json

import pytest
import yaml

from lorafit.core.adapters import BLEND_FILE, find_adapter
from lorafit.errors import LorafitError
from tests.conftest import write_jsonl

RECIPE = {"model": {"name": "m"}, "data": {"train": "/src/train.jsonl", "format": "alpaca", "packing": True,
                                           "eval_fraction": 0.1}}


def _adapter(directory, recipe: dict | None = None, blend: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "m", "task_type": "CAUSAL_LM"}))
    if recipe is not None:  # a lorafit run: recipe.yaml beside adapter/
        (directory.parent / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    if blend is not None:
        (directory / BLEND_FILE).write_text(json.dumps(blend))
    return directory


def test_a_blend_applies_the_overrides_to_its_recorded_recipe(tmp_path):
    source = _adapter(tmp_path / "run" / "adapter", RECIPE)
    blended = find_adapter(_adapter(tmp_path / "mix", blend={"recipe": RECIPE, "sources": [{"dir": str(source)}]}))
    assert blended.run_recipe().data.train == "/src/train.jsonl"
    recipe = blended.run_recipe(["data.train=/x/rows.jsonl", "data.eval_fraction=0"])
    assert recipe.data.train == "/x/rows.jsonl" and recipe.data.eval_fraction == 0
    assert blended.run_recipe().data.train == "/src/train.jsonl"  # the recorded recipe itself is untouched


@pytest.mark.parametrize("blend", [False, True])
def test_evaluate_measures_a_packed_run_unpacked(tmp_path, blend):
    from lorafit.commands.evaluate import _adapter_recipe

    adapter = _adapter(tmp_path / "run" / "adapter", RECIPE)
    if blend:
        adapter = _adapter(tmp_path / "mix", blend={"recipe": RECIPE, "sources": [{"dir": str(adapter)}]})
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    for data in (None, rows):
        recipe = _adapter_recipe(find_adapter(adapter), data)
        assert recipe.data.packing is False
        assert recipe.data.train == (str(rows) if data else "/src/train.jsonl")


@pytest.mark.parametrize("where", ["run", "run/adapter", "."])
def test_blend_refuses_an_output_that_holds_a_source(tmp_path, where):
    from lorafit.core.files import check_output

    sources = [find_adapter(_adapter(tmp_path / "other" / "adapter", RECIPE)),
               find_adapter(_adapter(tmp_path / "run" / "adapter", RECIPE))]
    dirs = [d for s in sources for d in (s.adapter_dir, s.run_dir)]
    with pytest.raises(LorafitError, match="holds a source") as e:
        check_output(tmp_path / where, dirs, overwrite=True)  # --overwrite would remove the source
    assert e.value.where == "--output"
    check_output(tmp_path / "run-blend", dirs, overwrite=True)  # a sibling is fine


def test_recipe_or_none_reads_the_run_s_recipe_or_says_why_it_goes_on_without(tmp_path, capsys):
    assert find_adapter(_adapter(tmp_path / "run" / "adapter", RECIPE)).recipe_or_none(
        ["data.packing=false"]).data.packing is False
    assert find_adapter(_adapter(tmp_path / "solo")).recipe_or_none() is None  # no run: nothing to say
    capsys.readouterr()
    stale = {**RECIPE, "lora": {"r": "many"}}  # a run whose recipe no longer validates
    assert find_adapter(_adapter(tmp_path / "old" / "adapter", stale)).recipe_or_none() is None
    assert "the run's recipe cannot be read" in capsys.readouterr().err
