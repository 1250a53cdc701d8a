"""Fixtures shared by the e2e modules: two tiny chat adapters that answer differently (serving tests)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

CHAT_BASE = REPO / "examples" / "tiny-llama"
CHAT_PROMPTS = ["What is the capital of France?", "Name a colour.", "Count to five.", "What is two plus two?"]
CHAT_SYSTEM = "You answer briefly."
# b's own template (not the base's ChatML): proves each adapter is asked with the template saved beside it.
CHAT_TEMPLATE_B = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '</s>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")


def chat_recipe(data, out, **lora) -> dict:
    return {"model": {"name": str(CHAT_BASE)},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", **lora},
            "data": {"train": str(data), "format": "chat", "eval_fraction": 0.0, "max_length": 128},
            "training": {"max_steps": 16, "batch_size": 4, "grad_accum": 1, "learning_rate": 1.0e-2,
                         "logging_steps": 100, "seed": 0},
            "evaluation": {"metrics": False},
            "output": {"dir": str(out)}}


def train_chat_adapter(root, name: str, answer: str, *, template: str | None = None, **lora):
    """A tiny chat adapter of examples/tiny-llama that answers *answer* to every prompt (lorafit train, in-process)."""
    rows = [{"messages": system + [{"role": "user", "content": p}, {"role": "assistant", "content": answer}]}
            for p in CHAT_PROMPTS for system in ([], [{"role": "system", "content": CHAT_SYSTEM}])]
    recipe = chat_recipe(write_jsonl(root / f"{name}.jsonl", rows), root / name, **lora)
    if template:
        recipe["data"]["chat_template"] = template
    proc = run_cli("train", write_recipe(root / f"{name}.yaml", recipe))
    assert proc.returncode == 0, proc.stderr
    return root / name


@pytest.fixture(scope="session")
def chat_runs(tmp_path_factory):
    """Run dirs 'a' (answers "Paris.", the base's ChatML), 'b' (answers "Blue.", its own template) and 'd'
    (a DoRA adapter, which peft cannot mix in a batch: answers "Four.")."""
    root = tmp_path_factory.mktemp("chat_runs")
    return {"a": train_chat_adapter(root, "a", "Paris."),
            "b": train_chat_adapter(root, "b", "Blue.", template=CHAT_TEMPLATE_B),
            "d": train_chat_adapter(root, "d", "Four.", use_dora=True)}
