"""`lorafit sweep`'s pure parts: --grid / --range parsed as the issue writes them, each value handed to the point
as the very --set text (parsed by --set's own code), safe and unique run-dir names, the corners checked for a
random search, and the ranking: Pareto front and the smallest point within the tolerance of the best."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError
from lorafit.recipe import apply_override
from lorafit.sweep import space
from lorafit.sweep.plan import Metric, probe_points
from lorafit.sweep.results import pareto, recommend


def test_values_split_at_commas_outside_brackets_and_quotes():
    split = space.split_outside_brackets
    assert split("[q_proj,v_proj],all-linear", ",") == ["[q_proj,v_proj]", "all-linear"]
    assert split("'a,b', {x: 1, y: 2},3", ",") == ["'a,b'", "{x: 1, y: 2}", "3"]
    axis = space.parse_grid("lora.target_modules=[q_proj,v_proj],all-linear")
    assert axis.keys == ("lora.target_modules",) and axis.choices == (("[q_proj,v_proj]",), ("all-linear",))


def test_keys_that_vary_together():
    axis = space.parse_grid("lora.r,lora.alpha=8,16;16,32")
    assert axis.keys == ("lora.r", "lora.alpha") and axis.choices == (("8", "16"), ("16", "32"))
    points = space.grid_points([axis, space.parse_grid("training.learning_rate=2e-4,1e-3")])
    assert [p.sets for p in points] == [
        ["lora.r=8", "lora.alpha=16", "training.learning_rate=2e-4"],
        ["lora.r=8", "lora.alpha=16", "training.learning_rate=1e-3"],
        ["lora.r=16", "lora.alpha=32", "training.learning_rate=2e-4"],
        ["lora.r=16", "lora.alpha=32", "training.learning_rate=1e-3"]]
    with pytest.raises(LorafitError, match="has 1 value"):
        space.parse_grid("lora.r,lora.alpha=8,16;16")


def test_a_point_hands_its_value_to_set_as_typed_and_gets_a_safe_dir_name():
    (point,) = space.grid_points([space.parse_grid("lora.target_modules=[q_proj,v_proj]")])
    assert point.sets == ["lora.target_modules=[q_proj,v_proj]"]
    assert point.name == "lora.target_modules=q_proj+v_proj"
    raw: dict = {}
    for item in point.sets:
        apply_override(raw, item)  # what `lorafit train --set` does with it
    assert raw == {"lora": {"target_modules": ["q_proj", "v_proj"]}}
    odd = space.grid_points([space.parse_grid("data.train=a/b.jsonl,a_b.jsonl")])
    assert [p.name for p in odd][0] != [p.name for p in odd][1]  # a/b and a_b do not share a dir
    assert all("/" not in p.name for p in odd)
    long = space.grid_points([space.parse_grid("data.prompt_template=" + "x" * 200 + "{instruction}")])
    assert len(long[0].name) <= space.NAME_LIMIT


def test_ranges_and_their_mistakes():
    axis = space.parse_range("training.learning_rate=1e-5:1e-3:log")
    assert (axis.low, axis.high, axis.log, axis.integer) == (1e-5, 1e-3, True, False)
    assert space.parse_range("lora.r=4:64:int").integer
    for bad, message in [("lora.r=64:4", "below"), ("x=0:1:log", "LO > 0"), ("lora.r=1.5:4:int", "whole"),
                         ("lora.r=1:4:cube", "unknown option"), ("lora.r=a:b", "not numbers")]:
        with pytest.raises(LorafitError, match=message):
            space.parse_range(bad)
    assert space.format_number(0.000312345, False) == "0.000312"
    assert space.format_number(7.6, True) == "8"


def test_keys_are_checked_by_sets_own_code():
    with pytest.raises(LorafitError, match=r"--grid lora\.rr: unknown key; did you mean 'r'\?"):
        space.check_axes([space.parse_grid("lora.rr=1,2")], max_steps=None)
    with pytest.raises(LorafitError, match="varies twice"):
        space.check_axes([space.parse_grid("lora.r=1,2"), space.parse_range("lora.r=1:4:int")], max_steps=None)
    with pytest.raises(LorafitError, match="--max-steps"):
        space.check_axes([space.parse_grid("training.max_steps=1,2")], max_steps=5)


def test_random_search_checks_every_choice_and_both_ends():
    axes = [space.parse_grid("lora.r=2,4,8"), space.parse_range("lora.dropout=0:0.9")]
    probes = [p.sets for p in probe_points(axes)]
    assert probes == [["lora.r=2", "lora.dropout=0.0"], ["lora.r=4", "lora.dropout=0.0"],
                      ["lora.r=8", "lora.dropout=0.0"], ["lora.r=2", "lora.dropout=0.9"]]


def _rec(name, params, metric, loss=1.0):
    return {"name": name, "status": "finished", "trainable_params": params, "adapter_bytes": params * 4,
            "metric": metric, "eval_loss": loss, "values": {}, "texts": {}}


def test_recommendation_is_the_smallest_point_within_the_tolerance_of_the_best():
    records = [_rec("r8", 8, 0.95), _rec("r32", 32, 0.96), _rec("r2", 2, 0.80), _rec("r16", 16, 0.96),
               {**_rec("broken", 1, None), "status": "failed"}]
    rec = recommend(Metric("exact_match", True), 0.02, records)
    assert rec["name"] == "r8" and rec["best"]["name"] == "r16"  # r16 beats r32: as good, smaller
    assert sorted(rec["within"]) == ["r16", "r32", "r8"]
    assert recommend(Metric("exact_match", True), 0.0, records)["name"] == "r16"
    assert pareto(Metric("exact_match", True), records) == ["r8", "r2", "r16"]
    losses = [_rec("a", 8, 0.50), _rec("b", 2, 0.52), _rec("c", 4, 0.60)]
    assert recommend(Metric("eval_loss", False), 0.05, losses)["name"] == "b"
    assert recommend(Metric("eval_loss", False), 0.01, losses)["name"] == "a"
    assert recommend(Metric("eval_loss", False), 0.05, []) is None
