"""`lorafit train` end to end: real tiny models, real files, the real CLI in a subprocess.

Each run costs a Python start (torch + transformers imports) far more than its few steps, so every
run of this file is started once, up front, a few at a time (``runs`` fixture); the tests then read
what each run left on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lorafit.recipe import load_recipe
from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

DATA = REPO / "examples" / "data"
# Several runs share 2 cores: one thread each keeps them from fighting over both.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def recipe(model: Path, train: Path, fmt: str, *, task: str = "causal_lm", targets="all-linear", **training) -> dict:
    return {
        "model": {"name": str(model), "task": task},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets},
        "data": {"train": str(train), "format": fmt, "eval_fraction": 0.125, "max_length": 128},
        "training": {"max_steps": 3, "batch_size": 4, "grad_accum": 1, "learning_rate": 3e-3,
                     "warmup_ratio": 0.0, "logging_steps": 1, **training},
    }


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Run:
    def __init__(self, name: str, recipe_path: Path, out: Path, proc, base: Path, task: str = "causal_lm"):
        self.name, self.recipe_path, self.out, self.proc, self.base, self.task = name, recipe_path, out, proc, base, task

    @property
    def metrics(self) -> dict:
        return json.loads((self.out / "metrics.json").read_text())

    def explain(self) -> str:
        return f"{self.name}: rc={self.proc.returncode}\nstdout:\n{self.proc.stdout}\nstderr:\n{self.proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tiny_gpt2, tiny_bert_cls):
    root = tmp_path_factory.mktemp("train_cli")
    mem_rows = [json.loads(line) for line in (DATA / "tiny-text.jsonl").read_text().splitlines()[:8]]
    mem_data = write_jsonl(root / "mem.jsonl", mem_rows)
    plans = {
        # name: (model, recipe dict, extra CLI args, task)
        "text_memorise": (tiny_llama, recipe(tiny_llama, mem_data, "text", max_steps=40, learning_rate=1e-2,
                                             lr_scheduler="constant"), [], "causal_lm"),
        "alpaca_overrides": (tiny_llama, recipe(tiny_llama, DATA / "tiny-alpaca.jsonl", "alpaca"),
                             ["--set", "lora.r=4", "--set", "training.learning_rate=5e-3",
                              "--set", "lora.target_modules=[q_proj, v_proj]"], "causal_lm"),
        "chat": (tiny_llama, recipe(tiny_llama, DATA / "tiny-chat.jsonl", "chat"), [], "causal_lm"),
        "completion_resume": (tiny_llama, recipe(tiny_llama, DATA / "tiny-completion.jsonl", "completion",
                                                 max_steps=4, save_steps=2), [], "causal_lm"),
        "gpt2_completion": (tiny_gpt2, recipe(tiny_gpt2, DATA / "tiny-completion.jsonl", "completion"), [],
                            "causal_lm"),
        "bert_classification": (tiny_bert_cls, recipe(tiny_bert_cls, DATA / "tiny-sentiment.jsonl",
                                                      "classification", task="seq_cls", targets="attention"),
                                [], "seq_cls"),
        "nan": (tiny_llama, recipe(tiny_llama, DATA / "tiny-alpaca.jsonl", "alpaca", learning_rate=1e30), [],
                "causal_lm"),
    }
    done: dict[str, Run] = {}

    def start(name: str) -> None:
        model, doc, extra, task = plans[name]
        path = write_recipe(root / f"{name}.yaml", doc)
        out = root / name
        done[name] = Run(name, path, out, run_cli("train", path, "--output-dir", out, *extra, env=ENV), model, task)
        # Runs that need the first one's run directory follow it in the same worker.
        if name == "completion_resume" and done[name].proc.returncode == 0:
            done["adapter_before_resume"] = digest(out / "adapter" / "adapter_model.safetensors")
            done["metrics_before_resume"] = done[name].metrics  # the resumed run rewrites metrics.json
            proc = run_cli("train", path, "--output-dir", out, "--set", "training.max_steps=6", "--resume", env=ENV)
            done["resumed"] = Run("resumed", path, out, proc, model)
        if name == "text_memorise" and done[name].proc.returncode == 0:
            done["adapter_before_retrain"] = digest(out / "adapter" / "adapter_model.safetensors")
            done["retrain"] = Run("retrain", path, out, run_cli("train", path, "--output-dir", out, env=ENV), model)

    order = ["completion_resume", "text_memorise", "alpaca_overrides", "chat", "gpt2_completion",
             "bert_classification", "nan"]  # the two-step chains first
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(start, order))
    return done


def assert_contract(run: Run, *, steps: int) -> dict:
    """What every successful run leaves in its run directory (CONTRACT.md, 'Run directory')."""
    from lorafit.recipe import Recipe

    assert run.proc.returncode == 0, run.explain()
    assert "Traceback" not in run.proc.stderr
    assert f"run: {run.out}" in run.proc.stdout and "train loss:" in run.proc.stdout, run.explain()

    adapter = run.out / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", *TOKENIZER_FILES):
        assert (adapter / name).is_file(), f"{run.name}: adapter/{name} missing"
    assert not list(run.out.glob(".adapter*")), "a temporary adapter directory was left behind"
    assert list((run.out / "checkpoints").glob("checkpoint-*")), "no resumable checkpoint"

    resolved = load_recipe(run.out / "recipe.yaml")
    assert isinstance(resolved, Recipe)
    assert Path(resolved.model.name) == run.base
    assert Path(resolved.data.train).is_absolute() and Path(resolved.data.train).is_file()
    assert Path(resolved.output.dir) == run.out
    written = (run.out / "recipe.yaml").read_text()
    for section in ("model:", "quantization:", "lora:", "data:", "training:", "evaluation:", "output:"):
        assert section in written, f"recipe.yaml lacks the {section} section (defaults not filled in)"

    m = run.metrics
    train = m["train"]
    assert train["steps"] == steps
    history = train["loss_history"]
    assert history and all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["step"] == steps, "the last step's loss is not in the history"
    assert train["first_loss"] == history[0]["loss"] and train["final_loss"] == history[-1]["loss"]
    assert train["tokens_seen"] > 0 and train["train_tokens_per_second"] > 0
    ev = m["eval"]
    assert ev["eval_rows"] >= 1
    assert math.isfinite(ev["eval_loss"]) and math.isfinite(ev["base_eval_loss"])
    assert ev["eval_loss"] != ev["base_eval_loss"], "the adapter did not change the eval loss at all"
    assert m["memory"]["cpu_peak_rss_mb"] > 0
    for pkg in ("lorafit", "torch", "transformers", "peft"):
        assert m["versions"].get(pkg), f"versions lacks {pkg}"
    assert m["trainable_params"] > 0

    # Every trainable parameter, and nothing else, is in the saved adapter.
    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == m["trainable_params"], sorted(saved)
    return m


def reload_logits(run: Run):
    """(base logits, base + adapter logits) on one prompt, with nothing but transformers and peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if run.task == "seq_cls" else AutoModelForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(run.out / "adapter")
    batch = tokenizer("What is two plus two?", return_tensors="pt")
    with torch.no_grad():
        base = auto.from_pretrained(run.base).eval()
        before = base(**batch).logits
        adapted = PeftModel.from_pretrained(auto.from_pretrained(run.base), str(run.out / "adapter")).eval()
        after = adapted(**batch).logits
    return before, after, adapted


