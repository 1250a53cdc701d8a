"""``lorafit estimate``: the memory plan of core.memory for a recipe (docs/estimate.md; ``schema_version`` 1)."""

from __future__ import annotations

from lorafit.core import memory
from lorafit.recipe import Recipe


def estimate(recipe: Recipe) -> dict:
    """The report behind ``lorafit estimate`` (a JSON-ready dict). Raises ModelError / RecipeError."""
    return memory.estimate(recipe)
