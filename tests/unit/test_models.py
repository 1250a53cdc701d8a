"""core.models: where a name points, and which base an adapter is reloaded on."""

from __future__ import annotations

import pytest
import yaml

from lorafit.core import models
from lorafit.core.adapters import AdapterSource
from lorafit.core.prompts import inference_prompt
from lorafit.errors import ModelError
from lorafit.tools.tiny import build_tokenizer


def test_hub_id_or_local_path(tmp_path):
    assert models.is_hub_id("gpt2") and models.is_hub_id("meta-llama/Llama-3.1-8B")
    assert not models.is_hub_id("./model") and not models.is_hub_id("a/b/c") and not models.is_hub_id("bad name/x")
    assert models.local_path(str(tmp_path)) == tmp_path
    assert models.local_path("owner/name") is None
    with pytest.raises(ModelError, match="directory not found"):
        models.local_path("./no/such/dir")
    assert models.hub_id(str(tmp_path)) is None and models.hub_id("owner/name") == "owner/name"


def _source(tmp_path, recipe: dict | str | None, base="owner/base", recorded="owner/base", revision=None):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    if recipe is not None:
        (run / "recipe.yaml").write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    config = {"base_model_name_or_path": recorded, "task_type": "CAUSAL_LM", "revision": revision}
    return AdapterSource(run / "adapter", run if recipe is not None else None, config, base)


def test_base_spec_follows_the_run_and_drops_its_revision_for_another_base(tmp_path):
    recipe = {"model": {"name": "owner/base", "revision": "abc123", "trust_remote_code": True, "dtype": "bfloat16"},
              "quantization": {"bits": 4, "compute_dtype": "float16"}, "data": {"train": "x.jsonl"},
              "training": {"precision": "fp16"}}
    with pytest.raises(ModelError, match="add --trust-remote-code"):  # a run dir is no consent
        models.base_spec(_source(tmp_path / "0", recipe))
    with models.trusting_remote_code(True):
        spec, quant, training = models.base_spec(_source(tmp_path / "1", recipe))
        assert (spec.name, spec.revision, spec.trust_remote_code, spec.dtype) == ("owner/base", "abc123", True, "bfloat16")
        assert quant.bits == 4 and training.precision == "fp16"
        spec, _, _ = models.base_spec(_source(tmp_path / "2", recipe, base="other/base"))  # --base
    assert spec.name == "other/base" and spec.revision is None


def test_base_spec_without_a_usable_recipe_reads_adapter_config(tmp_path):
    spec, quant, training = models.base_spec(_source(tmp_path / "1", "model: [not, a, mapping]\n", revision="r1"))
    assert (spec.name, spec.revision, quant, training) == ("owner/base", "r1", None, None)
    spec, _, _ = models.base_spec(_source(tmp_path / "2", None, revision="r1"))
    assert spec.revision == "r1" and spec.task == "causal_lm"


def test_inference_prompt_without_a_run_uses_the_models_own_template():
    tok = build_tokenizer("llama")  # ChatML template
    text = inference_prompt("Hi?", tok, None, system="Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert inference_prompt("Hi?", build_tokenizer("gpt2"), None) == "Hi?"  # no template: the prompt as it is
