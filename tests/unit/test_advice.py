"""Advice (docs/advice.md): each code provoked alone on a recipe and a run's facts (no model), a clean run
earns none, each threshold holds at its edge; the data's advice from real rows; on a tiny model, validate's
table marks advice `warn` and counts it, --strict / advice.strict exit 2 before anything is written,
advice.ignore silences a code, and train says the very advice validate says and records it in metrics.json."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from lorafit import pipeline
from lorafit.core.advice import CODES, RULES, Facts, advise, optimizer_steps
from lorafit.errors import AdviceError
from lorafit.recipe import DataSpec, load_recipe, validate_recipe
from lorafit.stages.data import build_datasets
from lorafit.tools.tiny import build_tokenizer
from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A run that earns no advice: 2,000 training rows, 200 held out, 125 steps of 16 rows, r 16 / alpha 32 on every
# linear layer, dropout 0.05, 2e-4.
RECIPE = {"model": {"name": "some/model"}, "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
          "data": {"train": "train.jsonl", "format": "alpaca", "max_length": 1024},
          "training": {"epochs": 1, "batch_size": 4, "grad_accum": 4, "learning_rate": 2.0e-4}}
DATA = {"train_rows": 2000, "eval_rows": 200, "rows_read": 2200, "truncated": 0, "eos_cut": 0,
        "dropped_fully_masked": 0, "duplicates": 0, "eval_in_train": 0, "empty_fields": 0,
        "token_lengths": {"p50": 200, "p95": 600, "p99": 900, "max": 1500}, "files": [{"rows": 2200}],
        "first_rows": {}}
LAYOUT = {"targeted_blocks": ["attention", "mlp"], "model_blocks": ["attention", "mlp"],
          "embedding": "model.embed_tokens", "embedding_rows": 1000, "output_embedding": "lm_head"}


def merged(base: dict, changes: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in changes.items():
        node = out
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def codes(recipe: dict = {}, data: dict = {}, **facts) -> list[str]:
    layout = {**LAYOUT, **facts.pop("layout", {})}
    found = advise(validate_recipe(merged(RECIPE, recipe)),
                   Facts(data=merged(DATA, data), layout=layout, tokenizer_size=facts.pop("tokenizer_size", 1000),
                         context=4096, **facts))
    return [a.code for a in found]


# code → (recipe changes, data changes, other facts) that provoke it and nothing else.
ALONE = {
    "rank-high": ({"lora.r": 64, "lora.alpha": 128}, {}, {}),
    "alpha-ratio": ({"lora.alpha": 128}, {}, {}),
    "lr-low": ({"training.learning_rate": 1.0e-5}, {}, {}),
    "lr-high": ({"training.learning_rate": 2.0e-3}, {}, {}),
    "attention-only": ({"lora.target_modules": ["q_proj", "v_proj"]}, {}, {"layout": {"targeted_blocks": ["attention"]}}),
    "no-dropout": ({"lora.dropout": 0.0}, {}, {}),
    "no-eval": ({}, {"eval_rows": 0}, {}),
    "eval-leak": ({}, {"eval_in_train": 3}, {}),
    "duplicates": ({}, {"duplicates": 30}, {}),
    "empty-fields": ({}, {"empty_fields": 1, "first_rows": {"empty_fields": "train.jsonl:7 ('output')"}}, {}),
    "rows-dropped": ({}, {"dropped_fully_masked": 1}, {}),
    "truncation": ({}, {"truncated": 200, "token_lengths.p99": 1500}, {}),
    "eos-cut": ({}, {"truncated": 30, "eos_cut": 30}, {}),
    "few-steps": ({"training.max_steps": 20}, {}, {}),
    "many-epochs": ({"training.epochs": 4}, {}, {}),
    "qlora-no-gc": ({"quantization.bits": 4, "training.gradient_checkpointing": False}, {},
                    {"device": "cuda", "gradient_checkpointing": False}),
    "new-tokens": ({}, {}, {"tokenizer_size": 1003}),
}


def test_a_clean_run_earns_no_advice():
    assert codes() == []
    assert optimizer_steps(validate_recipe(RECIPE), 2000) == 125


def test_every_code_is_provoked_here():
    assert sorted(ALONE) == sorted(CODES)


@pytest.mark.parametrize("code", CODES)
def test_each_advice_alone(code):
    recipe, data, facts = ALONE[code]
    assert codes(recipe, data, **facts) == [code]


# Each threshold at its edge: the last value that earns nothing, then the first that earns the advice.
EDGES = [
    ("rank-high", {"lora.r": 32, "lora.alpha": 64}, {"lora.r": 64, "lora.alpha": 128}, {}),
    ("rank-high", {"lora.r": 64, "lora.alpha": 128}, None, {"train_rows": 5000}),  # enough data for r 64
    ("alpha-ratio", {"lora.alpha": 64}, {"lora.alpha": 65}, {}),     # alpha/r 4 is the edge
    ("alpha-ratio", {"lora.alpha": 8}, {"lora.alpha": 7}, {}),       # alpha/r 0.5 is the other edge
    ("alpha-ratio", {"lora.alpha": 200, "lora.use_rslora": True}, None, {}),  # alpha/√r: chosen on purpose
    ("lr-low", {"training.learning_rate": 5.0e-5}, {"training.learning_rate": 4.9e-5}, {}),
    ("lr-high", {"training.learning_rate": 1.0e-3}, {"training.learning_rate": 1.1e-3}, {}),
    ("lr-high", {"training.learning_rate": 3.0e-3}, None, {"train_rows": 1000}),  # small data: allowed
    ("few-steps", {"training.max_steps": 50}, {"training.max_steps": 49}, {}),
    ("many-epochs", {"training.epochs": 3}, {"training.epochs": 3.5}, {}),
    ("no-dropout", {"lora.dropout": 0.0}, None, {"train_rows": 5000}),  # large data: 0 is fine
]


@pytest.mark.parametrize("code, quiet, loud, data", EDGES, ids=lambda x: x if isinstance(x, str) else "")
def test_each_threshold_at_its_edge(code, quiet, loud, data):
    assert code not in codes(quiet, data)
    if loud is not None:
        assert code in codes(loud, data)


def test_data_thresholds_at_their_edges():
    assert "duplicates" not in codes(data={"duplicates": 22}) and "duplicates" in codes(data={"duplicates": 23})  # 1 %
    assert "truncation" not in codes(data={"truncated": 110}) and "truncation" in codes(data={"truncated": 111})  # 5 %
    assert "eos-cut" not in codes(data={"truncated": 22, "eos_cut": 22}) and "eos-cut" in codes(
        data={"truncated": 23, "eos_cut": 23})  # 1 %


def test_an_unknown_code_in_advice_ignore_is_a_recipe_error():
    from lorafit.errors import RecipeError

    with pytest.raises(RecipeError) as e:
        validate_recipe(merged(RECIPE, {"advice.ignore": ["rank-hihg"]}))
    assert "advice.ignore.0: got 'rank-hihg'; did you mean 'rank-high'?" in str(e.value)


def test_classifiers_may_adapt_attention_only():
    seq_cls = {"model.task": "seq_cls", "data.format": "classification", "lora.target_modules": ["query", "value"]}
    assert codes(seq_cls, layout={"targeted_blocks": ["attention"]}) == []


def test_steps_and_epochs_follow_the_trainer():
    recipe = validate_recipe(merged(RECIPE, {"training.batch_size": 3, "training.grad_accum": 2,
                                             "training.epochs": 2}))
    assert optimizer_steps(recipe, 100) == 2 * 17  # ⌈100/3⌉ = 34 batches → 17 steps an epoch
    assert optimizer_steps(recipe, 100, world_size=2) == 2 * 9  # 50 rows a process → 17 batches → 9 steps


def test_the_fixes_name_the_numbers():
    def advice(code, recipe={}, data={}, **facts):
        layout = {**LAYOUT, **facts.pop("layout", {})}
        return next(a for a in advise(validate_recipe(merged(RECIPE, recipe)),
                                      Facts(data=merged(DATA, data), layout=layout, context=4096,
                                            tokenizer_size=facts.pop("tokenizer_size", 1000), **facts))
                    if a.code == code)

    a = advice("truncation", data={"truncated": 200, "token_lengths.p99": 1500})
    assert a.where == "data.max_length" and "200 of 2,200 rows (9.1 %)" in a.message
    assert "data.max_length: 1500 (keeps 99 % of rows whole)" in a.fix
    a = advice("truncation", data={"truncated": 200, "token_lengths.p99": 9000})
    assert "data.max_length: 4096 (the model's context" in a.fix
    assert advice("rank-high", {"lora.r": 128, "lora.alpha": 256}).fix.startswith("start from r 4–16")
    assert advice("alpha-ratio", {"lora.r": 64, "lora.alpha": 16}).fix == \
        "set lora.alpha: 128 or, at this rank, lora.use_rslora: true (scale alpha/√r)"
    assert "training.max_steps ≤ 375" in advice("many-epochs", {"training.epochs": 4}).fix  # 3 epochs · 125 steps
    a = advice("new-tokens", tokenizer_size=1003)
    assert "3 of its tokens" in a.message and a.fix.endswith("lora.modules_to_save: [embed_tokens, lm_head]")
    a = advice("empty-fields", data={"empty_fields": 2, "first_rows": {"empty_fields": "t.jsonl:7 ('output')"}})
    assert "2 rows have an empty field, first at t.jsonl:7 ('output')" in a.message


def test_docs_explain_every_code():
    """docs/advice.md: every code in the table with its threshold, and a section with why, a source and the fix."""
    text = (REPO / "docs" / "advice.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^### ([a-z-]+)\n(.*?)(?=^### |\Z)", text, flags=re.S | re.M))
    assert sorted(sections) == sorted(CODES)
    for code, body in sections.items():
        assert "- **Why**:" in body and "- **Source**:" in body and "- **Fix**:" in body, code
        row = next(line for line in text.splitlines() if line.startswith(f"| [`{code}`]"))
        assert f"| {RULES[code].check} |" in row, row


# ---------------------------------------------------------------------------- the data's advice, from real rows


def data_advice(tmp_path, rows, eval_rows=None, **spec) -> dict:
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    if eval_rows is not None:
        spec["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    data = build_datasets(DataSpec(train=str(path), format="completion", **spec), build_tokenizer("llama"))
    recipe = validate_recipe(merged(RECIPE, {"data": {"train": str(path), "format": "completion", **spec}}))
    return {a.code: a for a in advise(recipe, Facts(data=data.stats, layout=LAYOUT))}


def test_duplicates_and_their_leak_into_the_split(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(40)]
    rows += [{"prompt": "Hi", "completion": " yes"}] * 20  # 19 repeats: 31.7 % of the file
    found = data_advice(tmp_path, rows, eval_fraction=0.2)
    train = tmp_path / "train.jsonl"
    assert f"19 of the 60 rows of data.train (31.7 %) repeat an earlier row, first at {train}:42 (same as " \
           f"{train}:41)" in found["duplicates"].message
    # 12 held out of 60: copies of "Hi" on both sides of the split, counted token for token
    leak = found["eval-leak"]
    assert leak.where == "data.train" and re.search(r"^[1-9]\d* of the 12 held-out rows", leak.message), leak.message


def test_eval_file_rows_in_train(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(20)]
    found = data_advice(tmp_path, rows, eval_rows=[rows[3], {"prompt": "New", "completion": " row"}])
    assert found["eval-leak"].where == "data.eval"
    assert f"1 rows of data.eval also occur in data.train, first at {tmp_path / 'eval.jsonl'}:1" in found[
        "eval-leak"].message
    assert "duplicates" not in found


def test_truncation_lost_eos_and_dropped_rows(tmp_path):
    long = "The quick brown fox jumps over the lazy dog. " * 10
    rows = [{"prompt": "Count", "completion": " one two three four five six seven eight nine ten"},  # EOS cut
            {"prompt": long, "completion": " Four."}]                                                # dropped
    rows += [{"prompt": f"Q{i}", "completion": " yes"} for i in range(8)]
    found = data_advice(tmp_path, rows, eval_fraction=0, max_length=12)
    train = tmp_path / "train.jsonl"
    assert {"truncation", "eos-cut", "rows-dropped", "no-eval"} <= set(found)
    assert "2 of 10 rows (20.0 %) are longer than data.max_length=12" in found["truncation"].message
    assert f"first at {train}:1" in found["eos-cut"].message and f"first at {train}:2" in found["rows-dropped"].message
    assert re.search(r"set data\.max_length: \d+ \(keeps 99 % of rows whole\)", found["truncation"].fix)


# ---------------------------------------------------------------------------- validate and train, tiny llama


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_llama):
    """A recipe on the tiny llama that earns no advice (validate runs no step: 60 steps cost nothing here)."""
    root = tmp_path_factory.mktemp("advice")
    rows = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(40)]
    write_jsonl(root / "train.jsonl", rows)
    recipe = write_recipe(root / "recipe.yaml", {
        "model": {"name": str(tiny_llama)}, "lora": {"r": 8, "alpha": 16, "dropout": 0.05},
        "data": {"train": "train.jsonl", "format": "completion", "eval_fraction": 0.1, "max_length": 64},
        "training": {"max_steps": 60, "batch_size": 1, "grad_accum": 1, "learning_rate": 2.0e-4},
        "evaluation": {"metrics": False}, "output": {"dir": str(root / "run")}})
    return root, recipe


def test_validate_clean_recipe_is_all_ok(clean):
    root, recipe = clean
    proc = run_cli("validate", recipe, env=ENV)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("ok   ") for line in lines[:-1]), proc.stdout
    assert "ok   training   60 optimizer steps of 1 row (1.7 epochs), learning rate 0.0002" in lines
    assert lines[-1] == "0 warnings"


def test_validate_marks_warn_counts_and_strict_exits_2(clean):
    root, recipe = clean
    proc = run_cli("validate", recipe, "--set", "lora.target_modules=[q_proj,v_proj]", env=ENV)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    targets = [line for line in lines if line.split()[1] == "targets"]
    assert targets[0].startswith("warn targets    q_proj, v_proj → 4 modules") and len(targets) == 2
    assert targets[1].startswith("warn targets    [attention-only] lora.target_modules: LoRA adapts attention only")
    assert lines[-1] == "1 warning: advice attention-only (docs/advice.md; --strict makes advice exit 2)"
    assert [line for line in lines if line.startswith("warn")] == targets  # the advice the real layout earns, alone

    strict = run_cli("validate", recipe, "--set", "lora.target_modules=[q_proj,v_proj]", "--strict", env=ENV)
    assert strict.returncode == 2 and strict.stdout == ""
    assert strict.stderr.startswith("error: advice.strict: 1 advice is an error under advice.strict (--strict): "
                                    "[attention-only] lora.target_modules:"), strict.stderr
    assert "advice.ignore: [attention-only]" in strict.stderr and "Traceback" not in strict.stderr

    quiet = run_cli("validate", recipe, "--json", "--strict", "--set", "lora.target_modules=[q_proj,v_proj]",
                    "--set", "advice.ignore=[attention-only]", env=ENV)
    assert quiet.returncode == 0, quiet.stderr
    doc = json.loads(quiet.stdout)["advice"]
    assert doc["given"] == [] and doc["silenced"] == ["attention-only"] and doc["ignore"] == ["attention-only"]


def test_new_tokens_seen_on_a_real_tokenizer(clean, tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    root, recipe = clean
    model = shutil.copytree(tiny_llama, tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens(["<|tool|>", "<|result|>"])
    tokenizer.save_pretrained(model)
    report = pipeline.validate(load_recipe(recipe, [f"model.name={model}"]))
    given = report.advice["given"]
    assert [a["code"] for a in given] == ["new-tokens"], given
    assert "386 tokens and the model's input embedding (embed_tokens) 384 rows: 2 of its tokens" in given[0]["message"]


def test_train_says_what_validate_says_and_records_it(clean):
    """One short run: the advice said once at the start, as validate says it; advice.ignore in metrics.json."""
    root, recipe = clean
    args = ["--set", "training.max_steps=2", "--set", "lora.dropout=0", "--set", "advice.ignore=[no-dropout]",
            "--set", f"output.dir={root / 'trained'}"]
    report = pipeline.validate(load_recipe(recipe, [a for a in args if a != "--set"]))
    assert [a["code"] for a in report.advice["given"]] == ["few-steps"]

    strict = run_cli("train", recipe, *args, "--strict", env=ENV)
    assert strict.returncode == 2 and "[few-steps] training.max_steps: 2 optimizer steps" in strict.stderr
    assert not (root / "trained").exists(), "a refused run leaves no run dir"

    proc = run_cli("train", recipe, *args, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("warning: [")]
    assert said == ["warning: [few-steps] training.max_steps: 2 optimizer steps (1 row each): too few for LoRA's "
                    "B, which starts at zero, to move far; warmup and Adam's first, noisy steps are much of so short "
                    "a run; train for 50 steps or more (training.max_steps, or more training.epochs), or take "
                    "smaller steps (training.batch_size × grad_accum)"]
    metrics = json.loads((root / "trained" / "metrics.json").read_text())
    assert metrics["advice"]["given"] == report.advice["given"]  # train and validate never disagree
    assert metrics["advice"]["ignore"] == ["no-dropout"] and metrics["advice"]["silenced"] == ["no-dropout"]
    assert metrics["advice"]["run"]["optimizer_steps"] == metrics["train"]["steps"] == 2


def test_strict_refusal_is_an_advice_error(clean):
    root, recipe = clean
    with pytest.raises(AdviceError) as e:
        pipeline.validate(load_recipe(recipe, ["advice.strict=true", "lora.r=64", "lora.alpha=128"]))
    assert e.value.exit_code == 2 and e.value.where == "advice.strict" and "[rank-high] lora.r: r=64" in str(e.value)
