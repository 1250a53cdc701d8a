"""No check that passes and then fails (issue 25): what `train` would refuse after loading the model, `validate`
refuses first, and `train` refuses before any weight loads or anything is written.

- transformers' own TrainingArguments refusals (built for real by validate and train, before the model);
- `precision: bf16` on a GPU that does not compute in bf16 (injected into the one capability check);
- `--output-dir` is a path, never YAML; alpaca prompt templates checked; `find-targets --task` did-you-mean;
- a hub id that is not cached, on a machine that cannot reach the hub: an error in about a second, not ~25 s
  of retries.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

TINY = REPO / "examples" / "tiny-llama"
ROWS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."} for i in range(8)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checks_agree")
    write_jsonl(root / "train.jsonl", ROWS)
    return root


def recipe(root: Path, name: str, *, data: dict | None = None, training: dict | None = None) -> Path:
    return write_recipe(root / f"{name}.yaml", {
        "model": {"name": str(TINY)},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(root / "train.jsonl"), "format": "alpaca", "max_length": 256, "eval_fraction": 0.25,
                 **(data or {})},
        "training": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, **(training or {})},
        "evaluation": {"metrics": False},
        "output": {"dir": str(root / name)}})


def errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


# ----------------------------------------------------------------------------------------------
# TrainingArguments and precision


def test_a_training_arguments_refusal_is_exit_2_before_the_model_loads(root):
    """accelerate's environment asks for DeepSpeed, which is not installed: transformers' TrainingArguments
    refuses. It used to be an internal failure (exit 1) after the model loaded and the run dir was written."""
    path = recipe(root, "ds-env")
    env = {"ACCELERATE_USE_DEEPSPEED": "true"}
    checked = run_cli("validate", path, env=env)
    trained = run_cli("train", path, env=env)
    assert checked.returncode == trained.returncode == 2, checked.stderr + trained.stderr
    assert errors(checked) == errors(trained) and len(errors(checked)) == 1, checked.stderr + trained.stderr
    line = errors(checked)[0]
    assert "deepspeed" in line.lower() and "ACCELERATE_USE_DEEPSPEED" in line, line
    assert "lora:" not in trained.stderr, "refused before the model loaded"
    assert not (root / "ds-env").exists(), "refused before the run dir was written"


@pytest.fixture
def old_gpu(monkeypatch):
    """A CUDA GPU without bfloat16 (a V100), injected into the one capability check every decision reads."""
    from lorafit.core import policies

    monkeypatch.setattr(policies, "machine", lambda: policies.Machine("cuda", bf16=False, name="Tesla V100-SXM2-16GB"))
    return policies


def test_bf16_on_a_gpu_without_it_is_refused_before_anything_loads(root, old_gpu):
    path = recipe(root, "bf16-v100", training={"precision": "bf16"})
    checked = run_cli("validate", path)
    trained = run_cli("train", path)
    assert checked.returncode == trained.returncode == 2, checked.stderr + trained.stderr
    line = errors(checked)[0]
    assert errors(trained) == [line]
    assert "training.precision" in line and "Tesla V100" in line and "precision: auto" in line, line
    assert "data:" not in trained.stderr and not (root / "bf16-v100").exists()


def test_auto_precision_never_chooses_bf16_where_the_gpu_lacks_it(old_gpu):
    from lorafit.recipe import TrainingSpec

    assert old_gpu.precision(TrainingSpec(precision="auto")) == "fp32"
    assert old_gpu.precision(TrainingSpec(precision="fp16")) == "fp16"


def test_the_shipped_large_recipes_choose_their_precision():
    import yaml

    for path in sorted((REPO / "recipes").glob("*-[78]b-*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["training"].get("precision", "auto") == "auto", path.name
        assert doc["model"].get("dtype", "auto") == "auto", path.name


@pytest.mark.gpu
def test_bf16_on_this_gpu_agrees_with_transformers(root):
    """On a real GPU: validate builds the real TrainingArguments; bf16 is accepted exactly where the GPU has it."""
    import torch

    native = torch.cuda.get_device_capability()[0] >= 8
    checked = run_cli("validate", recipe(root, "bf16-real", training={"precision": "bf16"}))
    assert checked.returncode == (0 if native else 2), checked.stderr


# ----------------------------------------------------------------------------------------------
# The command line and the recipe


@pytest.mark.parametrize("name", ["exp #3", "2024-06-01", "no", "null"])
def test_output_dir_is_a_path_never_yaml(root, name):
    """`--resume` with no checkpoint stops before anything loads, naming the directory the run would use."""
    proc = run_cli("train", recipe(root, "plain"), "--output-dir", name, "--resume", cwd=root)
    assert proc.returncode == 2, proc.stderr
    assert f"no checkpoint to resume from in {root / name / 'checkpoints'}" in proc.stderr, proc.stderr


def test_alpaca_templates_are_checked_at_validate(root):
    path = recipe(root, "no-instruction", data={"prompt_template_no_input": "Answer this:\n"})
    proc = run_cli("validate", path)
    assert proc.returncode == 2, proc.stderr
    assert "data.prompt_template_no_input" in proc.stderr and "{instruction}" in proc.stderr, proc.stderr


def test_alpaca_templates_keep_literal_braces(root):
    """A template may show JSON: only {instruction} and {input} are filled in (was a KeyError, exit 1)."""
    template = 'Reply as JSON, e.g. {"answer": 4}.\n{instruction}\n'
    path = recipe(root, "braces", data={"prompt_template_no_input": template,
                                        "prompt_template": 'As JSON {"answer": ...}: {instruction} ({input})\n'})
    proc = run_cli("validate", path, "--show-example", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r'Reply as JSON, e.g. \{"answer": 4\}.\nWhat is \d plus \d\?\n', proc.stdout), proc.stdout


def test_find_targets_task_is_a_choice_with_did_you_mean():
    proc = run_cli("find-targets", TINY, "--task", "seqcls")
    assert proc.returncode == 2, proc.stderr
    assert errors(proc) and "--task" in errors(proc)[0] and "did you mean 'seq_cls'" in errors(proc)[0], proc.stderr
    assert "Traceback" not in proc.stderr and "internal failure" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# A hub id on a machine that cannot reach the hub


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_uncached_hub_id_fails_fast_when_the_hub_cannot_be_reached(root):
    """HF_HUB_OFFLINE unset, the hub's endpoint refusing connections: huggingface_hub used to retry five times
    (~25 s per command). Now about a second, and the fix says that a folder with config.json alone is enough."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE", "LORAFIT_DEBUG")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HOME=str(root / "empty-hf-home"))
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lorafit", "find-targets", "acme/not-cached-model"], env=env,
                          capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    line = errors(proc)[0]
    assert "acme/not-cached-model" in line and "cannot be reached" in line and "config.json" in line, line
    assert seconds < 15, f"{seconds:.1f} s: the hub was retried"


