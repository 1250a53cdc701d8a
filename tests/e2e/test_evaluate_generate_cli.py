"""`lorafit evaluate` and `lorafit generate` on one real tiny run (the demo: tests/e2e/test_demo.py)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli, write_jsonl


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "run"
    proc = run_cli("train", REPO / "recipes" / "tiny-smoke.yaml", "--output-dir", run,
                   "--set", "training.max_steps=20", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return run


def test_evaluate_reproduces_the_runs_held_out_losses(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())["eval"]
    proc = run_cli("evaluate", smoke_run, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else
    assert report["eval_rows"] == metrics["eval_rows"]
    assert report["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)
    assert report["base_eval_loss"] == pytest.approx(metrics["base_eval_loss"], abs=1e-4)
    assert report["eval_loss"] < report["base_eval_loss"]


def test_evaluate_on_another_file(smoke_run, tmp_path):
    rows = [{"instruction": "What is one plus one?", "input": "", "output": "One plus one is two."}] * 3
    data = write_jsonl(tmp_path / "extra.jsonl", rows)
    proc = run_cli("evaluate", smoke_run / "adapter", "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["eval_rows"] == 3 and report["data"] == str(data)


def test_evaluate_without_adapter_is_a_user_error(tmp_path):
    proc = run_cli("evaluate", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "adapter_config.json" in proc.stderr


def test_generate_uses_the_adapter(smoke_run):
    # The same run, the same prompt rendering, the adapter on and off: only the adapter differs.
    tuned = run_cli("generate", smoke_run, "--prompt", "What is two plus three?", "--max-new-tokens", "8")
    base = run_cli("generate", smoke_run, "--no-adapter", "--prompt", "What is two plus three?",
                   "--max-new-tokens", "8")
    assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr + base.stderr
    assert tuned.stdout.strip() and base.stdout.strip() and tuned.stdout != base.stdout
