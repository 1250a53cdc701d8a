"""The data doctor: what the data stage counts before training (lengths, truncation, lost EOS, dropped
rows, duplicates, empty fields, each with its first row), and `validate --show-example`. What those figures
mean for a run is advice (tests/unit/test_advice.py)."""

from __future__ import annotations

import hashlib

import pytest

from lorafit import pipeline, render
from lorafit.errors import AdviceError, LorafitError
from lorafit.recipe import DataSpec, load_recipe
from lorafit.stages.data import build_datasets
from lorafit.stages.data.checks import _percentiles
from lorafit.tools.tiny import build_tokenizer
from tests.conftest import REPO, run_cli, write_jsonl, write_recipe

IGNORE = -100
LONG = "The quick brown fox jumps over the lazy dog. " * 10


@pytest.fixture(scope="module")
def llama():
    return build_tokenizer("llama")  # adds BOS, pad == eos, ChatML template


def build(tmp_path, rows, tokenizer, eval_rows=None, **spec):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    if eval_rows is not None:
        spec["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    spec.setdefault("eval_fraction", 0)
    return build_datasets(DataSpec(train=str(path), **spec), tokenizer)


def test_percentiles_are_nearest_rank():
    assert _percentiles(list(range(20, 0, -1))) == {"p50": 10, "p95": 19, "p99": 20, "max": 20}
    assert _percentiles(list(range(1, 201))) == {"p50": 100, "p95": 190, "p99": 198, "max": 200}
    assert _percentiles([7]) == {"p50": 7, "p95": 7, "p99": 7, "max": 7}
    assert _percentiles([]) == {"p50": 0, "p95": 0, "p99": 0, "max": 0}


def test_clean_data_has_no_warnings(tmp_path, llama, capsys):
    rows = [{"prompt": "Hi", "completion": " yes"}, {"prompt": "Count", "completion": " one two"}]
    b = build(tmp_path, rows, llama, format="completion")
    s = b.stats
    assert s["first_rows"] == {} and "warning" not in capsys.readouterr().err
    assert (s["truncated"], s["eos_cut"], s["dropped_fully_masked"], s["duplicates"], s["eval_in_train"],
            s["empty_fields"]) == (0, 0, 0, 0, 0, 0)
    lengths = sorted(len(r["input_ids"]) for r in b.train)
    assert s["token_lengths"] == {"p50": lengths[0], "p95": lengths[1], "p99": lengths[1], "max": lengths[1]}
    assert s["max_length"] == 1024


def test_every_finding_counted_with_its_first_row(tmp_path, llama, capsys):
    rows = [{"prompt": "Count", "completion": " one two three four five six seven eight nine ten"},  # EOS cut
            {"prompt": LONG, "completion": " Four."},                                                # dropped
            {"prompt": "Hi", "completion": " yes"},
            {"prompt": "Hi", "completion": " yes", "id": 7},                                         # duplicate
            {"prompt": "Empty", "completion": "  "},                                                 # empty field
            {"prompt": "Short", "completion": " one two"}]                                           # only truncated
    eval_rows = [{"prompt": "Hi", "completion": " yes"}, {"prompt": "New", "completion": " row"}]
    b = build(tmp_path, rows, llama, eval_rows=eval_rows, format="completion", max_length=12)
    s = b.stats
    def n(text):
        return len(llama(text, add_special_tokens=False).input_ids)

    full = sorted(1 + n(r["prompt"]) + n(r["completion"]) + 1 for r in rows + eval_rows)  # BOS + segments + EOS
    assert s["token_lengths"] == {"p50": full[3], "p95": full[7], "p99": full[7], "max": full[7]} and full[7] > 12
    assert s["rows_read"] == 8 and s["train_rows"] == 5 and s["eval_rows"] == 2
    assert s["truncated"] == 2 and s["dropped_fully_masked"] == 1
    assert s["eos_cut"] == 1  # the long prompt's row is dropped, not counted twice
    assert s["duplicates"] == 1 and s["eval_in_train"] == 1 and s["empty_fields"] == 1
    # the row that lost its EOS trains up to max_length and ends on a response token, not on EOS
    cut = b.train[0]
    assert len(cut["input_ids"]) == 12 and cut["labels"][-1] != llama.eos_token_id and cut["labels"][-1] != IGNORE
    train = tmp_path / "train.jsonl"
    assert "warning" not in capsys.readouterr().err  # counted here; said by validate and train as advice
    assert s["first_rows"] == {"eos_cut": f"{train}:1", "dropped": f"{train}:2",
                               "duplicates": f"{train}:4 (same as {train}:3)",
                               "eval_in_train": f"{tmp_path / 'eval.jsonl'}:1 (same as {train}:3)",
                               "empty_fields": f"{train}:5 ('completion')"}
    assert [(f["path"], f["rows"]) for f in s["files"]] == [(str(train), 6), (str(tmp_path / "eval.jsonl"), 2)]
    assert s["files"][0]["sha256"] == hashlib.sha256(train.read_bytes()).hexdigest()


def test_chat_end_of_turn_cut_and_empty_message(tmp_path, llama):
    def chat(*turns):
        return {"messages": [{"role": r, "content": c} for r, c in turns]}

    rows = [chat(("user", "Count"), ("assistant", "one two three four five six seven eight nine ten")),
            chat(("user", "Hi"), ("assistant", "yes")),
            chat(("system", ""), ("user", "Hi"), ("assistant", "no"))]
    b = build(tmp_path, rows, llama, format="chat", max_length=32)  # rows of 45, 20 and 29 tokens
    assert b.stats["eos_cut"] == 1 and b.stats["truncated"] == 1
    assert b.stats["empty_fields"] == 1 and b.stats["first_rows"]["empty_fields"].endswith(":3 ('messages[0].content')")
    kept = b.train[1]
    assert [x for x in kept["labels"] if x != IGNORE][-1] == llama.convert_tokens_to_ids("<|im_end|>")
    cut = [x for x in b.train[0]["labels"] if x != IGNORE]
    assert len(b.train[0]["input_ids"]) == 32 and cut[-1] != llama.convert_tokens_to_ids("<|im_end|>")


def test_alpaca_empty_input_is_fine_but_empty_output_is_not(tmp_path, llama):
    rows = [{"instruction": "Name a colour", "input": "", "output": "blue"},
            {"instruction": "Name a colour", "input": "", "output": ""}]
    b = build(tmp_path, rows, llama, format="alpaca")
    assert b.stats["empty_fields"] == 1 and b.stats["duplicates"] == 0  # output differs: not a duplicate


def _recipe(tmp_path, model, rows, **data):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    doc = {"model": {"name": str(model)}, "lora": {"r": 4, "alpha": 8},
           "data": {"train": str(train), "format": "completion", "eval_fraction": 0, "max_length": 64, **data},
           "training": {"max_steps": 1, "batch_size": 2}, "output": {"dir": str(tmp_path / "run")}}
    return write_recipe(tmp_path / "recipe.yaml", doc)


def test_data_strict_train_stops_before_the_run_dir_exists(tmp_path, tiny_llama, capsys):
    """data.strict, advice.strict's former name: the data's advice is an error before anything is written."""
    path = _recipe(tmp_path, tiny_llama, [{"prompt": "Hi", "completion": " yes"}] * 3, strict=True)
    with pytest.raises(AdviceError, match=r"\[duplicates\] data.train: 2 of the 3 rows of data.train") as e:
        pipeline.train(load_recipe(path, []))
    assert e.value.where == "data.strict" and "advice.ignore" in e.value.fix
    assert not (tmp_path / "run").exists()
    assert capsys.readouterr().err.count("data.strict: the former name of advice.strict") == 1


def test_show_example_marks_the_trained_tokens(tmp_path, tiny_llama):
    rows = [{"prompt": "Hi", "completion": " yes"}, {"prompt": "What is two plus two?", "completion": " Four."}]
    report = pipeline.validate(load_recipe(_recipe(tmp_path, tiny_llama, rows), []), show_example=2)
    ex = report.example
    assert (ex["row"], ex["rows"]) == (2, 2)
    assert [t for t, trained in ex["segments"] if trained] == [" Four.</s>"]
    assert "".join(t for t, _ in ex["segments"]) == "<s>What is two plus two? Four.</s>"
    assert ex["trained_tokens"] == sum(x != IGNORE for x in pipeline.build_datasets(
        load_recipe(tmp_path / "recipe.yaml", []).data, build_tokenizer("llama")).train[1]["labels"])

    plain = render.example_lines(ex, color=False)
    assert "2 of 2" in plain[0] and "[[...]]" in plain[0]
    assert plain[-1] == "<s>What is two plus two?[[ Four.</s>]]"
    colored = render.example_lines(ex, color=True)
    assert colored[-1] == "<s>What is two plus two?\x1b[1;32m Four.</s>\x1b[0m" and "[[" not in colored[-1]

    lines = render.validate_lines(report)
    assert any(line.startswith("ok   lengths    tokens per row p50") for line in lines)
    assert any(line.startswith("ok   rows       0 truncated (0 lost their EOS)") for line in lines)

    with pytest.raises(LorafitError) as e:
        pipeline.validate(load_recipe(tmp_path / "recipe.yaml", []), show_example=3)
    assert e.value.where == "--show-example" and "from 1 to 2" in e.value.fix


def test_multiline_trained_span_is_colored_line_by_line():
    ex = {"row": 1, "rows": 1, "tokens": 5, "trained_tokens": 3, "segments": [["Q:\n", False], ["a\nb", True]]}
    assert render.example_lines(ex, color=False)[2:] == ["Q:", "[[a", "b]]"]
    assert render.example_lines(ex, color=True)[2:] == ["Q:", "\x1b[1;32ma\x1b[0m", "\x1b[1;32mb\x1b[0m"]


def test_validate_cli_show_example_is_bracketed_off_a_terminal():
    proc = run_cli("validate", REPO / "recipes" / "tiny-smoke.yaml", "--show-example", "2",
                   env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "ok   lengths    tokens per row p50" in proc.stdout and "\x1b[" not in proc.stdout
    assert out[-1].startswith("[[") and out[-1].endswith("</s>]]") and out[-2] == "### Response:"
    bad = run_cli("validate", REPO / "recipes" / "tiny-smoke.yaml", "--show-example", "0", timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
