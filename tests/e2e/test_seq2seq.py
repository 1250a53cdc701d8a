"""seq2seq_lm end to end on tiny T5 and BART: data (encoder source, labels = target + EOS), training through
the real CLI, plain-peft reload, exact match of generated targets, generate / predict / merge --verify,
and the target modules find-targets names for both architectures."""

from __future__ import annotations

import json

import pytest

from lorafit.errors import DataError, RecipeError
from lorafit.recipe import DataSpec, load_recipe
from tests.conftest import write_jsonl, write_recipe

# Small enough to memorise in a few dozen steps; every target distinct, so exact match means something.
ROWS = [{"source": "What is two plus two?", "target": "Four."},
        {"source": "Translate hello into French.", "target": "Bonjour."},
        {"source": "Name a colour.", "target": "Blue."},
        {"source": "What is one plus two?", "target": "Three."},
        {"source": "Translate yes into French.", "target": "Oui."},
        {"source": "Count to five.", "target": "One two three four five."}]


def _recipe(tmp_path, model, *, steps=40, **data):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    return write_recipe(tmp_path / "recipe.yaml", {
        "model": {"name": str(model), "task": "seq2seq_lm"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        # The eval rows are the train rows: the test is whether the adapter memorised them.
        "data": {"train": str(train), "eval": str(train), "format": "seq2seq", "max_length": 32, **data},
        "training": {"max_steps": steps, "batch_size": 6, "grad_accum": 1, "learning_rate": 1.0e-2,
                     "logging_steps": 10, "save_steps": None, "save_minutes": None},
        "output": {"dir": str(tmp_path / "run")},
    })


# ----------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_labels_are_the_target_alone_with_eos(tiny_models, tmp_path, family):
    from transformers import AutoTokenizer

    from lorafit.stages.data import build_datasets

    tok = AutoTokenizer.from_pretrained(tiny_models(family, "seq2seq_lm"))
    write_jsonl(tmp_path / "d.jsonl", ROWS[:2])
    data = build_datasets(DataSpec(train=str(tmp_path / "d.jsonl"), format="seq2seq", eval_fraction=0), tok,
                          "seq2seq_lm")
    row = data.train[0]
    plain = tok("What is two plus two?", add_special_tokens=False)["input_ids"]
    four = tok("Four.", add_special_tokens=False)["input_ids"]
    eos, bos = tok.eos_token_id, tok.bos_token_id
    if family == "t5":  # T5: text </s>, both sides; no BOS
        assert row["input_ids"] == plain + [eos]
        assert row["labels"] == four + [eos]
    else:  # BART: <s> text </s>, both sides (the decoder starts from </s>, then predicts <s>)
        assert row["input_ids"] == [bos] + plain + [eos]
        assert row["labels"] == [bos] + four + [eos]
    assert tok.decode(row["labels"], skip_special_tokens=True) == "Four."
    assert data.stats["trainable_tokens"] == sum(len(r) for r in data.train["labels"])
    # The collator pads labels with -100 (never trained), input_ids with the pad id under a 0 mask.
    batch = data.collator([data.train[0], data.train[1]])
    short = 0 if len(data.train[0]["labels"]) < len(data.train[1]["labels"]) else 1
    assert (batch["labels"][short] == -100).sum() == abs(len(data.train[0]["labels"]) - len(data.train[1]["labels"]))


def test_truncation_keeps_the_sources_eos_and_counts_a_targets_lost_eos(tiny_t5, tmp_path):
    from transformers import AutoTokenizer

    from lorafit.stages.data import build_datasets

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    long = "one two three four five six seven eight nine ten " * 3
    write_jsonl(tmp_path / "d.jsonl", [{"source": long, "target": "Ten."}, {"source": "Count.", "target": long}])
    data = build_datasets(DataSpec(train=str(tmp_path / "d.jsonl"), format="seq2seq", eval_fraction=0,
                                   max_length=8), tok, "seq2seq_lm")
    first, second = data.train[0], data.train[1]
    assert len(first["input_ids"]) == 8 and first["input_ids"][-1] == tok.eos_token_id
    assert len(second["labels"]) == 8 and second["labels"][-1] != tok.eos_token_id
    assert data.stats["truncated"] == 2 and data.stats["eos_cut"] == 1
    assert data.stats["first_rows"]["eos_cut"] == f"{tmp_path / 'd.jsonl'}:2"


def test_data_doctor_names_the_row(tiny_t5, tmp_path):
    from transformers import AutoTokenizer

    from lorafit.stages.data import build_datasets

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"source": "Hi.", "target": "  "}])
    data = build_datasets(DataSpec(train=str(path), format="seq2seq", eval_fraction=0), tok, "seq2seq_lm")
    assert data.stats["empty_fields"] == 1
    assert data.stats["first_rows"]["empty_fields"] == f"{path}:2 ('target')"
    write_jsonl(path, [ROWS[0], {"source": "Hi.", "summary": "Hello."}])
    with pytest.raises(DataError) as e:
        build_datasets(DataSpec(train=str(path), format="seq2seq", eval_fraction=0), tok, "seq2seq_lm")
    assert e.value.where == f"{path}:2" and "missing column 'target'" in e.value.message
    assert "data.columns.target" in e.value.fix
    # Renamed columns work through data.columns.
    write_jsonl(path, [{"document": "Hi there.", "summary": "Hello."}])
    spec = DataSpec(train=str(path), format="seq2seq", eval_fraction=0,
                    columns={"source": "document", "target": "summary"})
    assert build_datasets(spec, tok, "seq2seq_lm").stats["train_rows"] == 1


