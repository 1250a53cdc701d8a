"""core.secrets: one rule for what a token looks like, used by the recipe, metrics.json's command line and push."""

from __future__ import annotations

import pytest

from lorafit.core.secrets import command_line, holds_token, redact
from lorafit.errors import RecipeError
from lorafit.recipe import validate_recipe

HF = "hf_" + "AbCdEfGhIjKlMnOpQr"  # 18 characters after hf_: a token by the one rule


@pytest.mark.parametrize("token, shown", [(HF, "hf_***"), ("sk-" + "a" * 24, "***"), ("ghp_" + "B" * 24, "***"),
                                          ("xoxb-" + "1" * 12, "***"), ("AKIA" + "ABCDEFGHIJKLMNOP", "***")])
def test_every_token_shape_is_hidden(token, shown):
    assert redact(f"got {token}.") == f"got {shown}." and holds_token(token)


def test_what_is_no_token_is_left_alone():
    for text in ("hf_token", "push.hf_token=xyz", "task-" + "a" * 30, "lora.r=8", "sk-short"):
        assert redact(text) == text and not holds_token(text)


def test_the_recipe_and_the_command_line_follow_the_same_rule():
    # What the recipe refuses, metrics.json's command line hides: the same token shapes, whichever kind.
    for token in (HF, "sk-" + "a" * 24):
        with pytest.raises(RecipeError, match="access token"):
            validate_recipe({"model": {"name": "m"}, "data": {"train": "d.jsonl"}, "output": {"run_name": token}})
        assert token not in " ".join(command_line(["lorafit", "train", "r.yaml", "--set", f"output.dir={token}"]))
    assert command_line(["/x/lorafit", "train", f"/runs/{HF}.yaml"]) == ["lorafit", "train", "/runs/***.yaml"]


def test_the_environment_token_is_hidden_whatever_its_shape(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-secret-value")
    assert redact("a plain-secret-value b") == "a hf_*** b"
    assert redact("the hub said: bad token abcdefgh", "abcdefgh") == "the hub said: bad token hf_***"
