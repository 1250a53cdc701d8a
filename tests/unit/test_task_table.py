"""core.tasks: every row is complete, and the questions other modules ask it have one answer."""

from __future__ import annotations

import typing

from lorafit.core import tasks
from lorafit.recipe import DataFormat, Recipe
from lorafit.stages.evaluate import metric_function


def test_every_row_names_a_metric_function_that_exists():
    for t in tasks.TASKS.values():
        assert callable(metric_function(t.name)), t.scorer


def test_every_data_format_belongs_to_exactly_one_task():
    formats = [f for t in tasks.TASKS.values() for f in t.formats]
    assert sorted(formats) == sorted(typing.get_args(DataFormat))
    for t in tasks.TASKS.values():
        assert all(tasks.format_problem(t.name, f) is None for f in t.formats)
        others = [f for f in formats if f not in t.formats]
        assert all(tasks.format_problem(t.name, f) for f in others), t.name


def test_the_recipe_schema_offers_the_table_names():
    field = Recipe.model_json_schema()["$defs"]["ModelSpec"]["properties"]["task"]
    assert field["enum"] == list(tasks.TASKS) and field["default"] == tasks.DEFAULT


def test_derived_questions():
    causal, seq_cls, token_cls, seq2seq = (tasks.task(n) for n in tasks.TASKS)
    assert [t.causal for t in (causal, seq_cls, token_cls, seq2seq)] == [True, False, False, False]
    assert [t.row_label for t in (causal, seq_cls, token_cls, seq2seq)] == [False, True, False, False]
    assert tasks.task(None) is causal
