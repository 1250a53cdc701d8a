"""`lorafit sweep` (issue 32) on the tiny Llama: a 2×2 grid whose every figure is its point's own metrics.json,
the base evaluated once; a re-run that trains nothing; a point killed (SIGKILL) mid-run and a sweep stopped by
Ctrl-C, both resumed by the re-run; random search whose Optuna study a re-run resumes; and the mistakes that
are exit 2 before any training. The sweep runs in-process where its output is tested; its points are real
`lorafit train` processes (that is the design), so the points are few and 2 steps long."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, write_recipe

ENV = {"OMP_NUM_THREADS": "1"}  # the points' processes: one thread each on the shared CPU
STEPS = ["--max-steps", "2"]


def _recipe(tmp: Path, **training) -> Path:
    """tiny-smoke with absolute paths, small evaluation, in *tmp* (--apply writes beside it)."""
    return write_recipe(tmp / "tiny.yaml", {
        "model": {"name": str(REPO / "examples" / "tiny-llama")},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(REPO / "examples" / "data" / "tiny-alpaca.jsonl"), "format": "alpaca",
                 "eval_fraction": 0.125, "max_length": 256},
        "training": {"batch_size": 4, "grad_accum": 1, "learning_rate": 3.0e-3, "logging_steps": 1, "seed": 42,
                     **training},
        "evaluation": {"max_samples": 4, "generate_samples": 2, "max_new_tokens": 4},
        "output": {"dir": str(tmp / "out")},
    })


def _sweep(*args):
    return run_cli("sweep", *map(str, args), env=ENV)


def _metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep-grid")
    recipe = _recipe(tmp)
    args = [recipe, "--grid", "lora.r=2,4", "--grid", "training.learning_rate=1e-3,3e-3", *STEPS]
    result = _sweep(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, recipe, args, result


def test_grid_2x2_every_figure_is_the_points_metrics_json(grid):
    tmp, recipe, _, result = grid
    sweep_dir = tmp / "out" / "sweep"
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    names = ["lora.r=2,training.learning_rate=1e-3", "lora.r=2,training.learning_rate=3e-3",
             "lora.r=4,training.learning_rate=1e-3", "lora.r=4,training.learning_rate=3e-3"]
    assert [p["name"] for p in doc["points"]] == names
    assert doc["metric"] == {"name": "exact_match", "goal": "higher"}  # the task's headline metric
    fingerprints = set()
    for point in doc["points"]:
        run_dir = Path(point["run_dir"])
        assert run_dir == sweep_dir / point["name"] and point["status"] == "finished" and point["action"] == "trained"
        m = _metrics(run_dir)
        resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert point["values"] == {"lora.r": resolved["lora"]["r"],
                                   "training.learning_rate": resolved["training"]["learning_rate"]}
        assert resolved["training"]["max_steps"] == 2 and m["train"]["steps"] == 2 and m["seed"] == 42
        assert point["trainable_params"] == m["trainable_params"]
        assert point["adapter_bytes"] == (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
        assert point["eval_loss"] == m["eval"]["eval_loss"]
        assert point["metric"] == m["eval"]["metrics"]["exact_match"]["adapter"]
        assert point["tokens_per_second"] == m["train"]["train_tokens_per_second"]
        assert point["peak_memory_mb"] == m["memory"]["cpu_peak_rss_mb"]
        assert point["train_seconds"] == m["train"]["train_seconds"] and point["wall_seconds"] > 0
        fingerprints.add(m["data"]["fingerprint"])
    assert len(fingerprints) == 1  # one split for every point
    values = {p["name"]: p for p in doc["points"]}
    assert values[names[2]]["trainable_params"] == 2 * values[names[0]]["trainable_params"]  # r=4 vs r=2

    # The base model evaluated once, by the first point; the sweep's base row is its figure.
    measured = [p["name"] for p in doc["points"] if "base_eval_loss" in _metrics(p["run_dir"])["eval"]]
    assert measured == [names[0]]
    base = _metrics(sweep_dir / names[0])["eval"]
    assert doc["base"][0]["eval_loss"] == base["base_eval_loss"]
    assert doc["base"][0]["metric"] == base["metrics"]["exact_match"]["base"]

    # Pareto front and recommendation, recomputed here from the records.
    finished = doc["points"]
    front = [p["name"] for p in finished if not any(
        o["trainable_params"] <= p["trainable_params"] and o["metric"] >= p["metric"]
        and (o["trainable_params"] < p["trainable_params"] or o["metric"] > p["metric"]) for o in finished)]
    assert doc["pareto"] == front
    best = max(p["metric"] for p in finished)
    within = [p for p in finished if p["metric"] >= best * (1 - doc["tolerance"])]
    smallest = min(p["trainable_params"] for p in within)
    assert doc["recommended"]["trainable_params"] == smallest
    assert doc["recommended"]["name"] in [p["name"] for p in within]

    # The printed table and the files.
    out = result.stdout
    assert "ranked by exact_match (higher is better)" in out
    table = [line.split() for line in out.splitlines() if line[:1].isdigit() or line.startswith("base ")]
    assert [row[0] for row in table] == ["base", "1", "2", "3", "4"]
    assert table[1][1:4] == ["2", "1e-3", "finished"]
    assert out.count("recommended") >= 2 and "written: " in out
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((sweep_dir / "sweep.csv").read_text().strip().splitlines()) == 1 + 4
    assert "| 1 | 2 | 1e-3 | finished |" in (sweep_dir / "sweep.md").read_text()


def test_rerun_trains_nothing_reranks_and_applies(grid):
    tmp, recipe, args, _ = grid
    sweep_dir = tmp / "out" / "sweep"
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")}
    result = _sweep(*args, "--metric", "eval_loss", "--tolerance", "0.5", "--apply", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert {p["action"] for p in doc["points"]} == {"reused"} and "[1]" not in result.stderr  # no point ran
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/metrics.json")} == stamps
    assert doc["metric"] == {"name": "eval_loss", "goal": "lower"}
    best = min(p["eval_loss"] for p in doc["points"])
    within = [p for p in doc["points"] if p["eval_loss"] <= best * 1.5]
    expected = min(within, key=lambda p: (p["trainable_params"], p["eval_loss"]))
    assert doc["recommended"]["name"] == expected["name"]
    assert doc["points"][0]["wall_seconds"] > 0  # kept from the run that trained it

    applied = Path(doc["applied"])
    assert applied == tmp / "tiny.recommended.yaml"
    raw = yaml.safe_load(applied.read_text())
    assert raw["lora"]["r"] == expected["values"]["lora.r"]
    assert float(raw["training"]["learning_rate"]) == expected["values"]["training.learning_rate"]
    assert "max_steps" not in raw["training"]  # the sweep's step budget is not the full run's
    from lorafit.recipe import load_recipe

    assert load_recipe(applied).lora.r == expected["values"]["lora.r"]


def test_mistakes_are_exit_2_before_any_training(tmp_path):
    recipe = _recipe(tmp_path)
    out = tmp_path / "out"
    cases = [
        (["--grid", "lora.rr=2,4"], "error: --grid lora.rr: unknown key; did you mean 'r'?"),
        (["--grid", "lora.dropout=0.1,1.5"], "error: point lora.dropout=1.5: "),
        (["--grid", "lora.target_modules=[q_proj,v_proj],[nope]"], "'nope' matches no module"),
        (["--grid", "lora.r=2", "--range", "training.learning_rate=1e-4:1e-3"], "error: --range: "),
        (["--search", "random", "--range", "training.learning_rate=1e-4:1e-3"], "error: --trials: "),
        (["--grid", "lora.r,lora.alpha=8,16;16"], "error: --grid lora.r,lora.alpha: '16' has 1 value(s) for 2 keys"),
        (["--grid", "lora.r=2", "--metric", "exact_macth"], "did you mean 'exact_match'?"),
    ]
    for extra, expected in cases:
        result = _sweep(recipe, *extra, *STEPS)
        assert result.returncode == 2, (extra, result.stderr)
        assert expected in result.stderr, (extra, result.stderr)
        assert "Traceback" not in result.stderr
        assert not out.exists(), extra  # nothing written, nothing trained
    bad = _sweep(recipe, "--grid", "lora.dropout=0.1,1.5", *STEPS).stderr
    assert "lora.dropout: must be in [0, 1)" in bad


def _child_pid(run_dir: Path) -> int | None:
    """The `lorafit train` process writing *run_dir*."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in argv and str(run_dir).encode() in argv:
            return int(proc.name)
    return None


