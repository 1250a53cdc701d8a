"""The arithmetic and the rules behind issue 30's figures: confusion matrix, per-class and per-entity-type scores,
overfitting seen in the loss log, the user's own turn, the few-shot prompts (fewer examples where the context is
short), training.keep_best's requirement, and the built-in retain set skipped (and said) on a tiny random model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lorafit.core import metrics as M
from lorafit.core.prompts import user_turn
from lorafit.recipe import DataSpec, EvaluationSpec, validate_recipe
from lorafit.stages.baselines import few_shot_k, few_shot_prompts
from lorafit.stages.evaluate import overfitting
from tests.conftest import REPO, run_cli


def test_confusion_matrix_and_per_class_scores():
    labels = [0, 0, 1, 1, 1, 2]
    predictions = [0, 1, 1, 1, 0, 2]
    matrix = M.confusion_matrix(predictions, labels, 3)
    assert matrix == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    per = M.per_class(matrix, ["neg", "pos", "neutral"])
    assert per["pos"] == {"precision": round(2 / 3, 4), "recall": round(2 / 3, 4), "f1": round(2 / 3, 4), "support": 3}
    assert per["neutral"]["f1"] == 1.0 and per["neg"]["support"] == 2
    # macro-F1 is the mean of the per-class F1s
    assert M.macro_f1(predictions, labels) == pytest.approx(sum(v["f1"] for v in per.values()) / 3, abs=1e-4)


def test_per_entity_type_scores():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-LOC", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["B-LOC", "O"]]
    per = M.per_entity_type(refs, preds)
    assert per["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["LOC"]["precision"] == 1.0 and per["LOC"]["recall"] == 0.5 and per["LOC"]["support"] == 2


def _log(evals, trains):
    return [{"step": s, "loss": x} for s, x in trains] + [{"step": s, "eval_loss": x} for s, x in evals]


def test_overfitting_needs_three_evaluations_eval_loss_up_and_train_loss_down():
    trains = [(5, 2.0), (10, 1.0), (15, 0.5), (20, 0.2)]
    found = overfitting(_log([(5, 3.0), (10, 2.5), (15, 2.7), (20, 2.9)], trains))
    assert found == {"best_step": 10, "best_eval_loss": 2.5, "last_step": 20, "last_eval_loss": 2.9,
                     "train_loss_at_best": 1.0, "train_loss_at_last": 0.2}
    assert overfitting(_log([(10, 2.5), (20, 2.9)], trains)) is None  # two points say nothing
    assert overfitting(_log([(5, 3.0), (10, 2.5), (20, 2.4)], trains)) is None  # still falling
    assert overfitting(_log([(5, 3.0), (10, 2.5), (20, 2.9)], [(10, 1.0), (20, 1.5)])) is None  # both rose: no


def test_the_users_turn_is_what_the_user_wrote():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "First?"},
                         {"role": "assistant", "content": "A."}, {"role": "user", "content": "Second?"},
                         {"role": "assistant", "content": "B."}]}
    assert user_turn(chat, DataSpec(train="-", format="chat")) == "Second?"
    alpaca = DataSpec(train="-", format="alpaca")
    assert user_turn({"instruction": "Sum", "input": "2 2", "output": "4"}, alpaca) == "Sum\n\n2 2"
    assert user_turn({"instruction": "Sum", "input": "", "output": "4"}, alpaca) == "Sum"
    assert user_turn({"prompt": "Q", "completion": "A"}, DataSpec(train="-", format="completion")) == "Q"
    assert user_turn({"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}, DataSpec(train="-", format="tokens")) == \
        "Ann runs"


def test_few_shot_is_asked_for_and_shrinks_to_fit_the_context():
    from transformers import AutoTokenizer

    assert few_shot_k(EvaluationSpec()) is None
    assert few_shot_k(EvaluationSpec(baselines=["zero_shot", "few_shot"])) == 3
    assert few_shot_k(EvaluationSpec(baselines=["few_shot:5"])) == 5
    tok = AutoTokenizer.from_pretrained(REPO / "examples" / "tiny-llama")
    data = DataSpec(train="-", format="completion")
    train = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(6)]
    rows = [{"prompt": "Short?", "completion": " Yes."}, {"prompt": "Long " * 60 + "?", "completion": " No."}]
    ctx = SimpleNamespace(recipe=SimpleNamespace(data=data), rows=rows, train_rows=train, tokenizer=tok)
    wide, note = few_shot_prompts(ctx, [0, 1], 3, 8, None)
    assert note is None and all(tok.decode(ids).count("Answer") == 3 for ids in wide)
    narrow, note = few_shot_prompts(ctx, [0, 1], 3, 8, (len(wide[1]) - 1, "max_position_embeddings"))
    assert tok.decode(narrow[0]).count("Answer") == 3 and tok.decode(narrow[1]).count("Answer") < 3
    assert "k=" in note and "1 row" in note


def test_keep_best_needs_eval_steps():
    proc = run_cli("validate", REPO / "recipes" / "tiny-smoke.yaml", "--set", "training.keep_best=true")
    assert proc.returncode == 2 and "training.keep_best: needs training.eval_steps" in proc.stderr, proc.stderr
    ok = validate_recipe({"model": {"name": "m"}, "data": {"train": "d"},
                          "training": {"keep_best": True, "eval_steps": 5}})
    assert ok.training.keep_best
    with pytest.raises(Exception, match="unknown baseline"):
        validate_recipe({"model": {"name": "m"}, "data": {"train": "d"}, "evaluation": {"baselines": ["ten_shot"]}})


def test_the_built_in_retain_set_is_skipped_and_said_when_the_base_answers_too_few(capsys):
    from transformers import AutoModelForCausalLM

    from lorafit.core import models
    from lorafit.stages.retain import GENERAL, MIN_GENERAL, prepare_retain

    assert len(GENERAL) >= 30 and len({q for q, _ in GENERAL}) == len(GENERAL)
    recipe = validate_recipe({"model": {"name": str(REPO / "examples" / "tiny-llama")},
                              "data": {"train": "d.jsonl", "format": "chat"}, "evaluation": {"batch_size": 8}})
    tok = models.load_tokenizer(recipe.model)
    model = AutoModelForCausalLM.from_pretrained(REPO / "examples" / "tiny-llama")
    skipped = prepare_retain(recipe, model, tok)  # a tiny random model answers none of them
    assert skipped.rows == [] and f"fewer than {MIN_GENERAL}: forgetting is not measured" in skipped.skipped
    assert skipped.skipped in capsys.readouterr().err
    off = validate_recipe({**recipe.model_dump(mode="json"), "evaluation": {"retain": "none"}})
    assert prepare_retain(off, model, tok) is None and capsys.readouterr().err == ""
