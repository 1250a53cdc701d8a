"""A GGUF base for every task (issue 25, "no check that passes and then fails"): seq_cls and token_cls train on
a GGUF file whose tensors hold no task head (the head is new, as on any causal checkpoint); the file is
dequantized once, whatever the task; and validate runs train's tensor-mapping check, so a file that does
not map is refused by both, with one message, before any weight loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_jsonl, write_recipe
from tests.unit.test_gguf_convert import write_tiny_gguf


@pytest.fixture(scope="module")
def world(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_tasks")
    env = {"LORAFIT_CACHE": str(root / "cache")}
    gguf = write_tiny_gguf(tiny_llama, root / "tiny.F16.gguf")
    classes = write_jsonl(root / "cls.jsonl", [{"text": f"row {i} is {'good' if i % 2 else 'bad'}",
                                                "label": "pos" if i % 2 else "neg"} for i in range(12)])
    tags = write_jsonl(root / "tags.jsonl", [{"tokens": ["Ada", "lives", "in", "Paris"], "tags": ["PER", "O", "O", "LOC"]},
                                             {"tokens": ["Bob", "went", "home"], "tags": ["PER", "O", "O"]}] * 6)
    return {"root": root, "env": env, "gguf": gguf, "data": {"seq_cls": (classes, "classification"),
                                                             "token_cls": (tags, "tokens")}}


def recipe(world, task: str, name: str, gguf: Path | None = None) -> Path:
    data, fmt = world["data"][task]
    return write_recipe(world["root"] / f"{name}.yaml", {
        "model": {"name": str(gguf or world["gguf"]), "task": task},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "format": fmt, "max_length": 32, "eval_fraction": 0.0},
        "training": {"max_steps": 1, "batch_size": 4, "grad_accum": 1},
        "evaluation": {"metrics": False},
        "output": {"dir": str(world["root"] / name)}})


@pytest.mark.parametrize("task", ["seq_cls", "token_cls"])
def test_a_task_head_on_a_gguf_base_validates_and_trains(world, task):
    path = recipe(world, task, f"run-{task}")
    checked = run_cli("validate", path, env=world["env"])
    assert checked.returncode == 0, checked.stderr
    trained = run_cli("train", path, env=world["env"])
    assert trained.returncode == 0, trained.stderr  # was: score.weight / classifier "not in the file"
    saved = json.loads((world["root"] / f"run-{task}" / "adapter" / "adapter_config.json").read_text())
    assert saved["modules_to_save"], "the new head is trained in full and saved"


def test_one_conversion_per_file_whatever_the_task(world):
    for task in ("seq_cls", "token_cls"):
        if not (world["root"] / f"run-{task}" / "adapter").is_dir():
            assert run_cli("train", recipe(world, task, f"run-{task}"), env=world["env"]).returncode == 0
    converted = [p for p in (world["root"] / "cache" / "gguf").iterdir() if not p.name.startswith(".")]
    assert len(converted) == 1, converted
    marker = json.loads((converted[0] / "lorafit-gguf.json").read_text())
    assert "task" not in marker


def test_validate_refuses_what_train_refuses_before_any_weight_loads(world, tiny_llama, monkeypatch):
    holes = write_tiny_gguf(tiny_llama, world["root"] / "holes.gguf", drop=("blk.1.ffn_up.weight",))
    path = recipe(world, "seq_cls", "holes", gguf=holes)
    checked = run_cli("validate", path, env=world["env"])
    trained = run_cli("train", path, env=world["env"])
    assert checked.returncode == trained.returncode == 2, checked.stderr + trained.stderr
    error = [line for line in checked.stderr.splitlines() if line.startswith("error:")]
    assert error == [line for line in trained.stderr.splitlines() if line.startswith("error:")]
    assert "model.layers.1.mlp.up_proj.weight" in error[0] and "model.gguf_file" in error[0]
    assert "dequantizing" not in trained.stderr, "refused from the file's tensor names, before loading weights"
    assert not (world["root"] / "holes").exists()
