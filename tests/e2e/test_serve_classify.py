"""`lorafit serve` with classifier and tagging adapters: POST /v1/classify answers what `lorafit predict` writes
(a real server process per task, tiny BERT adapters trained a few steps in-process)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe
from tests.e2e.serve_helpers import Server

TEXTS = ["I like this movie, it was great.", "I hate this weather.", "The story is sunny and great."]
WORDS = [["Anna", "Smith", "likes", "Berlin", "."], ["the", "weather", "is", "sunny"]]
DATA = {"seq_cls": ("tiny-sentiment.jsonl", "classification"), "token_cls": ("tiny-ner.jsonl", "tokens")}


@pytest.fixture(scope="module", params=["seq_cls", "token_cls"])
def served(request, tiny_models, tmp_path_factory):
    task = request.param
    tmp = tmp_path_factory.mktemp(task)
    data, fmt = DATA[task]
    recipe = write_recipe(tmp / "recipe.yaml", {
        "model": {"name": str(tiny_models("bert", task)), "task": task},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "attention"},
        "data": {"train": str(REPO / "examples" / "data" / data), "format": fmt, "eval_fraction": 0.0,
                 "max_length": 64},
        "training": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "learning_rate": 5.0e-3, "logging_steps": 4},
        "evaluation": {"metrics": False},
        "output": {"dir": str(tmp / "run")}})
    proc = run_cli("train", recipe)
    assert proc.returncode == 0, proc.stderr
    srv = Server([tmp / "run"], cwd=tmp)  # served under its directory name: "run"
    yield task, tmp, srv
    srv.stop()


def test_classify_answers_what_predict_writes(served):
    task, tmp, srv = served
    rows = [{"text": t} for t in TEXTS] if task == "seq_cls" else [{"tokens": w} for w in WORDS]
    proc = run_cli("predict", tmp / "run", "--data", write_jsonl(tmp / "rows.jsonl", rows), "--output", tmp / "out.jsonl")
    assert proc.returncode == 0, proc.stderr
    expected = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
    status, body = srv.post("/v1/classify", {"model": "run", "input": TEXTS if task == "seq_cls" else WORDS})
    assert status == 200, body
    got = [{k: v for k, v in row.items() if v is not None and k != "index"} for row in body["data"]]
    assert got == expected and [row["index"] for row in body["data"]] == list(range(len(expected)))
    assert body["usage"]["prompt_tokens"] > 0


def test_classifier_servers_refuse_what_they_cannot_do(served):
    task, _, srv = served
    status, body = srv.post("/v1/classify", {"model": "base", "input": "x"})
    assert status == 400 and "untrained" in body["error"]["message"]
    status, body = srv.post("/v1/chat/completions", {"model": "run", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and "/v1/classify" in body["error"]["message"]
    status, body = srv.post("/v1/classify", {"model": "run", "input": []})
    assert status == 400 and body["error"]["param"] == "input"
    if task == "seq_cls":
        status, body = srv.post("/v1/classify", {"model": "run", "input": [["two", "words"]]})
        assert status == 400 and "takes texts" in body["error"]["message"]
