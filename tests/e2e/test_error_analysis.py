"""Where does the adapter fail, and what did it cost (issue 30): every eval row's outcome in
eval_predictions.jsonl and the failures in report.md / `lorafit evaluate`, previews of the user's own turn, a
classifier's confusion matrix and per-class scores, per-entity F1, overfitting named and training.keep_best,
forgetting on a retain file, the few-shot baseline, and lm-evaluation-harness over the held-out rows agreeing
with lorafit's own exact match row for row.

One chat run does most of it: its base is the shipped tiny llama merged with an adapter that answers "Blue."
to everything (so the base handles the retain rows: they ask it things and expect "Blue."), trained to
memorise other answers with a high learning rate (so it forgets "Blue." and overfits its eight rows)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import PROMPTS, SYSTEM, run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1"}
TRAIN = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
         ("Translate hello into French.", "Bonjour."), ("Count to three.", "One two three."),
         ("How is the weather today?", "Sunny."), ("Did you like this movie?", "It was great."),
         ("What does the quick brown fox do?", "It jumps over the lazy dog."), ("Name a colour.", "Red.")]
# Said otherwise than in training: the eval loss falls while the adapter learns the facts, then rises while it
# memorises its own short answers (overfitting on purpose: eval loss lowest at step 15 of 40).
HELD_OUT = [("What is the capital of France?", "Paris is the capital of France."),
            ("What is two plus two?", "Four, two plus two is four."), ("Name a colour.", "Red is a colour."),
            ("Count to three.", "One two three four five.")]


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _chat(q, a, system=False):
    return {"messages": ([{"role": "system", "content": SYSTEM}] if system else [])
            + [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


@pytest.fixture(scope="module")
def blue_base(memorised_adapters, tmp_path_factory):
    """The tiny llama with memorised adapter b ("Blue." to every prompt) merged in: a base with something to lose."""
    out = tmp_path_factory.mktemp("blue") / "base"
    proc = run_cli("merge", memorised_adapters / "b", "--output", out, "--dtype", "float32", env=ENV)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def chat_run(blue_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    train = write_jsonl(root / "train.jsonl", [_chat(q, a) for q, a in TRAIN])
    held_out = write_jsonl(root / "eval.jsonl", [_chat(q, a, system=i == 0) for i, (q, a) in enumerate(HELD_OUT)])
    retain = write_jsonl(root / "retain.jsonl", [_chat(p, "Blue.") for p in PROMPTS])
    recipe = write_recipe(root / "recipe.yaml", {
        "model": {"name": str(blue_base)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train), "eval": str(held_out), "format": "chat", "max_length": 128},
        "training": {"max_steps": 40, "batch_size": 8, "grad_accum": 1, "learning_rate": 1e-2,
                     "lr_scheduler": "constant", "warmup_ratio": 0.0, "logging_steps": 5, "eval_steps": 5,
                     "save_steps": 1000, "save_total_limit": 2, "keep_best": True, "seed": 0},
        "evaluation": {"batch_size": 1, "baselines": ["zero_shot", "few_shot:2"], "retain": str(retain),
                       "report_failures": 2},
    })
    run = root / "run"
    proc = run_cli("train", recipe, "--output-dir", run, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, proc


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def _predictions(run):
    return [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]


def test_every_eval_row_has_its_outcome_and_the_failures_are_listed_as_the_user_wrote_them(chat_run):
    run, proc = chat_run
    ev, lines = _metrics(run)["eval"], _predictions(run)
    assert [r["row"] for r in lines] == [1, 2, 3, 4] and all(r["measured"] == "generated" for r in lines)
    assert [r["reference"] for r in lines] == [a for _, a in HELD_OUT]
    # the user's turn: neither the system prompt nor the template's markers
    assert [r["prompt"] for r in lines] == [q for q, _ in HELD_OUT]
    assert all(r["correct"] == (_words(r["adapter"]) == _words(r["reference"])) for r in lines)
    wrong = [r for r in lines if not r["correct"]]
    assert ev["wrong_rows"] == len(wrong) and ev["outcome_rows"] == 4 and wrong, lines
    assert [f["row"] for f in ev["failures"]] == [r["row"] for r in wrong][:2]  # evaluation.report_failures: 2
    assert set(ev["failures"][0]) >= {"row", "prompt", "reference", "adapter", "base", "few_shot"}
    report = (run / "report.md").read_text()
    section = report.split("## Where the adapter fails", 1)[1].split("\n## ", 1)[0]
    assert f"{len(wrong)} of 4 measured rows wrong" in section and HELD_OUT[wrong[0]["row"] - 1][0] in section
    assert SYSTEM not in report and "<|im_start|>" not in report
    assert ev["samples"][0]["prompt"] == HELD_OUT[0][0]
    said = next(line for line in proc.stderr.splitlines() if line.startswith("evaluate: "))
    assert "few-shot baseline (the base, k=2)" in said and "retain: 4 rows" in said  # costs said before it starts


def test_the_few_shot_baseline_is_a_third_column(chat_run):
    run, _ = chat_run
    ev = _metrics(run)["eval"]
    assert ev["few_shot_k"] == 2
    assert {"base", "few_shot", "adapter"} <= set(ev["metrics"]["exact_match"])
    lines = _predictions(run)
    assert ev["metrics"]["exact_match"]["few_shot"] == sum(_words(r["few_shot"]) == _words(r["reference"])
                                                           for r in lines) / 4
    assert "| measure | base | base 2-shot | adapter | change |" in (run / "report.md").read_text()


def test_overfitting_is_named_and_keep_best_keeps_that_steps_adapter(chat_run):
    from safetensors.torch import load_file

    run, _ = chat_run
    metrics = _metrics(run)
    overfit, best = metrics["eval"]["overfitting"], metrics["train"]["best"]
    history = metrics["eval"]["loss_history"]
    lowest = min(history, key=lambda e: e["eval_loss"])
    assert overfit["best_step"] == best["step"] == lowest["step"] < 40 and len(history) >= 3
    assert overfit["last_eval_loss"] > overfit["best_eval_loss"] and best["kept"]
    assert metrics["eval"]["eval_loss"] == pytest.approx(lowest["eval_loss"])  # the kept adapter's own loss
    kept, checkpoint = (load_file(str(d / "adapter_model.safetensors"))
                        for d in (run / "adapter", run / "checkpoints" / f"checkpoint-{best['step']}"))
    assert kept.keys() == checkpoint.keys() and all((kept[k] == checkpoint[k]).all() for k in kept)
    report = (run / "report.md").read_text()
    assert f"eval loss was lowest at step {best['step']}" in report and f"the adapter of step {best['step']}" in report


def test_forgetting_on_the_retain_file_is_flagged(chat_run):
    run, _ = chat_run
    retain = _metrics(run)["eval"]["retain"]
    assert retain["rows"] == 4 and retain["metrics"]["exact_match"]["base"] == 1.0
    assert retain["metrics"]["exact_match"]["adapter"] < 0.9 and retain["flagged"], retain
    assert retain["lost_rows"] >= 1 and retain["samples"][0]["base"] == "Blue."
    report = (run / "report.md").read_text()
    assert "## What it cost: forgetting" in report and "**Forgetting flagged**" in report


def test_evaluate_shows_it_and_lm_eval_agrees_with_lorafit_row_for_row(chat_run):
    run, _ = chat_run
    proc = run_cli("evaluate", run, "--lm-eval", "lorafit_heldout", "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # one JSON document: the harness printed nowhere else on stdout
    lines = _predictions(run)  # rewritten by this evaluate
    assert report["wrong_rows"] == sum(not r["correct"] for r in lines) and report["retain"]["flagged"]
    per_row = report["lm_eval"]["per_row"]["lorafit_heldout"]
    assert per_row["adapter"] == [float(r["correct"]) for r in lines]
    assert per_row["base"] == [float(r["base_correct"]) for r in lines]
    results = report["lm_eval"]["results"]["lorafit_heldout"]["exact_match"]
    assert results["adapter"] == report["metrics"]["exact_match"]["adapter"]
    assert "## lm-evaluation-harness" in (run / "report.md").read_text()
    text = run_cli("evaluate", run, env=ENV)
    assert text.returncode == 0 and "wrong: " in text.stdout and "retain: 4 rows" in text.stdout, text.stdout


def test_a_classifier_reports_its_confusion_matrix_per_class_scores_and_no_perplexity(tmp_path):
    from tests.conftest import REPO

    run = tmp_path / "run"
    proc = run_cli("train", REPO / "recipes" / "tiny-bert-classification.yaml", "--set", "training.max_steps=6",
                   "--set", "data.eval_fraction=0.4", "--output-dir", run, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = _metrics(run)["eval"]
    lines = _predictions(run)
    labels = ev["confusion"]["labels"]
    assert set(labels) == {"negative", "positive"} and len(lines) == ev["eval_rows"]
    counted = [[sum(1 for r in lines if r["reference"] == t and r["adapter"] == p) for p in labels] for t in labels]
    assert ev["confusion"]["adapter"] == counted
    assert set(ev["per_class"]["adapter"]) == set(labels)
    for name, scores in ev["per_class"]["adapter"].items():
        assert scores["support"] == sum(r["reference"] == name for r in lines)
    assert "eval_perplexity" not in ev and "base_eval_perplexity" not in ev
    report = (run / "report.md").read_text()
    assert "perplexity" not in report and "## Classes" in report and "## Per class" in report
    assert (run / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tagger_reports_f1_per_entity_type(tmp_path):
    from tests.conftest import REPO

    run = tmp_path / "run"
    proc = run_cli("train", REPO / "recipes" / "tiny-token-cls.yaml", "--set", "training.max_steps=4",
                   "--output-dir", run, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = _metrics(run)["eval"]
    per = ev["per_entity"]["adapter"]
    assert per and all(set(v) == {"precision", "recall", "f1", "support"} for v in per.values())
    lines = _predictions(run)
    assert all(r["measured"] == "tagged" and r["correct"] == (r["adapter"] == r["reference"]) for r in lines)
    assert "eval_perplexity" not in ev and "## Per entity type" in (run / "report.md").read_text()
