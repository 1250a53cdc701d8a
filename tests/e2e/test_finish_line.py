"""Never lose the adapter at the finish line (issue 25): the adapter is saved before the final evaluation,
which Ctrl-C / SIGTERM / out-of-memory may cut short without losing it; --overwrite leaves no old adapter
beside a new recipe; --resume says where it resumes, never trains past max_steps and says what extending a
run does to its learning rate; `lorafit evaluate` refuses data that changed since training."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli

SMOKE = REPO / "recipes" / "tiny-smoke.yaml"
ENV = {"OMP_NUM_THREADS": "1"}
EIGHT = ["--set", "training.max_steps=8", "--set", "training.save_steps=4", "--set", "training.eval_steps=4",
         "--set", "training.logging_steps=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run (checkpoints at 4 and 8, evaluations at 4 and 8) on its own copy of the data."""
    root = tmp_path_factory.mktemp("finish")
    data = shutil.copy(REPO / "examples" / "data" / "tiny-alpaca.jsonl", root / "data.jsonl")
    run = root / "run"
    proc = run_cli("train", SMOKE, *EIGHT, "--set", f"data.train={data}", "--output-dir", run, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return run, proc, data


def _copy(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _again(run, data, *extra):
    return run_cli("train", SMOKE, *EIGHT, "--set", f"data.train={data}", *extra, "--output-dir", run, env=ENV)


def _steps(run):
    return json.loads((run / "metrics.json").read_text())["train"]["steps"]


def test_eval_loss_is_printed_once_per_evaluation_and_the_generation_cost_before_it(finished):
    _, proc, _ = finished
    said = [line for line in proc.stderr.splitlines() if "eval loss" in line]
    assert said == [line for line in said if line.startswith(("step 4:", "step 8:"))] and len(said) == 2, said
    cost = next(line for line in proc.stderr.splitlines() if line.startswith("evaluate: greedy generation"))
    assert "base and adapter" in cost and "generated tokens at most" in cost, cost


def test_resuming_the_final_checkpoint_trains_no_step_past_max_steps(finished, tmp_path):
    run, _, data = finished
    run = _copy(run, tmp_path)
    shutil.rmtree(run / "adapter")  # the save was cut short: the final checkpoint is all there is
    proc = _again(run, data, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-8, step 8/8" in proc.stderr
    assert "step 9/" not in proc.stderr and _steps(run) == 8
    from safetensors.torch import load_file

    saved, final = (load_file(str(d / "adapter_model.safetensors"))
                    for d in (run / "adapter", run / "checkpoints" / "checkpoint-8"))
    assert all((saved[k] == final[k]).all() for k in final)


def test_a_checkpoint_past_a_lowered_max_steps_is_refused(finished, tmp_path):
    run, _, data = finished
    run = _copy(run, tmp_path)
    shutil.rmtree(run / "adapter")
    proc = _again(run, data, "--set", "training.max_steps=6", "--resume")
    assert proc.returncode == 2, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: training.max_steps:") and "checkpoint-8" in error and "checkpoint-4" in error
    assert (run / "checkpoints" / "checkpoint-8").is_dir() and _steps(run) == 8


def test_extending_a_finished_run_says_what_happens_to_the_learning_rate(finished, tmp_path):
    run, _, data = finished
    run = _copy(run, tmp_path)
    proc = _again(run, data, "--set", "training.max_steps=12", "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-8, step 8/12" in proc.stderr
    warning = next(line for line in proc.stderr.splitlines() if "learning-rate schedule" in line)
    assert "recomputed for 12 steps" in warning and "8-step schedule stood at 0," in warning, warning
    assert _steps(run) == 12


def test_resuming_an_older_checkpoint_drops_the_abandoned_later_ones(finished, tmp_path):
    run, _, data = finished
    run = _copy(run, tmp_path)
    shutil.rmtree(run / "adapter")
    (run / "checkpoints" / "checkpoint-8" / "trainer_state.json").write_text("{broken")  # proof it was not read
    proc = _again(run, data, "--resume", run / "checkpoints" / "checkpoint-4")
    assert proc.returncode == 0, proc.stderr
    assert "resuming from checkpoint-4, step 4/8" in proc.stderr
    assert "dropped checkpoint-8" in proc.stderr
    state = json.loads((run / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8  # written again by the resumed run


def test_overwrite_clears_the_old_adapter_before_the_new_run_can_fail(finished, tmp_path):
    run, _, data = finished
    run = _copy(run, tmp_path)
    proc = _again(run, data, "--set", "training.learning_rate=1e30", "--overwrite")
    assert proc.returncode == 2 and "NaN" in proc.stderr, proc.stderr
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    assert "1e+30" in (run / "recipe.yaml").read_text() or "1.0e+30" in (run / "recipe.yaml").read_text()


def test_evaluate_refuses_data_changed_since_training_unless_data_is_given(finished):
    run, _, data = finished
    original = data.read_bytes()
    try:
        data.write_bytes(original.replace(b"Bonjour.", b"Salut."))
        proc = run_cli("evaluate", run, env=ENV)
        assert proc.returncode == 2, proc.stderr
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith(f"error: {data}:") and "sha256" in error and "--data" in error, error
        on_purpose = run_cli("evaluate", run, "--data", data, "--json", env=ENV)
        assert on_purpose.returncode == 0, on_purpose.stderr
        assert json.loads(on_purpose.stdout)["eval_rows"] == 32
    finally:
        data.write_bytes(original)
    assert run_cli("evaluate", run, "--json", env=ENV).returncode == 0


def _signal_during_evaluation(run, sig):
    """`lorafit train` with a long final generation; *sig* once its cost line says evaluation has begun."""
    env = {**os.environ, **ENV}
    env.pop("LORAFIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(SMOKE), "--set", "training.max_steps=2",
                             "--set", "data.eval_fraction=0.5", "--set", "evaluation.max_new_tokens=400",
                             "--set", "evaluation.batch_size=2", "--output-dir", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("evaluate: greedy generation"):
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation_keeps_the_adapter(tmp_path, sig, code):
    run = tmp_path / "run"
    rc, err = _signal_during_evaluation(run, sig)
    assert rc == code, err
    assert "Traceback" not in err
    said = err.strip().splitlines()[-1]
    assert said.startswith(f"interrupted ({sig.name}) during the final evaluation") and \
        f"lorafit evaluate {run}" in said, said
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2 and "lorafit evaluate" in metrics["eval"]["not_measured"]
    assert "lorafit evaluate" in (run / "report.md").read_text()


def test_a_second_ctrl_c_while_a_checkpoint_is_written_says_it_was_not_written(tmp_path, monkeypatch):
    """Two real SIGINTs sent from inside the save of checkpoint-4 (when its optimizer state is written)."""
    import torch

    real_save, calls = torch.save, []

    def save(obj, f, *args, **kw):
        if str(f).endswith("optimizer.pt"):
            calls.append(str(f))
            if len(calls) == 2:  # checkpoint-2 is whole; checkpoint-4 is being written
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    proc = run_cli("train", SMOKE, "--set", "training.max_steps=8", "--set", "training.save_steps=2",
                   "--output-dir", run, env=ENV)
    assert proc.returncode == 130, proc.stderr
    said = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert said and "while writing checkpoint-4, which was not written" in said[0], said
    assert f"{run / 'checkpoints' / 'checkpoint-2'} (step 2)" in said[0], said
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["checkpoint-2"]
    assert "resume with: lorafit train" in proc.stderr
