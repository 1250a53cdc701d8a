"""Metric arithmetic (core.metrics), the split of a trained row into prompt and reference, report.md and
loss.png from a metrics dict, and the progress lines of long loops: small cases checked by hand."""

from __future__ import annotations

import pytest

from lorafit.core import metrics as M
from lorafit.core.prompts import IGNORE


def test_normalize_folds_case_punctuation_and_spaces():
    assert M.normalize("  Paris. ") == "paris"
    assert M.normalize("It's\tGREAT!!\n") == "it s great"
    assert M.normalize("Ｆｏｕｒ") == "four"  # NFKC: full-width letters
    assert M.normalize("...") == ""


@pytest.mark.parametrize("prediction, reference, exact, contained", [
    ("Paris.", "paris", True, True),
    ("The answer is Paris.", "Paris", False, True),
    ("Pariss", "Paris", False, False),
    ("fourteen", "four", False, False),         # whole words only
    ("four teen", "four", False, True),
    ("", "", True, True),
    ("something", "", False, False),             # an empty reference is found only in an empty answer
])
def test_exact_match_and_contains(prediction, reference, exact, contained):
    assert M.exact_match(prediction, reference) is exact
    assert M.contains(prediction, reference) is contained


def test_generation_scores_are_fractions_of_rows():
    scores = M.generation_scores(["Paris.", "It is four.", "blue", "x"], ["Paris", "Four", "Blue.", "y"])
    assert scores == {"exact_match": 0.5, "contains": 0.75}
    with pytest.raises(ValueError):
        M.generation_scores(["a"], ["a", "b"])


def test_accuracy_and_macro_f1_by_hand():
    labels, preds = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: tp 1, fp 1, fn 1 → 0.5; class 1: tp 2, fp 1, fn 0 → 0.8; class 2: tp 0 → 0.  mean 1.3 / 3
    assert M.accuracy(preds, labels) == 0.6
    assert M.macro_f1(preds, labels) == pytest.approx(0.4333, abs=1e-4)
    assert M.macro_f1([1, 1, 1], [1, 1, 1]) == 1.0
    assert M.macro_f1([0, 0], [1, 1]) == 0.0  # classes 0 and 1 both F1 0
    assert M.accuracy([], []) is None and M.macro_f1([], []) is None


def test_split_row_takes_the_last_trained_span_as_reference():
    from lorafit.stages.evaluate import split_row

    # BOS, prompt 11 12, response 21 22 + EOS 2
    assert split_row([1, 11, 12, 21, 22, 2], [IGNORE, IGNORE, IGNORE, 21, 22, 2]) == ([1, 11, 12], [21, 22, 2])
    # chat: two assistant turns; the reference is the last one, the first stays in the prompt
    ids = [1, 5, 30, 31, 6, 5, 40, 6]
    labels = [IGNORE, IGNORE, 30, 31, 6, IGNORE, 40, 6]
    assert split_row(ids, labels) == ([1, 5, 30, 31, 6, 5], [40, 6])
    assert split_row([1, 2], [IGNORE, IGNORE]) is None


METRICS = {
    "precision": "fp32", "trainable_params": 1234, "trainable_percent": 1.5, "target_modules": ["q_proj"],
    "train": {"steps": 4, "epochs": 1.0, "first_loss": 3.0, "final_loss": 1.0, "tokens_seen": 400,
              "train_tokens_per_second": 100.0,
              "loss_history": [{"step": s, "loss": 4.0 - s * 0.75} for s in range(1, 5)]},
    "data": {"train_rows": 7, "eval_rows": 1, "train_tokens": 300, "trainable_tokens": 90, "truncated": 0,
             "dropped_fully_masked": 0, "duplicates": 0, "token_lengths": {"p50": 40, "p95": 50, "max": 52},
             "files": [{"path": "/d/train.jsonl", "sha256": "ab" * 32}]},
    "eval": {"eval_rows": 1, "eval_loss": 1.25, "eval_perplexity": 3.4903, "base_eval_loss": 3.5,
             "base_eval_perplexity": 33.1155, "metric_rows": 1,
             "metrics": {"exact_match": {"base": 0.0, "adapter": 1.0}, "contains": {"base": 0.0, "adapter": 1.0}},
             "samples": [{"prompt": "Q: ```x``` |?", "reference": "Paris.", "base": "\x1b[2Jzz", "adapter": "Paris."}],
             "prompts": [{"prompt": "Hello", "base": "", "adapter": "Bonjour."}],
             "loss_history": [{"step": 2, "eval_loss": 2.0}, {"step": 4, "eval_loss": 1.25}]},
}


def _recipe(tmp_path):
    from lorafit.recipe import validate_recipe

    return validate_recipe({"model": {"name": "m"}, "data": {"train": "/d/train.jsonl", "format": "completion"},
                            "output": {"dir": str(tmp_path)}})


