"""docs/recipe.md is generated from the schema: it must not go stale."""

from pathlib import Path

from lorafit.tools.docs import render
from lorafit.recipe import Recipe

REPO = Path(__file__).resolve().parents[2]


def test_recipe_reference_is_up_to_date():
    committed = (REPO / "docs" / "recipe.md").read_text(encoding="utf-8")
    assert committed == render(), "docs/recipe.md is stale: run `make docs`"


def test_every_field_is_in_the_reference():
    text = render()  # that each field has a description is test_recipe's schema test
    for section, field in Recipe.model_fields.items():
        for name in field.annotation.model_fields:
            assert f"`{section}.{name}`" in text