@pytest.mark.parametrize("name, task", [
    ("text_memorise", "causal_lm"), ("alpaca_overrides", "causal_lm"), ("chat", "causal_lm"),
    ("gpt2_completion", "causal_lm"), ("bert_classification", "seq_cls"),
])
def test_each_format_trains_and_writes_the_run_directory(runs, name, task):
    run = runs[name]
    steps = load_recipe(run.recipe_path).training.max_steps
    assert_contract(run, steps=steps)
    config = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}[task]
    assert Path(config["base_model_name_or_path"]) == run.base

    before, after, _ = reload_logits(run)
    assert before.shape == after.shape
    assert (before - after).abs().max().item() > 1e-3, "the reloaded adapter does not change the logits"


def test_the_resolved_recipe_loads_again_and_reruns_from_anywhere(runs, tmp_path, monkeypatch):
    run = runs["chat"]
    monkeypatch.chdir(tmp_path)  # absolute paths: the resolved recipe does not depend on the CWD
    again = load_recipe(run.out / "recipe.yaml")
    original = load_recipe(run.recipe_path)
    assert again.model_dump(exclude={"output"}) == original.model_dump(exclude={"output"})


def test_memorises_eight_rows(runs):
    m = runs["text_memorise"].metrics
    first, final = m["train"]["first_loss"], m["train"]["final_loss"]
    assert final < 0.3 * first, f"loss {first:.3f} → {final:.3f}: did not memorise 8 rows in 40 steps"
    assert len(m["train"]["loss_history"]) == 40  # logging_steps=1
    assert m["data"]["rows_read"] == 8 and m["data"]["train_rows"] + m["data"]["eval_rows"] == 8
    assert "loss did not fall" not in runs["text_memorise"].proc.stderr


