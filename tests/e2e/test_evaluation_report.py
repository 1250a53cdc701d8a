"""Did the adapter help? A tiny Llama memorises eight short answers; train's metrics.json, report.md and
loss.png, and `lorafit evaluate --json`, must all say so, and say the same thing."""

from __future__ import annotations

import json
import re

import pytest

from lorafit.render import comparison_rows, evaluate_lines, number
from tests.conftest import run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
QA = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
      ("Translate hello into French.", "Bonjour."), ("Name a colour.", "Blue."),
      ("Count to three.", "One two three."), ("How is the weather today?", "Sunny."),
      ("Did you like this movie?", "It was great."), ("What does the quick brown fox do?", "It jumps over the lazy dog.")]
PROMPT = "What is two plus two?\nAnswer:"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("memorised")
    data = write_jsonl(root / "qa.jsonl", [{"prompt": f"{q}\nAnswer:", "completion": f" {a}"} for q, a in QA])
    recipe = write_recipe(root / "recipe.yaml", {
        "model": {"name": str(tiny_llama)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # Evaluated on the very rows it learns: exact match measures memorisation.
        "data": {"train": str(data), "eval": str(data), "format": "completion", "max_length": 64},
        "training": {"max_steps": 40, "batch_size": 8, "grad_accum": 1, "learning_rate": 1e-2,
                     "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 5, "eval_steps": 20},
        "evaluation": {"prompts": [PROMPT], "report_samples": 3},
    })
    run = root / "run"
    proc = run_cli("train", recipe, "--output-dir", run, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def test_the_adapter_answers_what_it_memorised_and_the_base_does_not(memorised):
    run, proc = memorised
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    assert ev["metric_rows"] == 8
    em, contains = ev["metrics"]["exact_match"], ev["metrics"]["contains"]
    assert em["adapter"] >= 0.75 and em["base"] <= 0.125, ev["samples"]
    assert contains["adapter"] >= em["adapter"] and contains["base"] >= em["base"]
    # The samples are the first eval rows, each reference its row's completion.
    assert [s["reference"] for s in ev["samples"]] == [a for _, a in QA[:3]]
    assert sum(s["adapter"] == s["reference"] for s in ev["samples"]) >= 2
    assert ev["prompts"][0]["prompt"] == PROMPT and set(ev["prompts"][0]) == {"prompt", "base", "adapter"}
    # the keys loss already had stay
    for key in ("eval_loss", "base_eval_loss", "eval_perplexity", "base_eval_perplexity", "eval_rows"):
        assert key in ev
    assert "evaluate: greedy generation of 8 eval rows and 1 prompts" in proc.stderr


def test_report_md_matches_metrics_json_and_loss_png_is_a_png(memorised):
    run, _ = memorised
    metrics = json.loads((run / "metrics.json").read_text())
    report = (run / "report.md").read_text()
    for name, base, adapter, _ in comparison_rows(metrics["eval"]):
        assert re.search(rf"^\| {name} \| {re.escape(number(base))} \| {re.escape(number(adapter))} \|", report, re.M), name
    assert {"exact_match", "contains"} <= {name for name, *_ in comparison_rows(metrics["eval"])}
    d = metrics["data"]
    assert f"| {d['train_rows']} | {d['eval_rows']} | {d['train_tokens']:,} |" in report
    for sample in metrics["eval"]["samples"]:
        assert f"| reference | {sample['reference']} |" in report and sample["prompt"].strip() in report
    assert metrics["eval"]["prompts"][0]["adapter"] in report.split("## Prompts")[1]
    assert [h["step"] for h in metrics["eval"]["loss_history"]] == [20, 40]
    png = (run / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "(loss.png)" in report


def test_evaluate_json_matches_the_run_and_rewrites_its_report(memorised):
    run, _ = memorised
    before = json.loads((run / "metrics.json").read_text())
    proc = run_cli("evaluate", run, "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)  # one JSON document, nothing else on stdout
    assert doc["metrics"] == before["eval"]["metrics"]  # greedy on CPU: the same answers
    assert doc["samples"] == before["eval"]["samples"] and doc["prompts"] == before["eval"]["prompts"]
    assert doc["eval_loss"] == pytest.approx(before["eval"]["eval_loss"], abs=1e-4)
    assert doc["report"] == str(run / "report.md")
    report = (run / "report.md").read_text()
    assert "Measured by `lorafit evaluate` on the run's held-out rows" in report
    assert json.loads((run / "metrics.json").read_text()) == before  # metrics.json is training's record
    lines = evaluate_lines(doc)  # the human output of the same document
    row = next(line for line in lines if line.startswith("exact_match"))
    assert row.split()[1:3] == [number(doc["metrics"]["exact_match"]["base"]),
                                number(doc["metrics"]["exact_match"]["adapter"])]
    assert lines[-1] == f"report: {run / 'report.md'} (rewritten with these results)"