# ----------------------------------------------------------------------------------------------
# Tokens the model's embedding lacks


def test_a_token_the_embedding_lacks_is_exit_2_naming_its_row_in_validate_and_train(root):
    """A token added to the tokenizer and not to the model (ids past the embedding's rows) used to stop training
    with an IndexError (exit 1) once the model had loaded; validate only advised. Now both refuse, naming the
    row (file:line), before any weight loads or anything is written. Unused added tokens stay advice."""
    import shutil

    from transformers import AutoTokenizer

    model = root / "added-tokens-model"
    shutil.copytree(TINY, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    assert len(tokenizer) == 384
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"], special_tokens=True)
    tokenizer.save_pretrained(str(model))
    rows = ROWS[:6] + [{"instruction": "Call the tool.", "input": "", "output": "<tool_call>add(2, 2)</tool_call>"}]
    write_jsonl(root / "tools.jsonl", rows)
    path = recipe(root, "added-tokens", data={"train": str(root / "tools.jsonl")})
    path.write_text(path.read_text().replace(str(TINY), str(model)))
    for command in ("validate", "train"):
        proc = run_cli(command, path)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        said = errors(proc) if command == "train" else [l for l in (proc.stdout + proc.stderr).splitlines()
                                                           if "has no row" in l]
        assert len(said) == 1, (command, proc.stdout, proc.stderr)
        assert f"tools.jsonl:7: token id 385 ('</tool_call>') has no row in the model's input embedding (384 rows)" \
            in said[0] and "resize_token_embeddings" in said[0], said
    assert not (root / "added-tokens").exists()
    write_jsonl(root / "tools.jsonl", ROWS[:6])  # the same tokenizer, no added token in the data: advice only
    proc = run_cli("validate", path)
    assert proc.returncode == 0 and "[new-tokens]" in proc.stdout, proc.stdout + proc.stderr
