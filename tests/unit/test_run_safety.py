"""Runs are never lost (issue 17), piece by piece: refusals before any write, the recipe comparison of
--resume, the finished-run guard, the save clock and stop flag, atomic checkpoints, the whole-run loss."""

from __future__ import annotations

import json
import signal

import pytest

from lorafit.errors import RecipeError, TrainingInterrupted
from lorafit.recipe import OutputSpec, dump_recipe, validate_recipe
from lorafit.stages import resume as S
from lorafit.stages import train as T

BASE = {"model": {"name": "m"}, "data": {"train": "d.jsonl"}, "training": {"max_steps": 8}}


def _recipe(out, **sections):
    raw = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    raw["output"] = {"dir": str(out), **raw.get("output", {})}
    return validate_recipe(raw)


def _run(tmp_path, *, steps=(), adapter=False, recipe=None):
    run = tmp_path / "run"
    for step in steps:
        ckpt = run / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 8,
                                                             "num_train_epochs": 1}))
    if adapter:
        (run / "adapter").mkdir(parents=True)
    run.mkdir(exist_ok=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe or _recipe(run)))
    return run


def test_an_interrupted_run_is_refused_without_resume_or_overwrite(tmp_path):
    run = _run(tmp_path, steps=(4,))
    with pytest.raises(RecipeError) as e:
        S.check_run_dir(OutputSpec(dir=str(run)), resume=None)
    assert e.value.where == "output.dir" and "checkpoint-4" in str(e.value)
    assert "--resume" in e.value.fix and "--overwrite" in e.value.fix
    S.check_run_dir(OutputSpec(dir=str(run)), resume="latest")
    S.check_run_dir(OutputSpec(dir=str(run), overwrite=True), resume=None)


def test_a_finished_run_names_overwrite(tmp_path):
    run = _run(tmp_path, steps=(8,), adapter=True)
    with pytest.raises(RecipeError, match="already holds a trained adapter") as e:
        S.check_run_dir(OutputSpec(dir=str(run)), resume=None)
    assert "--overwrite" in e.value.fix


def test_resume_refuses_a_changed_recipe_and_lists_the_fields(tmp_path):
    run = _run(tmp_path, steps=(4,))
    ckpt = str(run / "checkpoints" / "checkpoint-4")
    changed = _recipe(run, training={"learning_rate": 1e-3, "max_steps": 8}, lora={"r": 8})
    with pytest.raises(RecipeError) as e:
        S.check_resume(run, changed, ckpt, force=False)
    assert e.value.where == "--resume" and "--force" in e.value.fix
    assert "lora.r: 16 → 8" in str(e.value) and "training.learning_rate: 0.0002 → 0.001" in str(e.value)
    before = (run / "recipe.yaml").read_text()
    assert S.check_resume(run, changed, ckpt, force=True) == ["lora.r: 16 → 8",
                                                              "training.learning_rate: 0.0002 → 0.001"]
    assert (run / "recipe.yaml").read_text() == before  # checks write nothing


def test_run_length_frequencies_and_output_may_change_on_resume(tmp_path):
    run = _run(tmp_path, steps=(4,))
    free = _recipe(tmp_path / "elsewhere", training={"max_steps": 20, "epochs": 3, "logging_steps": 1,
                                                     "eval_steps": 2, "save_steps": 3, "save_minutes": 1,
                                                     "save_total_limit": 5},
                   evaluation={"max_samples": 3}, output={"run_name": "x"})
    assert S.check_resume(run, free, str(run / "checkpoints" / "checkpoint-4"), force=False) == []
    assert S.check_resume(run, free, None, force=False) == []  # not a resume: nothing to compare


def test_resume_of_a_finished_run_is_refused_naming_max_steps(tmp_path):
    run = _run(tmp_path, steps=(8,), adapter=True)
    ckpt = str(run / "checkpoints" / "checkpoint-8")
    with pytest.raises(RecipeError) as e:
        S.check_resume(run, _recipe(run), ckpt, force=False)
    assert e.value.where == "training.max_steps" and "raise training.max_steps" in e.value.fix
    assert S.check_resume(run, _recipe(run, training={"max_steps": 12}), ckpt, force=False) == []
    # Interrupted at the very end (no adapter yet): resuming finishes the run.
    (run / "adapter").rmdir()
    S.check_resume(run, _recipe(run), ckpt, force=False)


def test_whole_run_loss_weights_each_log_entry_by_its_steps():
    history = [{"step": 1, "loss": 4.0}, {"step": 5, "loss": 2.0}, {"eval_loss": 9.0, "step": 5},
               {"step": 8, "loss": 1.0}]
    assert T.whole_run_loss(history, 8) == pytest.approx((4 + 4 * 2 + 3 * 1) / 8)
    assert T.whole_run_loss(history, 10) is None  # steps 9-10 not in the log


def _state(step=3, max_steps=10):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step, state.max_steps = step, max_steps
    return state


def test_a_stop_request_saves_logs_and_stops_before_the_end():
    from transformers import TrainerControl

    stop = T.StopRequest()
    clock = T._stop_and_clock(stop, save_minutes=None)
    control = TrainerControl()
    clock.on_step_end(None, _state(), control)
    assert not (control.should_save or control.should_training_stop)
    stop.signum = signal.SIGTERM
    clock.on_step_end(None, _state(), control)
    assert control.should_save and control.should_training_stop and control.should_log
    last = TrainerControl()
    clock.on_step_end(None, _state(10, 10), last)  # the last step: the run simply finishes
    assert not last.should_training_stop


def test_the_save_clock_asks_for_a_checkpoint_when_due(monkeypatch):
    from transformers import TrainerControl

    now = [1000.0]
    monkeypatch.setattr(T.time, "monotonic", lambda: now[0])
    clock = T._stop_and_clock(T.StopRequest(), save_minutes=10)
    clock.on_train_begin(None, _state(), TrainerControl())
    control = TrainerControl()
    now[0] += 9 * 60
    clock.on_step_end(None, _state(), control)
    assert not control.should_save
    now[0] += 61
    clock.on_step_end(None, _state(), control)
    assert control.should_save and control.should_log and not control.should_training_stop
    clock.on_save(None, _state(), control)
    control = TrainerControl()
    clock.on_step_end(None, _state(), control)
    assert not control.should_save


def test_the_first_signal_sets_a_flag_the_second_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # Python's default_int_handler; SIG_IGN under a background job
    stop = T.StopRequest()
    with stop.installed():
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # the handler that was there is back


def test_interrupted_exit_codes():
    assert TrainingInterrupted(signal.SIGINT, step=1, max_steps=2, checkpoint=None).exit_code == 130
    assert TrainingInterrupted(signal.SIGTERM, step=1, max_steps=2, checkpoint=None).exit_code == 143


def test_a_checkpoint_cut_short_leaves_the_last_good_one(tmp_path, tiny_llama, monkeypatch):
    """The checkpoint is written under .partial-checkpoint-N: a failure mid-save (a second Ctrl-C) leaves
    no checkpoint-N for --resume to pick up, and the earlier checkpoints whole."""
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_total_limit=1)
    trainer = T.build_trainer(model, args, None)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    trainer.state.global_step = 3
    trainer._save_checkpoint(trainer.model, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_save_rng_state", boom)
    trainer.state.global_step = 5
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint(trainer.model, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-checkpoint-5", "checkpoint-3"]
    assert T._latest_checkpoint(tmp_path).endswith("checkpoint-3")
    monkeypatch.undo()
    trainer._save_checkpoint(trainer.model, None)  # the next save: renamed into place, the old one rotated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
