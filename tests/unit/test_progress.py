"""The progress lines: the loss just logged (not one two steps old), the last step's loss, learning rate
and grad norm, and evaluation batches counted while they run."""

from __future__ import annotations

from lorafit.stages import train as T


class Loader:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _state(step, max_steps=20, tokens=0):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step, state.max_steps, state.num_input_tokens_seen = step, max_steps, tokens
    state.is_world_process_zero = True
    return state


def test_plain_lines_show_the_loss_just_logged_with_lr_and_grad_norm(capsys):
    from transformers import TrainerControl

    progress = T._progress_callback()
    progress.on_train_begin(None, _state(0), TrainerControl())
    for step, loss in ((1, 2.5), (2, 2.25), (3, 2.0)):
        control = TrainerControl()
        progress.on_step_end(None, _state(step, max_steps=3, tokens=100 * step), control)
        assert control.should_log == (step == 3)  # the last step is always logged
        progress.on_log(None, _state(step, max_steps=3, tokens=100 * step), control,
                        logs={"loss": loss, "learning_rate": 1e-4 * step, "grad_norm": 0.5})
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert lines[-1].startswith("step 3/3  loss 2.0000  lr 0.0003  grad_norm 0.5")
    assert [ln.split()[1] for ln in lines] == ["1/3", "2/3", "3/3"]


def test_evaluation_batches_are_counted_while_they_run(capsys):
    from transformers import TrainerControl

    progress = T._progress_callback()
    progress.on_train_begin(None, _state(0), TrainerControl())
    for _ in range(12):
        progress.on_prediction_step(None, _state(5), TrainerControl(), eval_dataloader=Loader(12))
    progress.on_evaluate(None, _state(5), TrainerControl(), metrics={"eval_loss": 3.5})
    err = capsys.readouterr().err
    assert "eval: 3/12 batches" in err and "eval: 9/12 batches" in err and "eval: 12/12" not in err
    assert "step 5: eval loss 3.5000" in err
    # Once training ends, the evaluate stage's passes are its own to report: no second "eval loss" line.
    progress.on_train_end(None, _state(5), TrainerControl())
    progress.on_evaluate(None, _state(5), TrainerControl(), metrics={"base_loss": 3.4})
    assert "loss" not in capsys.readouterr().err