def test_report_and_plot_agree_with_the_metrics(tmp_path):
    from lorafit.stages.report import write_report

    path = write_report(tmp_path, _recipe(tmp_path), METRICS)
    text = path.read_text()
    assert "| eval loss | 3.5000 | 1.2500 | -2.2500 |" in text
    assert "| perplexity | 33.1155 | 3.4903 | -29.6252 |" in text
    assert "| exact_match | 0.0000 | 1.0000 | +1.0000 |" in text
    assert "| 7 | 1 | 300 | 90 | 40 | 50 | 52 | 0 | 0 | 0 |" in text
    assert "````text\nQ: ```x``` |?\n````" in text    # a fence the prompt's backticks cannot close
    assert "\x1b" not in text and "| base | \ufffd[2Jzz |" in text  # no raw control characters
    assert "| adapter | Paris. |" in text and "*(empty)*" not in text.split("## Prompts")[0]
    assert "Bonjour." in text.split("## Prompts")[1]
    assert "![train and eval loss by step](loss.png)" in text
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_a_failed_plot_warns_and_the_report_is_still_written(tmp_path, capsys):
    from lorafit.stages.report import write_report

    bad = {**METRICS, "train": {**METRICS["train"], "loss_history": [{"step": 1, "loss": 2.0}, {"step": 2}]}}
    path = write_report(tmp_path, _recipe(tmp_path), bad)
    assert "warning: loss.png not written" in capsys.readouterr().err
    assert not (tmp_path / "loss.png").exists() and "loss.png" not in path.read_text()
    assert "| exact_match |" in path.read_text()


def test_a_report_that_cannot_be_written_warns_and_leaves_no_temporary_file(tmp_path, capsys):
    from lorafit.stages.report import write_report

    (tmp_path / "report.md").mkdir()  # the rename onto it fails (as a read-only run dir would, even as root)
    assert write_report(tmp_path, _recipe(tmp_path), METRICS) is None
    assert "warning: " in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_classifier_samples_are_headed_as_predictions(tmp_path):
    from lorafit.recipe import validate_recipe
    from lorafit.stages.report import report_markdown

    metrics = {"eval": {"samples": [{"prompt": "Alice lives", "reference": "B-PER O", "adapter": "B-PER O"}]}}
    for task, fmt, heading in [("token_cls", "tokens", "## Sample predictions"),
                               ("seq_cls", "classification", "## Sample predictions"),
                               ("causal_lm", "completion", "## Sample generations")]:
        recipe = validate_recipe({"model": {"name": "m", "task": task}, "data": {"train": "/d.jsonl", "format": fmt},
                                  "output": {"dir": str(tmp_path)}})
        assert heading in report_markdown(recipe, metrics, None), task


def test_progress_prints_a_few_lines_off_a_terminal(capsys):
    from lorafit import log

    with log.Progress("generate (adapter)", total=12) as progress:
        for _ in range(12):
            progress.update()
    with log.Progress("short", total=3) as progress:
        for _ in range(3):
            progress.update()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["generate (adapter): 3/12 batches", "generate (adapter): 6/12 batches",
                     "generate (adapter): 9/12 batches"]


def test_encoder_decoder_batches_answer_as_each_prompt_alone(tiny_bart):
    """BART embeds absolute positions: a left-padded source would shift them; right padding keeps them."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from lorafit.core.generation import generate_greedy, prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_bart)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart).eval()
    # Untrained, it would answer EOS at once whatever the source; barred from special tokens, its answers
    # depend on the encoder (a left-padded batch gives other ones: checked when right padding came in).
    model.final_logits_bias[0, tok.all_special_ids] = -1e4
    texts = ["a", "the quick brown fox jumps over the lazy dog again and again", "hello there world"]
    prompts = [prompt_ids(t, tok, None, seq2seq=True) for t in texts]
    stop = [tok.eos_token_id]
    batched = generate_greedy(model, tok, prompts, max_new_tokens=12, stop=stop, batch_size=3)
    alone = [generate_greedy(model, tok, [p], max_new_tokens=12, stop=stop)[0] for p in prompts]
    assert batched == alone and len(set(alone)) > 1


def test_a_seq2seq_prompt_is_cut_as_training_cuts_keeping_its_eos(tiny_t5):
    from transformers import AutoTokenizer

    from lorafit.core.generation import prompt_ids
    from lorafit.recipe import DataSpec

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    spec = DataSpec(train="/d.jsonl", format="seq2seq", max_length=8)
    source = "one two three four five six seven eight nine ten eleven twelve"
    ids = prompt_ids({"source": source, "target": "x"}, tok, spec)
    assert len(ids) == 8 and ids[-1] == tok.eos_token_id
    assert ids == prompt_ids(source, tok, spec)  # a row (predict) and a free-text prompt (generate) alike


def test_sharded_weights_skip_generation_with_a_note(monkeypatch, tmp_path):
    """Under FSDP / ZeRO-3 a forward needs every rank: generating on rank 0 alone would hang."""
    import datasets

    from lorafit.recipe import validate_recipe
    from lorafit.stages.eval_common import EvalContext, generation_metrics

    def ctx(strategy, **dist):
        recipe = validate_recipe({"model": {"name": "m"}, "data": {"train": "/d.jsonl", "format": "completion"},
                                  "training": {"distributed": {"strategy": strategy, **dist}},
                                  "output": {"dir": str(tmp_path)}})
        rows = datasets.Dataset.from_dict({"input_ids": [[1, 5, 6]], "labels": [[IGNORE, IGNORE, 6]]})
        return EvalContext(None, rows, None, recipe, None, True)

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ctx("ddp").sharded is None and ctx("deepspeed", zero_stage=2).sharded is None
    assert "fsdp" in ctx("fsdp").sharded and ctx("deepspeed").sharded
    out = generation_metrics(ctx("fsdp"), lambda r: (r["input_ids"][:2], r["input_ids"][2:]))
    assert set(out) == {"note"} and "skipped" in out["note"] and "lorafit evaluate" in out["note"]
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ctx("fsdp").sharded is None
