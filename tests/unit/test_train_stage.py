"""The train stage's guards, each on its own: NaN stop, checkpoints past a NaN dropped, resume lookup,
checkpoint/recipe mismatch, and the 'did not learn' warnings."""

from __future__ import annotations

import json

import pytest

from lorafit.errors import LorafitError
from lorafit.stages import train as T


def _state(log_history=(), global_step=0):
    from transformers import TrainerState

    state = TrainerState()
    state.log_history = list(log_history)
    state.global_step = global_step
    return state


def test_nan_guard_stops_before_saving():
    from transformers import TrainerControl

    guard = T._nan_guard()
    control = TrainerControl(should_save=True)
    guard.on_log(None, _state(), control, logs={"loss": 1.5})
    assert not control.should_training_stop and control.should_save
    guard.on_log(None, _state(), control, logs={"loss": float("nan")})
    assert control.should_training_stop and not control.should_save
    control = TrainerControl(should_save=True)
    guard.on_log(None, _state(), control, logs={"loss": float("inf")})
    assert control.should_training_stop and not control.should_save


def test_checkpoints_past_the_last_finite_loss_are_dropped(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "notes").mkdir()
    T._drop_checkpoints_after(tmp_path, 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5", "notes"]


def _checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_find_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert T.find_checkpoint(ckpts, None) is None
    with pytest.raises(LorafitError, match="no checkpoint to resume from"):
        T.find_checkpoint(ckpts, "latest")
    _checkpoint(ckpts / "checkpoint-4", 4)
    _checkpoint(ckpts / "checkpoint-12", 12)
    assert T.find_checkpoint(ckpts, "latest").endswith("checkpoint-12")  # numeric order, not text order
    assert T.find_checkpoint(ckpts, str(ckpts / "checkpoint-4")).endswith("checkpoint-4")
    with pytest.raises(LorafitError, match="checkpoint not found"):
        T.find_checkpoint(ckpts, str(ckpts / "checkpoint-99"))
    (ckpts / "empty").mkdir()
    with pytest.raises(LorafitError, match="not a checkpoint"):
        T.find_checkpoint(ckpts, str(ckpts / "empty"))


def test_check_checkpoint_refuses_another_adapter_shape(tmp_path):
    class Cfg:
        def __init__(self, d):
            self.d = d

        def to_dict(self):
            return self.d

    class Model:
        peft_config = {"default": Cfg({"r": 8, "lora_alpha": 16, "target_modules": {"v_proj", "q_proj"}})}

    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    T.check_checkpoint(str(ckpt), Model())  # no adapter_config.json: nothing to compare
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    T.check_checkpoint(str(ckpt), Model())  # same shape (target order does not matter)
    (ckpt / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 16,
                                                          "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(LorafitError, match=r"r=4.*gives 8"):
        T.check_checkpoint(str(ckpt), Model())


def test_untrained_runs_are_warned_about(capsys):
    history = [{"step": s, "loss": 2.0, "grad_norm": 0.0 if s == 3 else 1.0} for s in range(1, 13)]
    T.warn_if_untrained({"loss_history": history, "first_loss": 2.0, "final_loss": 2.1, "steps": 12})
    err = capsys.readouterr().err
    assert "gradient norm was 0 at step 3" in err and "loss did not fall (2.0000 → 2.1000)" in err
    T.warn_if_untrained({"loss_history": history[:5], "first_loss": 2.0, "final_loss": 2.1, "steps": 5})
    assert "did not fall" not in capsys.readouterr().err  # too few steps for a verdict
    T.warn_if_untrained({"loss_history": [], "first_loss": 2.0, "final_loss": 0.5, "steps": 20})
    assert capsys.readouterr().err == ""
