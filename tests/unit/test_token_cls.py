"""token_cls pieces by hand: word → sub-token alignment, the tag map, row checks, entity-level scores."""

from __future__ import annotations

import pytest

from lorafit.core import metrics as M
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data import align_labels, build_datasets
from tests.conftest import write_jsonl


def test_first_sub_token_carries_the_word_label_the_rest_are_ignored():
    # [CLS] EU→E,U  rejects→re,jects  German [SEP]
    word_ids = [None, 0, 0, 1, 1, 2, None]
    assert align_labels(word_ids, [3, 0, 1]) == [-100, 3, -100, 0, -100, 1, -100]
    # A word id that comes back after another word is a new word's start only once.
    assert align_labels([0, 1, 1, 1, 2], [5, 6, 7]) == [5, 6, -100, -100, 7]


def test_entity_spans_read_iob2_like_seqeval():
    assert M.entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    # I after O starts an entity (IOB1 / sloppy IOB2), a type change splits, B after B splits.
    assert M.entity_spans(["O", "I-ORG", "I-ORG", "I-LOC", "B-LOC", "B-LOC"]) == \
        {("ORG", 1, 2), ("LOC", 3, 3), ("LOC", 4, 4), ("LOC", 5, 5)}
    assert M.entity_spans(["S-PER", "B-LOC", "E-LOC", "O"]) == {("PER", 0, 0), ("LOC", 1, 2)}
    assert M.entity_spans(["O", "O"]) == set()


def test_entity_scores_need_exact_span_and_type():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "O", "O", "B-LOC"],     # PER span too short: wrong; LOC right
             ["B-ORG", "B-MISC"]]               # ORG right; MISC spurious
    s = M.entity_scores(refs, preds)
    assert (s["entities"], s["predicted_entities"]) == (3, 4)
    assert s["entity_precision"] == pytest.approx(2 / 4)
    assert s["entity_recall"] == pytest.approx(2 / 3)
    assert s["entity_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert s["token_accuracy"] == pytest.approx(4 / 6)
    assert M.entity_scores([["O"]], [["O"]])["entity_f1"] == 0.0


@pytest.fixture(scope="module")
def bert_tokenizer():
    from lorafit.tools.tiny import build_tokenizer

    return build_tokenizer("bert")


def _bundle(tmp_path, rows, tokenizer, **spec):
    path = write_jsonl(tmp_path / "ner.jsonl", rows)
    return build_datasets(DataSpec(train=str(path), format="tokens", eval_fraction=0, **spec), tokenizer, "token_cls")


def test_tokens_rows_become_one_label_per_word(tmp_path, bert_tokenizer):
    rows = [{"tokens": ["Alice", "lives", "in", "Paris"], "tags": ["B-PER", "O", "O", "B-LOC"]},
            {"tokens": ["Bob", "Brown", "left"], "tags": ["B-PER", "I-PER", "O"]}]
    b = _bundle(tmp_path, rows, bert_tokenizer)
    assert b.label_names == ["O", "B-LOC", "B-PER", "I-PER"]  # O first, then sorted
    first = b.train[0]["labels"]
    assert [x for x in first if x != -100] == [2, 0, 0, 1]
    assert first[0] == -100 and first[-1] == -100  # [CLS] and [SEP]
    assert b.stats["trainable_tokens"] == 7


def test_integer_tags_and_custom_columns(tmp_path, bert_tokenizer):
    rows = [{"words": ["a", "b"], "ner": [0, 2]}, {"words": ["c"], "ner": ["1"]}]
    b = _bundle(tmp_path, rows, bert_tokenizer, columns={"tokens": "words", "tags": "ner"})
    assert b.label_names == ["0", "1", "2"]


def test_tokens_and_tags_of_different_length_name_the_line(tmp_path, bert_tokenizer):
    rows = [{"tokens": ["a", "b"], "tags": ["O", "O"]}, {"tokens": ["a", "b", "c"], "tags": ["O", "B-X"]}]
    with pytest.raises(DataError) as e:
        _bundle(tmp_path, rows, bert_tokenizer)
    assert e.value.where == f"{tmp_path / 'ner.jsonl'}:2" and "3 tokens but 2 tags" in str(e.value)


def test_given_tag_names_keep_a_trained_heads_ids(tmp_path, bert_tokenizer):
    names = ["O", "B-LOC", "B-PER", "I-LOC", "I-PER"]  # a saved id2label; these rows have no LOC
    b = _bundle(tmp_path, [{"tokens": ["Anna", "Smith"], "tags": ["B-PER", "I-PER"]}], bert_tokenizer)
    assert b.label_names == ["B-PER", "I-PER"]  # rebuilt from the rows alone: the ids would shift
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Anna", "Smith"], "tags": ["B-PER", "I-PER"]},
                                                {"tokens": ["Bob"], "tags": ["B-ORG"]}])
    spec = DataSpec(train=str(path), format="tokens", eval_fraction=0)
    with pytest.raises(DataError, match="tag 'B-ORG' is not one of the adapter's 5 classes") as e:
        build_datasets(spec, bert_tokenizer, "token_cls", label_names=names)
    assert e.value.where == f"{path}:2"
    write_jsonl(path, [{"tokens": ["Anna", "Smith"], "tags": ["B-PER", "I-PER"]}])
    b = build_datasets(spec, bert_tokenizer, "token_cls", label_names=names)
    assert b.label_names == names and [x for x in b.train["labels"][0] if x >= 0] == [2, 4]


