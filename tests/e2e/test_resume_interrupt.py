"""Runs are never lost (issue 17): a real Ctrl-C / SIGTERM sent to a real `lorafit train`, the printed
resume command, resume to the very adapter an uninterrupted run makes, and the refusals that keep a run's
files as they were (interrupted rerun, finished resume, changed recipe)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli

SMOKE = REPO / "recipes" / "tiny-smoke.yaml"
ENV = {"OMP_NUM_THREADS": "1"}  # CPU fp32, one thread: bit-for-bit reproducible
STEPS = ["--set", "training.max_steps=30", "--set", "training.logging_steps=1"]


def _interrupt(run, *extra, signals=(signal.SIGINT,)):
    """Start `lorafit train`, send the signals once the first progress line is on stderr, wait."""
    env = {**os.environ, **ENV}
    env.pop("LORAFIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(SMOKE), *STEPS, *extra,
                             "--output-dir", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("step "):
            for sig in signals:
                proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=300)
    return proc.returncode, "".join(seen) + rest


def _cli(*args):
    return run_cli(*map(str, args), env=ENV)


def _tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def _digests(run):
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_ctrl_c_checkpoints_and_resume_gives_the_uninterrupted_adapter(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    rc, err = _interrupt(run)
    assert rc == 130, err
    assert "interrupted (SIGINT): stopped after step" in err and "Traceback" not in err
    command = next(line for line in err.splitlines() if line.startswith("resume with: "))
    argv = shlex.split(command.removeprefix("resume with: "))
    assert argv == ["lorafit", "train", str(SMOKE), *STEPS, "--output-dir", str(run), "--resume"]
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    checkpoints = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    stopped_at = int(checkpoints[0].rsplit("-", 1)[1])
    assert 1 <= stopped_at < 30

    # A rerun without --resume must not wipe the interrupted run's checkpoints.
    before = _digests(run)
    rerun = _cli("train", SMOKE, *STEPS, "--output-dir", run)
    assert rerun.returncode == 2 and rerun.stderr.startswith("error: output.dir:"), rerun.stderr
    assert "--resume" in rerun.stderr and "--overwrite" in rerun.stderr
    assert _digests(run) == before

    resumed = _cli(*argv[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert _cli("train", SMOKE, *STEPS, "--output-dir", ref).returncode == 0
    a, b = _tensors(run / "adapter"), _tensors(ref / "adapter")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    m, m_ref = (json.loads((d / "metrics.json").read_text())["train"] for d in (run, ref))
    assert m["steps"] == m_ref["steps"] == 30
    assert m["train_loss"] == pytest.approx(m_ref["train_loss"], rel=1e-6)  # the whole run, not the resumed part
    assert m["tokens_seen"] == m_ref["tokens_seen"]
    assert m["resumed_at_step"] == stopped_at and 0 < m["session_tokens"] < m["tokens_seen"]
    assert m["train_tokens_per_second"] == pytest.approx(m["session_tokens"] / m["train_seconds"], rel=1e-3)
    assert [h["step"] for h in m["loss_history"]][-1] == 30 and m["loss_history"][0]["step"] == 1

    # --resume on the finished run: refused, naming max_steps; nothing rewritten.
    before = _digests(run)
    again = _cli("train", SMOKE, *STEPS, "--output-dir", run, "--resume")
    assert again.returncode == 2 and again.stderr.startswith("error: training.max_steps:"), again.stderr
    assert _digests(run) == before

    # A changed recipe: refused with the changed fields, then --force records them.
    changed = ["--set", "training.max_steps=32", "--set", "training.learning_rate=1.0e-3"]
    refused = _cli("train", SMOKE, *STEPS, *changed, "--output-dir", run, "--resume")
    assert refused.returncode == 2 and "error: --resume: the recipe changed" in refused.stderr
    assert "training.learning_rate: 0.003 → 0.001" in refused.stderr and "--force" in refused.stderr
    assert "max_steps" not in refused.stderr.split(";")[0]  # run length may change
    assert _digests(run) == before
    forced = _cli("train", SMOKE, *STEPS, *changed, "--output-dir", run, "--resume", "--force")
    assert forced.returncode == 0, forced.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resume_forced_changes"] == ["training.learning_rate: 0.003 → 0.001"]
    assert metrics["train"]["steps"] == 32

    # --overwrite on the command line starts again.
    fresh = _cli("train", SMOKE, "--set", "training.max_steps=2", "--output-dir", run, "--overwrite")
    assert fresh.returncode == 0, fresh.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["checkpoint-2"]


def test_sigterm_checkpoints_and_exits_143(tmp_path):
    run = tmp_path / "run"
    rc, err = _interrupt(run, signals=(signal.SIGTERM,))
    assert rc == 143, err
    assert "interrupted (SIGTERM)" in err and "resume with: lorafit train" in err
    assert len(list((run / "checkpoints").glob("checkpoint-*"))) == 1


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_checkpoints_whole(tmp_path):
    run = tmp_path / "run"
    rc, err = _interrupt(run, "--set", "training.save_steps=1", signals=(signal.SIGINT, signal.SIGINT))
    assert rc == 130, err
    assert "interrupted (SIGINT)" in err and "Traceback" not in err
    assert not (run / "adapter").exists()
    for ckpt in (run / "checkpoints").glob("checkpoint-*"):
        for name in ("trainer_state.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            assert (ckpt / name).is_file(), (ckpt, name)
    if list((run / "checkpoints").glob("checkpoint-*")):
        resumed = _cli("train", SMOKE, *STEPS, "--set", "training.save_steps=1", "--output-dir", run, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert not list((run / "checkpoints").glob(".partial-*"))
