"""Quiet and honest output (issue 25): "trained tokens" are the tokens with a loss, everywhere, and the tokens the
model read are "tokens processed"; merge --verify's perplexity is over the trained tokens, as training's loss is,
and it says so (its report, its lines, the model card); published artifacts name the real origin of a GGUF base
(the file, its quantization, what it was dequantized to)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

TINY = REPO / "examples" / "tiny-llama"
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(8)]


# ----------------------------------------------------------------------------------------------
# trained tokens vs tokens processed


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """8 rows, batch 2, 2 epochs: 8 steps, a checkpoint at step 4; and the same run resumed from it."""
    root = tmp_path_factory.mktemp("tokens")
    data = write_jsonl(root / "rows.jsonl", ROWS)
    recipe = write_recipe(root / "r.yaml", {
        "model": {"name": str(TINY)}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "format": "alpaca", "max_length": 256, "eval_fraction": 0.0},
        "training": {"epochs": 2, "batch_size": 2, "grad_accum": 1, "save_steps": 4, "logging_steps": 100},
        "evaluation": {"metrics": False}, "output": {"dir": str(root / "run")}})
    proc = run_cli("train", recipe)
    assert proc.returncode == 0, proc.stderr
    shutil.copytree(root / "run", root / "resumed")
    again = run_cli("train", recipe, "--output-dir", root / "resumed", "--resume",
                    root / "resumed" / "checkpoints" / "checkpoint-4")
    assert again.returncode == 0, again.stderr
    load = lambda run: json.loads((root / run / "metrics.json").read_text())  # noqa: E731
    return {"root": root, "train": proc, "metrics": load("run"), "resumed": load("resumed")}


def test_trained_tokens_are_the_tokens_with_a_loss(two_epochs):
    m = two_epochs["metrics"]
    train, data = m["train"], m["data"]
    assert train["steps"] == 8
    assert train["trained_tokens"] == 2 * data["trainable_tokens"]  # every response token, twice
    assert train["tokens_processed"] == 2 * data["train_tokens"]  # every token read, twice (no padding counted)
    assert train["trained_tokens"] < train["tokens_processed"]


def test_a_resumed_run_counts_the_whole_run(two_epochs):
    whole, resumed = two_epochs["metrics"]["train"], two_epochs["resumed"]["train"]
    assert resumed["resumed_at_step"] == 4
    assert resumed["trained_tokens"] == whole["trained_tokens"]
    assert resumed["tokens_processed"] == whole["tokens_processed"]


def test_the_words_say_which_tokens(two_epochs):
    from lorafit.tools.demo import comparison_lines
    from lorafit.recipe import load_recipe

    m = two_epochs["metrics"]
    t = m["train"]
    summary = two_epochs["train"].stdout
    assert "tokens/s processed" in summary, summary
    report = (two_epochs["root"] / "run" / "report.md").read_text()
    assert f"{t['tokens_processed']:,} tokens processed" in report and f"{t['trained_tokens']:,} trained" in report
    demo = "\n".join(comparison_lines(m, load_recipe(REPO / "recipes" / "quickstart.yaml"), 1.0))
    assert f"trained on {t['trained_tokens']:,} tokens with a loss" in demo, demo


# ----------------------------------------------------------------------------------------------
# merge --verify: perplexity over the trained tokens


def test_merge_verify_perplexity_is_over_the_trained_tokens(tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.commands import merge
    from lorafit.commands.card import build_card
    from lorafit.recipe import DataSpec
    from lorafit.stages.data import build_datasets
    from tests.unit.test_merge import make_adapter

    run = tmp_path / "run"
    make_adapter(TINY, run / "adapter")
    write_jsonl(run / "eval.jsonl", ROWS[:4])
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": str(TINY)}, "data": {
        "train": "missing.jsonl", "eval": "eval.jsonl", "format": "alpaca", "max_length": 256}}))
    report = merge.merge(run, tmp_path / "out", dtype="float32", verify=True)
    v = report["verify"]

    # The same rows as training tokenizes them, scored by peft's base + adapter where the labels are.
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    rows = build_datasets(DataSpec(train=str(run / "eval.jsonl"), format="alpaca", max_length=256,
                                   eval_fraction=0.0), tokenizer).train
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY), run / "adapter").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor(row["labels"])
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
            count += int((labels[1:] != -100).sum())
    assert v["scored_tokens"] == count
    assert v["perplexity_adapter"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert "trained tokens" in v["perplexity_on"]
    from lorafit import render

    assert "trained tokens" in "\n".join(render.merge_lines(report))
    card = build_card(repo_id="alice/m", kind="merged", base="acme/tiny", merge_report=report)
    assert "trained tokens" in card and str(count) in card


# ----------------------------------------------------------------------------------------------
# a GGUF base's real origin, published


def test_a_gguf_base_is_named_for_what_it_is(tiny_llama, tmp_path):
    from lorafit.commands import push
    from tests.unit.test_gguf_convert import write_tiny_gguf

    gguf = write_tiny_gguf(tiny_llama, tmp_path / "tiny.Q8_0.gguf", kind="q8_0",
                           source_url="https://huggingface.co/acme/tiny-llama")
    data = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "model": {"name": str(gguf)}, "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(data), "format": "alpaca", "max_length": 256, "eval_fraction": 0.0},
        "training": {"max_steps": 1, "batch_size": 2, "grad_accum": 1}, "evaluation": {"metrics": False},
        "output": {"dir": str(tmp_path / "run")}})
    proc = run_cli("train", recipe, env={"LORAFIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    origin = json.loads((tmp_path / "run" / "metrics.json").read_text())["base_origin"]
    assert origin == {"gguf_file": "tiny.Q8_0.gguf", "quantization": "Q8_0", "dequantized_to": "bfloat16",
                      "hub_id": "acme/tiny-llama"}
    upload = push.plan_upload(tmp_path / "run", "alice/tiny", merged=False, tmp=tmp_path / "scratch")
    assert "base_model: acme/tiny-llama" in upload.card
    assert "tiny.Q8_0.gguf" in upload.card and "Q8_0" in upload.card and "bfloat16" in upload.card
    assert "not the original" in upload.card