def test_set_overrides_reach_the_adapter_recipe_and_metrics(runs):
    run = runs["alpaca_overrides"]
    assert_contract(run, steps=3)
    config = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    resolved = load_recipe(run.out / "recipe.yaml")
    assert resolved.lora.r == 4
    assert resolved.training.learning_rate == pytest.approx(5e-3)
    assert resolved.lora.target_modules == ["q_proj", "v_proj"]
    # tiny llama: 2 layers, hidden 64, 2 of 4 heads for k/v (32 wide): r·(in+out) per matrix.
    expected = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert run.metrics["trainable_params"] == expected
    assert f"trainable params: {expected:,}" in run.proc.stdout


def test_gpt2_without_pad_token_trains_conv1d_layers(runs):
    run = runs["gpt2_completion"]
    config = json.loads((run.out / "adapter" / "adapter_config.json").read_text())
    assert {"c_attn", "c_fc"} <= set(config["target_modules"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(run.base).pad_token is None  # the premise of this test
    assert AutoTokenizer.from_pretrained(run.out / "adapter").pad_token is not None


def test_classifier_head_is_saved_and_reloaded(runs):
    import torch
    from safetensors.torch import load_file

    run = runs["bert_classification"]
    saved = load_file(str(run.out / "adapter" / "adapter_model.safetensors"))
    head = {k: v for k, v in saved.items() if "classifier" in k}
    assert head, f"no classifier weights in the adapter: {sorted(saved)}"
    _, _, adapted = reload_logits(run)
    loaded = {n: p for n, p in adapted.named_parameters() if "classifier" in n and "modules_to_save" in n}
    assert loaded, "peft did not restore the classifier as a module to save"
    weight = next(v for k, v in head.items() if k.endswith("weight"))
    assert any(torch.equal(p.detach(), weight) for p in loaded.values()), "the trained head was not reloaded"


def test_resume_continues_from_the_latest_checkpoint(runs):
    first, resumed = runs["completion_resume"], runs["resumed"]
    assert first.proc.returncode == 0, first.explain()
    m1 = runs["metrics_before_resume"]
    assert m1["train"]["steps"] == 4 and m1["resumed_from"] is None
    m2 = assert_contract(resumed, steps=6)
    assert Path(m2["resumed_from"]).name == "checkpoint-4"
    steps = [h["step"] for h in m2["train"]["loss_history"]]
    assert steps[-2:] == [5, 6] and 1 in steps, f"history {steps}: the schedule restarted or lost its past"
    assert digest(resumed.out / "adapter" / "adapter_model.safetensors") != runs["adapter_before_resume"]


def test_second_train_into_the_same_dir_is_refused(runs):
    run = runs["retrain"]
    assert run.proc.returncode == 2, run.explain()
    assert run.proc.stderr.startswith("error:") and "Traceback" not in run.proc.stderr
    assert "output.dir" in run.proc.stderr and "overwrite" in run.proc.stderr
    # ... and the adapter that was there is untouched.
    assert digest(run.out / "adapter" / "adapter_model.safetensors") == runs["adapter_before_retrain"]


def test_a_failed_run_leaves_no_adapter(runs):
    run = runs["nan"]
    assert run.proc.returncode == 2, run.explain()
    assert "Traceback" not in run.proc.stderr
    error = [line for line in run.proc.stderr.splitlines() if line.startswith("error:")]
    assert error and "NaN" in error[0] and "training.learning_rate" in error[0], run.explain()
    assert not (run.out / "adapter").exists()
    assert not list(run.out.glob(".adapter*"))
    assert not (run.out / "metrics.json").exists()


def test_classification_metrics_agree_with_the_predictions_shown_and_text_has_none(runs):
    from lorafit.core.metrics import accuracy, macro_f1

    ev = runs["bert_classification"].metrics["eval"]
    samples = ev["samples"]
    assert len(samples) == ev["eval_rows"] == ev["metric_rows"]  # few eval rows: every one is shown
    names = sorted({s[k] for s in samples for k in ("reference", "base", "adapter")})
    truth = [names.index(s["reference"]) for s in samples]
    for which in ("base", "adapter"):
        predicted = [names.index(s[which]) for s in samples]
        assert ev["metrics"]["accuracy"][which] == accuracy(predicted, truth)
        assert ev["metrics"]["macro_f1"][which] == macro_f1(predicted, truth)
    assert "| accuracy |" in (runs["bert_classification"].out / "report.md").read_text()
    text = runs["text_memorise"].metrics["eval"]
    assert "metrics" not in text and "data.format text has no reference" in text["metrics_note"]