def _wait_for(predicate, timeout=240.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_killed_point_ctrl_c_and_the_rerun_resumes_the_study(tmp_path):
    """Random search, two trials: the first point is killed outright (as the out-of-memory killer would) once it
    has a checkpoint, the sweep goes on; Ctrl-C during the second stops the sweep with the table so far. The
    re-run resumes the Optuna study: both trials train on from their checkpoints, no new trial is asked."""
    import optuna

    recipe = _recipe(tmp_path, save_steps=1)
    args = [recipe, "--search", "random", "--trials", "2", "--grid", "lora.r=2,4",
            "--range", "training.learning_rate=1e-4:1e-2:log", "--max-steps", "12", "--set", "evaluation.metrics=false"]
    sweep_dir = tmp_path / "out" / "sweep"
    env = {**os.environ, **ENV}
    env.pop("LORAFIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "sweep", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)

    def point_dirs():
        return sorted((p for p in sweep_dir.glob("lora.r=*") if (p / "checkpoints" / "checkpoint-1").is_dir()),
                      key=lambda p: p.stat().st_ctime)

    try:
        first = _wait_for(lambda: point_dirs()[:1])[0]
        os.kill(_wait_for(lambda: _child_pid(first)), signal.SIGKILL)
        second = _wait_for(lambda: [p for p in point_dirs() if p != first])[0]
        proc.send_signal(signal.SIGINT)  # to the sweep alone: it forwards it to the point once
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    status = {p["name"]: p for p in doc["points"]}
    assert status[first.name]["status"] == "failed" and "killed by SIGKILL" in status[first.name]["error"]
    assert status[second.name]["status"] == "interrupted" and doc["interrupted"] == "SIGINT"
    assert "interrupted (SIGINT): the table so far" in out and "killed by SIGKILL" in out
    assert not (first / "adapter").exists() and not (second / "adapter").exists()
    assert any((second / "checkpoints").glob("checkpoint-*"))  # the point checkpointed before it stopped

    def study():
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / "optuna.journal")))
        return optuna.load_study(study_name="lorafit-sweep", storage=storage)

    running = optuna.trial.TrialState.RUNNING
    assert [t.state for t in study().trials] == [running, running]  # a re-run resumes both

    rerun = _sweep(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = study().trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2  # no third trial asked
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["name"] for p in doc["points"]] == [first.name, second.name]
    assert doc["metric"] == {"name": "eval_loss", "goal": "lower"} and doc["pruning"]["eval_steps"] == 3
    for point, trial in zip(doc["points"], trials):
        m = _metrics(point["run_dir"])
        assert point["status"] == "finished" and point["action"] == "resumed" and point["trials"] == [trial.number]
        assert m["train"]["steps"] == 12 and 1 <= m["train"]["resumed_at_step"] < 12
        assert 1e-4 <= point["values"]["training.learning_rate"] <= 1e-2 and point["values"]["lora.r"] in (2, 4)
        assert trial.value == point["eval_loss"] == m["eval"]["eval_loss"]
        # The periodic eval losses, read from the point's checkpoints while it ran (both sessions), are the
        # trial's reports to the pruner.
        assert trial.intermediate_values == {h["step"]: h["eval_loss"] for h in m["eval"]["loss_history"]
                                             if h["step"] % 3 == 0}

    other = _sweep(recipe, "--search", "random", "--trials", "3", "--grid", "lora.r=2,4",
                   "--range", "training.learning_rate=1e-5:1e-2:log", "--max-steps", "12",
                   "--set", "evaluation.metrics=false")
    assert other.returncode == 2 and "holds the study of another sweep" in other.stderr


@pytest.mark.gpu
def test_parallel_trains_one_point_per_gpu(tmp_path):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("--parallel 2 needs two CUDA GPUs")
    recipe = _recipe(tmp_path)
    result = _sweep(recipe, "--grid", "lora.r=2,4", *STEPS, "--parallel", "2", "--set", "evaluation.metrics=false")
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "sweep" / "sweep.json").read_text())
    assert [p["status"] for p in doc["points"]] == ["finished", "finished"]
    for point in doc["points"]:
        assert _metrics(point["run_dir"])["memory"]["gpu_peak_allocated_mb"] > 0
        assert point["peak_memory_mb"] == _metrics(point["run_dir"])["memory"]["gpu_peak_allocated_mb"]
