"""Every causal-LM family the foundation promises trains through the real pipeline, and its adapter
loads in plain peft and changes the model's output. In-process (one import of torch for all families)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl

FAMILIES = ["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox", "falcon"]


@pytest.fixture(scope="module")
def completion_data(tmp_path_factory):
    rows = [{"prompt": f"What is {a} plus {b}? ", "completion": f"It is {a + b}."} for a in range(4) for b in range(3)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_adapter_loads_in_plain_peft(family, tiny_models, completion_data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.pipeline import train
    from lorafit.recipe import validate_recipe

    model_dir = tiny_models(family)
    recipe = validate_recipe({
        "model": {"name": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(completion_data), "format": "completion", "eval_fraction": 0.2, "max_length": 64},
        "training": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "learning_rate": 1.0e-2, "logging_steps": 1},
        "output": {"dir": str(tmp_path / "run")},
    })
    result = train(recipe)

    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["trainable_params"] == result.metrics["trainable_params"] > 0
    assert metrics["eval"]["eval_loss"] > 0 and metrics["eval"]["base_eval_loss"] > 0

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-4, "the adapter did not change the logits"
