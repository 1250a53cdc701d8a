"""Limits that come from the model: data.max_length against its context, and the seed that shapes a
new classification head (issue 14's first items)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import REPO, run_cli, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_max_length_above_the_context_is_refused_before_anything_is_written(tmp_path):
    """BERT with the default max_length (1024) used to crash mid-training with exit 1."""
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "bert.yaml", {
        "model": {"name": str(REPO / "examples" / "tiny-bert"), "task": "seq_cls"},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-sentiment.jsonl"), "format": "classification"},
        "training": {"max_steps": 1},
        "output": {"dir": str(run)},
    })
    with ThreadPoolExecutor(max_workers=2) as pool:
        validate, train = pool.map(lambda cmd: run_cli(cmd, recipe, env=ENV), ["validate", "train"])
    for proc in (validate, train):
        assert proc.returncode == 2, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: data.max_length: 1024 tokens is above the context") and "512 tokens" in line
        assert "set data.max_length to 512 or less" in line and "Traceback" not in proc.stderr
    assert not run.exists()


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """The classification head a run starts from, per seed (learning rate ~0: the saved head is the init).
    The base is a causal LM checkpoint, so its seq_cls head (score) is new: drawn at load time."""
    import torch
    from safetensors.torch import load_file

    from lorafit.pipeline import train
    from lorafit.recipe import load_recipe

    root = tmp_path_factory.mktemp("seeds")
    torch.set_num_threads(1)
    out = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        recipe = load_recipe(REPO / "recipes" / "tiny-bert-classification.yaml", [
            f"model.name={REPO / 'examples' / 'tiny-llama'}", "lora.target_modules=[q_proj,v_proj]",
            f"output.dir={root / name}", f"training.seed={seed}", "training.max_steps=1",
            "training.learning_rate=1e-12", "evaluation.compare_base=false", "data.eval_fraction=0"])
        train(recipe)
        weights = load_file(str(root / name / "adapter" / "adapter_model.safetensors"))
        out[name] = {k: v for k, v in weights.items() if ".score." in k}
    return out


def test_the_seed_shapes_the_new_head(heads):
    assert heads["a"] and heads["a"].keys() == heads["c"].keys()
    assert all((heads["a"][k] == heads["b"][k]).all() for k in heads["a"])       # same seed, same head
    assert any(not (heads["a"][k] == heads["c"][k]).all() for k in heads["a"])   # another seed, another head
