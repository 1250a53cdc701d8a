"""The training watchdog, provoked for real on the tiny Llama: LoRA weights that cannot move stop the run
(exit 2, no adapter); a loss that climbs far above its start is warned about, with the step."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit import pipeline
from lorafit.errors import RunFailed
from lorafit.recipe import load_recipe
from lorafit.stages import train as T
from tests.conftest import REPO, write_recipe


def _recipe(tmp_path: Path, model: Path, *, lora: dict, **training):
    doc = {"model": {"name": str(model)},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **lora},
           "data": {"train": str(REPO / "examples" / "data" / "tiny-alpaca.jsonl"), "format": "alpaca",
                    "eval_fraction": 0, "max_length": 128},
           "training": {"max_steps": 5, "batch_size": 4, "grad_accum": 1, "warmup_ratio": 0.0, "logging_steps": 1,
                        "lr_scheduler": "constant", **training},
           "evaluation": {"compare_base": False},
           "output": {"dir": str(tmp_path / "run")}}
    return load_recipe(write_recipe(tmp_path / "recipe.yaml", doc), [])


def _state(global_step):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step = global_step
    return state


# ---------------------------------------------------------------------------- the callbacks alone


def test_frozen_guard_checks_once_after_two_steps():
    import torch
    from transformers import TrainerControl

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            lora_b = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2, bias=False)})
            self.q = torch.nn.ModuleDict({"lora_B": lora_b})
            torch.nn.init.zeros_(self.q.lora_B.default.weight)

    model, guard = Model(), T._frozen_guard()
    guard.on_train_begin(None, _state(0), TrainerControl())
    control = TrainerControl(should_save=True)
    guard.on_step_end(None, _state(1), control, model=model)  # step 1 may run at learning rate 0: no verdict
    assert guard.frozen_at is None and not control.should_training_stop
    guard.on_step_end(None, _state(2), control, model=model)
    assert guard.frozen_at == 2 and control.should_training_stop and not control.should_save

    moved, guard = Model(), T._frozen_guard()
    with torch.no_grad():
        moved.q.lora_B.default.weight[0, 0] = 1e-30  # any movement at all counts
    guard.on_train_begin(None, _state(0), TrainerControl())
    guard.on_step_end(None, _state(2), TrainerControl(), model=moved)
    assert guard.frozen_at is None
    assert not T._lora_b_all_zero(torch.nn.Linear(2, 2))  # no LoRA at all: nothing to judge


def test_divergence_watch_thresholds(capsys):
    from transformers import TrainerControl, TrainingArguments

    args = TrainingArguments(output_dir="unused", learning_rate=0.5, report_to=[])
    watch = T._divergence_watch()
    for step, loss in [(1, 2.0), (2, 6.5), (3, 5.9), (4, float("nan")), (5, 2.5)]:
        watch.on_log(args, _state(step), TrainerControl(), logs={"loss": loss})
    assert watch.diverged_at is None  # step 2 is too early; 5.9 is under 3×2.0
    watch.on_log(args, _state(6), TrainerControl(), logs={"loss": 6.1})
    watch.on_log(args, _state(7), TrainerControl(), logs={"loss": 9.0})
    assert watch.diverged_at == 6
    err = capsys.readouterr().err
    assert err.count("warning: the loss is diverging") == 1 and "at step 6" in err and "training.learning_rate" in err

    small = T._divergence_watch()  # a tiny start: 3× of 0.05 is noise, a nat above it is not
    for step, loss in [(1, 0.05), (3, 0.9), (4, 1.2)]:
        small.on_log(args, _state(step), TrainerControl(), logs={"loss": loss})
    assert small.diverged_at == 4


# ---------------------------------------------------------------------------- real runs


def test_lora_that_cannot_move_stops_the_run_without_an_adapter(tmp_path, tiny_llama, monkeypatch):
    """The classic silent failure: reentrant gradient checkpointing whose inputs do not require grad. The
    LoRA layers inside the checkpointed blocks get no gradient; the head (modules_to_save) still trains, so
    the loss has a graph and nothing crashes: without the watchdog this saves a no-op adapter."""
    import transformers

    from lorafit.core import policies

    monkeypatch.setattr(policies, "GRADIENT_CHECKPOINTING_KWARGS", {"use_reentrant": True})
    monkeypatch.setattr(transformers.PreTrainedModel, "enable_input_require_grads", lambda self: None)
    recipe = _recipe(tmp_path, tiny_llama, lora={"target_modules": "all-linear", "modules_to_save": ["lm_head"]},
                     learning_rate=1e-3, gradient_checkpointing=True)
    with pytest.raises(RunFailed) as e:
        pipeline.train(recipe)
    assert e.value.exit_code == 2
    assert "every lora_B is still exactly zero after 2 optimizer steps" in e.value.message
    assert e.value.where == "training.gradient_checkpointing" and "enable_input_require_grads" in e.value.fix
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    assert not list((run / "checkpoints").glob("checkpoint-*"))


def test_gradient_checkpointing_as_shipped_trains_lora(tmp_path, tiny_llama):
    """The guard's control: the same recipe with lorafit's own checkpointing settings moves lora_B."""
    recipe = _recipe(tmp_path, tiny_llama, lora={"target_modules": "all-linear", "modules_to_save": ["lm_head"]},
                     learning_rate=1e-3, gradient_checkpointing=True, max_steps=3)
    result = pipeline.train(recipe)
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert result.metrics["train"]["diverged_at_step"] is None


def test_a_huge_learning_rate_is_warned_about_with_its_step(tmp_path, tiny_llama, capsys):
    """Training the output head at learning rate 1: the loss climbs to several times its start."""
    lora = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]}
    recipe = _recipe(tmp_path, tiny_llama, lora=lora, learning_rate=1.0, max_steps=6)
    result = pipeline.train(recipe)
    err = capsys.readouterr().err
    history = result.metrics["train"]["loss_history"]
    step = result.metrics["train"]["diverged_at_step"]
    assert step is not None and step >= T.DIVERGENCE_MIN_STEP, history
    loss = next(h["loss"] for h in history if h["step"] == step)
    assert loss > T.DIVERGENCE_FACTOR * history[0]["loss"]
    assert err.count("warning: the loss is diverging") == 1 and f"at step {step}," in err
