"""token_cls and decoder seq_cls through the real CLI: train, reload in plain peft, predict, merge."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

NER = REPO / "examples" / "data" / "tiny-ner.jsonl"
ENV = {"OMP_NUM_THREADS": "1"}
FAST = {"r": 8, "alpha": 16, "dropout": 0.0}
TRAINING = {"max_steps": 12, "batch_size": 4, "grad_accum": 1, "learning_rate": 5.0e-3, "logging_steps": 4,
            "save_steps": None, "save_minutes": None}


@pytest.fixture(scope="module")
def token_run(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("token_cls")
    recipe = write_recipe(tmp / "recipe.yaml", {
        "model": {"name": str(tiny_models("bert", "token_cls")), "task": "token_cls"},
        "lora": FAST, "data": {"train": str(NER), "format": "tokens", "eval_fraction": 0.2, "max_length": 64},
        "training": TRAINING, "output": {"dir": str(tmp / "run")}})
    proc = run_cli("train", recipe, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run", proc


def test_token_cls_trains_with_its_head_in_full_and_reports_entity_f1(token_run):
    run, proc = token_run
    assert "head: classifier trained in full" in proc.stderr and "5 labels" in proc.stderr
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "TOKEN_CLS"
    assert "classifier" in adapter_config["modules_to_save"]
    assert "classifier" not in adapter_config["target_modules"]  # a head is trained in full, never LoRA'd
    config = json.loads((run / "adapter" / "config.json").read_text())
    assert config["id2label"] == {"0": "O", "1": "B-LOC", "2": "B-PER", "3": "I-LOC", "4": "I-PER"}
    assert config["label2id"]["B-PER"] == 2
    ev = json.loads((run / "metrics.json").read_text())["eval"]
    scores = ev["metrics"]
    assert set(scores) >= {"token_accuracy", "entity_f1", "entity_precision", "entity_recall"}
    assert scores["token_accuracy"]["adapter"] > scores["token_accuracy"]["base"]
    assert 0 <= scores["entity_f1"]["adapter"] <= 1 and ev["metric_rows"] == 8


def test_adapter_reloads_in_plain_peft_and_changes_the_outputs(token_run, tiny_models):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    run, _ = token_run
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    enc = tok([["Alice", "lives", "in", "Paris"]], is_split_into_words=True, return_tensors="pt")
    base = AutoModelForTokenClassification.from_pretrained(tiny_models("bert", "token_cls"), num_labels=5,
                                                           ignore_mismatched_sizes=True).eval()
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        adapted = model(**enc).logits
        with model.disable_adapter():
            plain = model(**enc).logits
    assert adapted.shape == (1, enc["input_ids"].shape[1], 5)
    assert (adapted - plain).abs().max() > 1e-3


def test_predict_writes_one_tag_per_word_in_input_order(token_run, tmp_path):
    run, _ = token_run
    rows = [{"tokens": ["Alice", "lives", "in", "New", "York", "."]}, {"tokens": ["Paris"]},
            {"tokens": ["we", "met", "Bob", "in", "Berlin", "today", "."]}]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    proc = run_cli("predict", run, "--data", data, "--output", out, "--batch-size", "2", env=ENV)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["tokens"] for p in lines] == [r["tokens"] for r in rows]
    tags = {"O", "B-LOC", "B-PER", "I-LOC", "I-PER"}
    assert all(len(p["tags"]) == len(p["tokens"]) and set(p["tags"]) <= tags for p in lines)
    assert "predicted 3 rows" in proc.stdout


def test_evaluate_data_maps_tags_with_the_adapters_saved_classes(token_run, tmp_path):
    """--data without any LOC tag keeps the head's 5 classes (no rebuilt, shifted map); an unknown tag is exit 2."""
    run, _ = token_run
    rows = [{"tokens": ["Anna", "Smith", "likes", "it"], "tags": ["B-PER", "I-PER", "O", "O"]},
            {"tokens": ["we", "met", "Bob"], "tags": ["O", "O", "B-PER"]}]
    proc = run_cli("evaluate", run, "--data", write_jsonl(tmp_path / "per.jsonl", rows), "--json", env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert 0 <= json.loads(proc.stdout)["metrics"]["token_accuracy"]["adapter"] <= 1
    bad = write_jsonl(tmp_path / "org.jsonl", [rows[0], {"tokens": ["Acme"], "tags": ["B-ORG"]}])
    proc = run_cli("evaluate", run, "--data", bad, env=ENV)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr
    assert f"{bad}:2" in proc.stderr and "'B-ORG' is not one of the adapter's 5 classes" in proc.stderr


def test_bad_rows_fail_with_file_and_line(token_run, tmp_path, tiny_models):
    run, _ = token_run
    data = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": ["a"], "tags": ["O"]}, {"tokens": "not a list"}])
    proc = run_cli("predict", run, "--data", data, "--output", tmp_path / "out.jsonl", env=ENV)
    assert proc.returncode == 2 and f"{data}:2" in proc.stderr and not (tmp_path / "out.jsonl").exists()
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name": str(tiny_models("bert", "token_cls")), "task": "token_cls"},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "tags": ["O", "O"]},
                                                                  {"tokens": ["a", "b"], "tags": ["O"]}])),
                 "format": "tokens", "max_length": 64}})
    proc = run_cli("validate", recipe, env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and f"{tmp_path / 't.jsonl'}:2" in proc.stderr
    assert "2 tokens but 1 tags" in proc.stderr


def test_merge_keeps_the_trained_head(token_run, tmp_path):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from lorafit.core.adapters import find_adapter
    from lorafit.core.models import load_adapted

    run, _ = token_run
    out = tmp_path / "merged"
    proc = run_cli("merge", run, "--output", out, "--dtype", "float32", "--verify", env=ENV)
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForTokenClassification.from_pretrained(out).eval()
    assert merged.config.id2label[2] == "B-PER"
    adapted, _ = load_adapted(find_adapter(run), dtype="float32", device="cpu")
    trained = adapted.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(merged.classifier.weight, trained.weight)
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok([["Bob", "flew", "to", "Paris"]], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(merged(**enc).logits, adapted(**enc).logits, atol=1e-4)


def test_seq_cls_on_a_decoder_trains_and_predicts(tiny_models, tmp_path):
    rows = [{"text": t, "label": label} for t, label in [
        ("I like this movie, it was great.", "positive"), ("I hate waiting, this was terrible.", "negative"),
        ("A great story, I like it.", "positive"), ("A terrible movie, I hate it.", "negative"),
        ("The weather is sunny today, great.", "positive"), ("The story was terrible.", "negative"),
        ("This was great fun.", "positive"), ("This was a terrible day.", "negative")]]
    data = write_jsonl(tmp_path / "cls.jsonl", rows)
    model = tiny_models("llama", "seq_cls")
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"name": str(model), "task": "seq_cls"}, "lora": FAST,
        "data": {"train": str(data), "format": "classification", "eval_fraction": 0, "max_length": 64},
        "training": {**TRAINING, "max_steps": 8}, "output": {"dir": str(tmp_path / "run")}})
    proc = run_cli("train", recipe, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert "head: score trained in full" in proc.stderr
    out = tmp_path / "pred.jsonl"
    # Rows of different lengths in one batch: the pooled token is each row's last non-pad one.
    proc = run_cli("predict", tmp_path / "run", "--data", data, "--output", out, "--batch-size", "3", env=ENV)
    assert proc.returncode == 0, proc.stderr
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(preds) == len(rows) and all(0.5 <= p["score"] <= 1 for p in preds)
    assert sum(p["label"] == r["label"] for p, r in zip(preds, rows)) >= 6


def test_generate_on_a_classifier_adapter_points_to_predict(token_run):
    run, _ = token_run
    proc = run_cli("generate", run, "--prompt", "Alice lives in Paris", env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "token_cls adapter" in proc.stderr and "lorafit predict" in proc.stderr and "Traceback" not in proc.stderr


def test_predict_output_that_is_a_folder_is_refused_up_front(token_run, tmp_path):
    run, _ = token_run
    data = write_jsonl(tmp_path / "in.jsonl", [{"tokens": ["Paris"]}])
    (tmp_path / "out").mkdir()
    proc = run_cli("predict", run, "--data", data, "--output", tmp_path / "out", env=ENV)
    assert proc.returncode == 2, proc.stderr
    assert "--output" in proc.stderr and "is a folder" in proc.stderr and "Traceback" not in proc.stderr