def test_task_and_format_must_agree(tmp_path):
    base = {"model": {"name": "x", "task": "seq2seq_lm"}, "data": {"train": "t.jsonl", "format": "alpaca"}}
    with pytest.raises(RecipeError, match="seq2seq_lm needs format 'seq2seq'"):
        load_recipe(write_recipe(tmp_path / "a.yaml", base))
    base = {"model": {"name": "x"}, "data": {"train": "t.jsonl", "format": "seq2seq"}}
    with pytest.raises(RecipeError, match="format 'seq2seq' needs task 'seq2seq_lm'"):
        load_recipe(write_recipe(tmp_path / "b.yaml", base))


# ----------------------------------------------------------------------------------------------
# Targets


def test_find_targets_names_t5_and_bart_modules(tiny_t5, tiny_bart, tmp_path, cli):
    from lorafit.tools.tiny import tiny_config

    relu = tmp_path / "t5-v1.0"  # T5 v1.0's ungated feed-forward (wi, wo): a config alone is enough
    tiny_config("t5", 384, gated=False).save_pretrained(relu)
    expected = {
        tiny_t5: {"attention": ["q", "k", "v", "o"], "mlp": ["wi_0", "wi_1", "wo"]},
        relu: {"attention": ["q", "k", "v", "o"], "mlp": ["wi", "wo"]},
        tiny_bart: {"attention": ["k_proj", "v_proj", "q_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    }
    from lorafit.commands.find_targets import find_targets

    proc = cli("find-targets", tiny_t5, "--task", "seq2seq_lm", "--json")  # the CLI once; the others in-process
    assert proc.returncode == 0, proc.stderr
    for model, presets in expected.items():
        found = json.loads(proc.stdout) if model == tiny_t5 else find_targets(str(model), task="seq2seq_lm")
        for preset, keys in presets.items():
            assert found["presets"][preset]["target_modules"] == keys, (model, preset)
        assert found["presets"]["all-linear"]["target_modules"] == presets["attention"] + presets["mlp"]
        # 2 encoder layers (self-attention) + 2 decoder layers (self- and cross-attention): 6 of each q/k/v/o
        assert found["presets"]["attention"]["modules"] == 4 * 6
        names = [m["name"] for m in found["modules"]]
        assert not any("lm_head" in n for n in names)
        assert any("EncDecAttention" in n or "encoder_attn" in n for n in names)  # cross-attention adapted too


# ----------------------------------------------------------------------------------------------
# Training through the CLI, and everything after it


@pytest.fixture(scope="module")
def t5_run(tiny_models, tmp_path_factory):
    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("t5_run")
    proc = run_cli("train", _recipe(tmp, tiny_models("t5", "seq2seq_lm")), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_t5_memorises_the_rows_and_exact_match_says_so(t5_run):
    metrics = json.loads((t5_run / "metrics.json").read_text())["eval"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"] / 3
    em = metrics["metrics"]["exact_match"]
    assert em["base"] == 0.0 and em["adapter"] >= 0.8, metrics["samples"]
    assert metrics["metric_rows"] == len(ROWS)
    sample = metrics["samples"][0]
    assert sample["prompt"] in [r["source"] for r in ROWS] and sample["reference"] in [r["target"] for r in ROWS]


def test_t5_adapter_reloads_in_plain_peft_and_changes_the_outputs(t5_run, tiny_t5):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    config = json.loads((t5_run / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM"
    assert set(config["target_modules"]) == {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}
    tok = AutoTokenizer.from_pretrained(t5_run / "adapter")
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    enc = tok(ROWS[0]["source"], return_tensors="pt")
    labels = tok(text_target=ROWS[0]["target"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(**enc, labels=labels)
        model = PeftModel.from_pretrained(base, str(t5_run / "adapter")).eval()
        after = model(**enc, labels=labels)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert after.loss < before.loss / 3
    assert (after.logits - before.logits).abs().max() > 1.0
    assert tok.decode(out[0], skip_special_tokens=True).strip() == ROWS[0]["target"]


def test_t5_generate_and_predict_answer_from_the_source(t5_run, tmp_path, cli):
    proc = cli("generate", t5_run, "--prompt", ROWS[1]["source"], "--json")
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["text"] == ROWS[1]["target"]
    data = write_jsonl(tmp_path / "in.jsonl", [{"source": r["source"]} for r in ROWS[:3]])
    proc = cli("predict", t5_run, "--data", data, "--output", tmp_path / "out.jsonl")
    assert proc.returncode == 0, proc.stderr
    predicted = [json.loads(line)["generated"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sum(p == r["target"] for p, r in zip(predicted, ROWS[:3])) >= 2, predicted


def test_t5_merge_verify_scores_targets(t5_run, tmp_path, cli):
    proc = cli("merge", t5_run, "--output", tmp_path / "merged", "--dtype", "float32", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    verify = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    verify = verify.get("verify", verify)
    assert verify["passed"] and verify["prompt_source"].startswith("eval data")
    # Perplexity of the targets: the adapter (and its merge) far below the base.
    assert verify["perplexity_merged"] < verify["perplexity_base"] / 10
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").config.is_encoder_decoder


def test_bart_trains_reloads_and_merges(tiny_bart, tmp_path, cli):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    proc = cli("train", _recipe(tmp_path, tiny_bart, steps=30), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())["eval"]
    assert metrics["eval_loss"] < metrics["base_eval_loss"] / 2
    assert "exact_match" in metrics["metrics"]
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    enc = tok(ROWS[0]["source"], return_tensors="pt")
    base = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart).eval()
    labels = tok(text_target=ROWS[0]["target"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(**enc, labels=labels).loss
        after = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(**enc, labels=labels).loss
    assert after < before / 2
    proc = cli("merge", run, "--output", tmp_path / "merged", "--dtype", "float32", "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stdout