def test_mixed_names_and_ids_are_refused(tmp_path, bert_tokenizer):
    with pytest.raises(DataError, match="mixes tag names and integer ids"):
        _bundle(tmp_path, [{"tokens": ["a", "b"], "tags": ["O", 1]}], bert_tokenizer)


def test_recipe_cross_checks_tie_tokens_to_token_cls():
    from lorafit.errors import RecipeError
    from lorafit.recipe import validate_recipe

    with pytest.raises(RecipeError, match="token_cls needs format 'tokens'"):
        validate_recipe({"model": {"name": "m", "task": "token_cls"}, "data": {"train": "x.jsonl", "format": "text"}})
    with pytest.raises(RecipeError, match="format 'tokens' needs task 'token_cls'"):
        validate_recipe({"model": {"name": "m"}, "data": {"train": "x.jsonl", "format": "tokens"}})


def test_integer_tags_name_no_entity_types():
    assert not M.has_tag_names(["0", "1", "2"]) and not M.has_tag_names(["LABEL_0", "LABEL_1"])
    assert not M.has_tag_names(None) and M.has_tag_names(["O", "B-PER", "I-PER"])


def test_token_metrics_in_row_order_and_integer_tags_score_token_accuracy_only(tmp_path, bert_tokenizer, tiny_models):
    """A real Trainer with group_by_length (its eval sampler reorders rows): samples still pair each row with
    its own tags, and integer tags get token_accuracy alone, with a note (no entity scores of '1' spans)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForTokenClassification, Trainer, TrainingArguments

    from lorafit.recipe import validate_recipe
    from lorafit.stages.eval_common import EvalContext
    from lorafit.stages.token_eval import token_metrics

    rows = [{"tokens": ["w"] * n, "tags": [n % 3] * n} for n in (1, 7, 2, 9, 3, 6, 4, 8)]
    bundle = _bundle(tmp_path, rows, bert_tokenizer)
    assert bundle.label_names == ["0", "1", "2"]
    base = AutoModelForTokenClassification.from_pretrained(tiny_models("bert", "token_cls"), num_labels=3,
                                                           ignore_mismatched_sizes=True)
    model = get_peft_model(base, LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=["query", "value"]))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=3, report_to=[],
                             train_sampling_strategy="group_by_length", use_cpu=True)
    trainer = Trainer(model=model, args=args, data_collator=bundle.collator)
    recipe = validate_recipe({"model": {"name": "m", "task": "token_cls"},
                              "data": {"train": "/d.jsonl", "format": "tokens"},
                              "evaluation": {"batch_size": 3, "report_samples": 8}, "output": {"dir": str(tmp_path)}})
    out = token_metrics(EvalContext(trainer, bundle.train, bert_tokenizer, recipe, bundle.label_names, True))
    assert set(out["metrics"]) == {"token_accuracy"} and "integer ids" in out["note"]
    assert [s["reference"] for s in out["samples"]] == [" ".join(str(t) for t in r["tags"]) for r in rows]
    assert [len(s["adapter"].split()) for s in out["samples"]] == [len(r["tokens"]) for r in rows]


def test_byte_level_bpe_words_keep_their_leading_space(tiny_gpt2, tmp_path):
    """RoBERTa/GPT-2-style tokenizers given words one by one: each word is tokenized as in running text
    (add_prefix_space turned on for token_cls, and saved so); other tasks and other tokenizers are untouched."""
    from transformers import AutoTokenizer

    from lorafit.core.models import load_tokenizer
    from lorafit.recipe import ModelSpec
    from lorafit.stages.data import encode_words

    plain = load_tokenizer(ModelSpec(name=str(tiny_gpt2)))
    assert plain("hello")["input_ids"] != plain(" hello")["input_ids"]  # the space is part of the first token
    words = load_tokenizer(ModelSpec(name=str(tiny_gpt2), task="token_cls"))
    ids = encode_words(words, [["hello", "world"]], 64)["input_ids"][0]
    assert ids == plain(" hello world")["input_ids"]
    words.save_pretrained(tmp_path)  # the adapter's copy: predict tokenizes as training did
    assert AutoTokenizer.from_pretrained(tmp_path)(["hello", "world"], is_split_into_words=True)["input_ids"] == ids
    # A ByteLevel behind a regex Split (Llama 3 style) is left alone: a prefix would go before every piece.
    from tokenizers import Regex, pre_tokenizers

    from lorafit.core.models import prefix_space_for_words

    plain.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    before = plain.backend_tokenizer.to_str()
    assert prefix_space_for_words(plain) is False and plain.backend_tokenizer.to_str() == before
