"""The data stage with real tiny tokenizers and real files: labels, EOS/BOS, chat, errors, split."""

from __future__ import annotations

import hashlib
import json

import pytest

from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data import build_datasets, make_collator, read_rows
from lorafit.tools.tiny import build_tokenizer
from tests.conftest import write_jsonl

IGNORE = -100


@pytest.fixture
def llama():
    return build_tokenizer("llama")  # adds BOS, pad == eos, ChatML template


@pytest.fixture
def gpt2():
    return build_tokenizer("gpt2")  # no BOS added, no pad, no chat template


def build(tmp_path, rows, tokenizer, **spec):
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    spec.setdefault("eval_fraction", 0)
    return build_datasets(DataSpec(train=str(path), **spec), tokenizer)


def trained(tokenizer, labels):
    return tokenizer.decode([x for x in labels if x != IGNORE])


# ---------------------------------------------------------------------------- labels per format


def test_alpaca_masks_prompt_and_trains_response_and_eos(tmp_path, llama):
    rows = [{"instruction": "Name a colour", "output": "blue"},
            {"instruction": "Translate", "input": "hello", "output": "bonjour"}]
    b = build(tmp_path, rows, llama, format="alpaca")
    first, second = b.train[0], b.train[1]
    assert trained(llama, first["labels"]) == "blue</s>"
    assert trained(llama, second["labels"]) == "bonjour</s>"
    assert first["input_ids"][0] == llama.bos_token_id and first["input_ids"][-1] == llama.eos_token_id
    assert "### Input:" not in llama.decode(first["input_ids"])
    assert "### Input:\nhello" in llama.decode(second["input_ids"])
    # the prompt alone tokenizes to exactly the masked part: training matches inference
    prompt = DataSpec(train="x").prompt_template_no_input.format(instruction="Name a colour")
    n_prompt = 1 + len(llama(prompt, add_special_tokens=False).input_ids)
    assert first["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert first["labels"][n_prompt] != IGNORE
    assert b.stats["trainable_tokens"] == sum(sum(x != IGNORE for x in r["labels"]) for r in b.train)


def test_train_on_inputs_trains_everything_after_the_first_token(tmp_path, llama):
    b = build(tmp_path, [{"prompt": "What is two plus two?", "completion": " Four."}], llama,
              format="completion", train_on_inputs=True)
    row = b.train[0]
    assert row["labels"][0] == IGNORE  # BOS: nothing predicts it
    assert row["labels"][1:] == row["input_ids"][1:]


def test_completion_and_text_formats(tmp_path, llama, gpt2):
    b = build(tmp_path, [{"prompt": "What is two plus two?", "completion": " Four."}], llama, format="completion")
    assert trained(llama, b.train[0]["labels"]) == " Four.</s>"
    t = build(tmp_path, [{"text": "The quick brown fox"}], gpt2, format="text")
    row = t.train[0]
    assert row["input_ids"].count(gpt2.eos_token_id) == 1  # bos == eos here: only the appended EOS
    assert gpt2.decode(row["input_ids"]) == "The quick brown fox<|endoftext|>"
    assert row["labels"][0] == IGNORE and row["labels"][1:] == row["input_ids"][1:]


def test_eos_survives_collation_when_pad_is_eos(tmp_path, llama):
    assert llama.pad_token_id == llama.eos_token_id
    b = build(tmp_path, [{"prompt": "Count", "completion": " one"},
                         {"prompt": "Count to five:", "completion": " one two three four five"}],
              llama, format="completion")
    batch = b.collator([b.train[0], b.train[1]])
    n = len(b.train[0]["input_ids"])
    assert batch["labels"][0, n - 1].item() == llama.eos_token_id  # the real EOS is trained
    assert (batch["labels"][0, n:] == IGNORE).all()  # padding is not
    assert (batch["input_ids"][0, n:] == llama.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)


def test_no_double_bos(tmp_path, llama):
    b = build(tmp_path, [{"text": "<s>The weather is sunny"}], llama, format="text")
    ids = b.train[0]["input_ids"]
    assert ids[0] == llama.bos_token_id and ids[1] != llama.bos_token_id
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}" \
               "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}" \
               "{% if add_generation_prompt %}assistant: {% endif %}"
    c = build(tmp_path, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
              llama, format="chat", chat_template=template)
    ids = c.train[0]["input_ids"]
    assert ids.count(llama.bos_token_id) == 1 and ids[0] == llama.bos_token_id


def test_gpt2_gets_no_bos_and_a_pad(tmp_path, gpt2):
    b = build(tmp_path, [{"prompt": "Count", "completion": " one"}], gpt2, format="completion")
    ids = b.train[0]["input_ids"]
    assert ids[0] == gpt2("Count", add_special_tokens=False).input_ids[0]
    assert ids.count(gpt2.eos_token_id) == 1 and ids[-1] == gpt2.eos_token_id
    assert gpt2.pad_token_id == gpt2.eos_token_id  # set so the saved tokenizer can pad


# ---------------------------------------------------------------------------- chat


def conversation(*turns):
    roles = {"s": "system", "u": "user", "a": "assistant"}
    return {"messages": [{"role": roles[t[0]], "content": t[2:]} for t in turns]}


def test_chat_trains_only_assistant_turns_multi_turn(tmp_path, llama):
    """The ids are exactly the template's render of the whole conversation; labels are each reply and
    its end-of-turn token, nothing else."""
    rows = [conversation("s:Be brief.", "u:hi", "a:yo", "u:again", "a:bye")]
    b = build(tmp_path, rows, llama, format="chat")
    row = b.train[0]
    assert trained(llama, row["labels"]) == "yo<|im_end|>bye<|im_end|>"
    assert row["input_ids"] == list(llama.apply_chat_template(rows[0]["messages"], tokenize=True)["input_ids"])
    everything = build(tmp_path, rows, llama, format="chat", train_on_inputs=True).train[0]
    assert everything["labels"][1:] == everything["input_ids"][1:]


def test_chat_trailing_user_turn_is_not_trained(tmp_path, llama):
    b = build(tmp_path, [conversation("u:hi", "a:yo", "u:ignored")], llama, format="chat")
    assert "ignored" not in llama.decode(b.train[0]["input_ids"])  # after the last reply: dropped
    assert trained(llama, b.train[0]["labels"]) == "yo<|im_end|>"


def test_chat_template_override_and_missing_template(tmp_path, gpt2):
    rows = [conversation("u:hi", "a:yo")]
    with pytest.raises(DataError) as e:
        build(tmp_path, rows, gpt2, format="chat")
    assert e.value.where == "data.chat_template" and "chatml" in e.value.fix
    b = build(tmp_path, rows, gpt2, format="chat", chat_template="chatml")
    assert trained(gpt2, b.train[0]["labels"]) == "yo<|im_end|>"
    assert "<|im_start|>" in gpt2.chat_template  # saved with the adapter: inference uses the same


@pytest.mark.parametrize("row, needle", [
    (conversation("u:hi", "u:anyone?"), "no assistant turn"),
    ({"messages": [{"from": "human", "value": "hi"}]}, "message 1"),
    ({"messages": "hi"}, "non-empty list"),
    (conversation("a:hello", "u:hi"), "starts with an assistant"),
])
def test_chat_bad_rows_point_at_their_line(tmp_path, llama, row, needle):
    good = conversation("u:hi", "a:yo")
    with pytest.raises(DataError) as e:
        build(tmp_path, [good, row], llama, format="chat")
    assert e.value.where.endswith("train.jsonl:2") and needle in e.value.message


def test_chat_template_that_is_not_prefix_stable_trains(tmp_path, llama):
    """Mistral v0.3-style: the system prompt goes into the LAST user turn, so rendering more messages
    changes earlier text. The whole render is located once: no prefix stability needed."""
    template = ("{% set sys = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                "{% set ms = messages[1:] if sys else messages %}{% set last = (ms|selectattr('role', 'eq', 'user')|list)[-1] %}"
                "{{ bos_token }}{% for m in ms %}{% if m['role'] == 'user' %}[INST] "
                "{% if m is sameas last and sys %}{{ sys }}\n\n{% endif %}{{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    rows = [conversation("s:Be kind.", "u:hi", "a:yo", "u:again", "a:bye")]
    row = build(tmp_path, rows, llama, format="chat", chat_template=template).train[0]
    assert trained(llama, row["labels"]) == "yo</s>bye</s>"
    assert llama.decode(row["input_ids"]) == "<s>[INST] hi [/INST]yo</s>[INST] Be kind.\n\nagain [/INST]bye</s>"


@pytest.mark.parametrize("template, needle", [
    ("{% for m in messages %}{{ m['content']|upper }}{{ eos_token }}{% endfor %}", "does not render assistant message 2"),
    ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", "without a special end-of-turn token"),
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
     "{% endif %}{{ m['content'] }}{{ eos_token }}{% endfor %}", "System role not supported"),
])
def test_chat_templates_that_cannot_be_handled_name_the_row_and_a_working_fix(tmp_path, llama, template, needle):
    rows = [conversation("u:hi", "a:yo"), conversation("s:Be kind.", "u:hi", "a:yo")]
    with pytest.raises(DataError) as e:
        build(tmp_path, rows if "System" in needle else rows[:1], llama, format="chat", chat_template=template)
    assert needle in e.value.message and e.value.where.endswith("train.jsonl:2" if "System" in needle else "train.jsonl:1")
    assert ("fold the system message" in e.value.fix) if "System" in needle else ("chatml" in e.value.fix)


# ---------------------------------------------------------------------------- truncation


def test_truncation_counted_and_fully_masked_rows_dropped(tmp_path, llama, capsys):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 10
    rows = [{"prompt": "Count", "completion": " one two three four five six seven eight nine ten"},
            {"prompt": long_prompt, "completion": " Four."},
            {"prompt": "Hi", "completion": " yes"}]
    b = build(tmp_path, rows, llama, format="completion", max_length=12)
    assert b.stats["truncated"] == 2 and b.stats["dropped_fully_masked"] == 1
    assert b.stats["train_rows"] == 2 and b.stats["rows_read"] == 3
    assert len(b.train[0]["input_ids"]) == 12 and b.train[0]["input_ids"][0] == llama.bos_token_id
    assert all(any(x != IGNORE for x in r["labels"]) for r in b.train)
    assert b.stats["first_rows"]["dropped"] == f"{tmp_path / 'train.jsonl'}:2"  # advice rows-dropped names it
    assert "warning" not in capsys.readouterr().err  # the data stage counts; validate and train say it (advice)


def test_nothing_trainable_is_an_error(tmp_path, llama):
    rows = [{"prompt": "The quick brown fox jumps over the lazy dog. " * 5, "completion": " yes"}] * 3
    with pytest.raises(DataError) as e:
        build(tmp_path, rows, llama, format="completion", max_length=8)
    assert e.value.where.endswith("train.jsonl") and "data.max_length" in e.value.fix


# ---------------------------------------------------------------------------- bad files


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


@pytest.mark.parametrize("content, line, needle", [
    ('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n', 3, "column"),
    ('{"text": "a"}\n\n["text", "b"]\n', 3, "JSON object"),
    ('{"text": "a"}\n"just a string"\n', 2, "JSON object"),
    (b'{"text": "a"}\n{"text": "caf\xe9"}\n', 2, "UTF-8"),
])
def test_bad_jsonl_lines(tmp_path, content, line, needle):
    path = write(tmp_path, "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert e.value.where == f"{path}:{line}" and needle in e.value.message


def test_non_utf8_names_the_byte(tmp_path):
    path = write(tmp_path, "bad.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="byte 0xe9 at byte 14"):
        read_rows(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_and_blank_files(tmp_path, content):
    path = write(tmp_path, "empty.jsonl", content)
    with pytest.raises(DataError, match="no rows") as e:
        read_rows(path)
    assert e.value.where == path


def test_missing_column_lists_existing_columns_and_recipe_key(tmp_path, llama):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "response": "b"}]
    with pytest.raises(DataError) as e:
        build(tmp_path, rows, llama, format="alpaca")
    assert e.value.where.endswith("train.jsonl:2")
    assert "'output'" in e.value.message and "instruction, response" in e.value.message
    assert "data.columns.output" in e.value.fix


def test_wrong_column_type(tmp_path, llama):
    with pytest.raises(DataError, match="must be a string, got a number") as e:
        build(tmp_path, [{"text": 3}], llama, format="text")
    assert e.value.where.endswith("train.jsonl:1")


def test_missing_file_unknown_type_and_uncached_hub_id(tmp_path):
    with pytest.raises(DataError, match="file not found") as e:
        read_rows(str(tmp_path / "nope.jsonl"))
    assert e.value.where == "data.train"
    with pytest.raises(DataError, match="unsupported file type"):
        read_rows(write(tmp_path, "data.txt", "hello\n"))
    with pytest.raises(DataError, match="dataset 'nobody/nothing' not found locally or in the hub cache"):
        read_rows("nobody/nothing")


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = write(tmp_path, "a.json", '[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    assert read_rows(array) == [{"text": "a"}, {"text": "b"}]
    lines = write(tmp_path, "l.json", '{"text": "a"}\n{"text": "b"}\n')
    assert read_rows(lines) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DataError) as e:
        read_rows(write(tmp_path, "bad.json", '[\n  {"text": "a"},\n  3\n]\n'))
    assert e.value.where.endswith("bad.json:3")
    with pytest.raises(DataError) as e:
        read_rows(write(tmp_path, "broken.json", '[\n  {"text": "a"},\n  {"text" "b"}\n]\n'))
    assert e.value.where.endswith("broken.json:3") and "column" in e.value.message


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = write(tmp_path, "d.csv", 'text,label\n"hello, world",1\nbye,0\n')
    assert read_rows(csv_path) == [{"text": "hello, world", "label": "1"}, {"text": "bye", "label": "0"}]
    with pytest.raises(DataError) as e:
        read_rows(write(tmp_path, "bad.csv", "text,label\na,1\nb,c,0\n"))
    assert e.value.where.endswith("bad.csv:3")
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "label": [0, 1]}), pq_path)
    assert read_rows(str(pq_path)) == [{"text": "x", "label": 0}, {"text": "y", "label": 1}]


# ---------------------------------------------------------------------------- collator, split, stats


def test_dynamic_padding_pads_to_batch_max_only(tmp_path, llama):
    b = build(tmp_path, [{"text": "one"}, {"text": "one two three"}], llama, format="text", max_length=512)
    lengths = [len(r["input_ids"]) for r in b.train]
    batch = b.collator(list(b.train))
    assert batch["input_ids"].shape == (2, max(lengths)) and max(lengths) < 512
    assert batch["attention_mask"].sum().item() == sum(lengths)


def test_seeded_split_is_deterministic_and_respects_fraction(tmp_path, llama):
    rows = [{"text": f"count {i}"} for i in range(20)]
    a = build(tmp_path, rows, llama, format="text", eval_fraction=0.25, seed=1)
    again = build(tmp_path, rows, llama, format="text", eval_fraction=0.25, seed=1)
    other = build(tmp_path, rows, llama, format="text", eval_fraction=0.25, seed=2)
    assert a.stats["eval_rows"] == len(a.eval) == 5 and a.stats["train_rows"] == 15
    assert a.eval["input_ids"] == again.eval["input_ids"]
    assert a.eval["input_ids"] != other.eval["input_ids"]
    assert build(tmp_path, rows, llama, format="text", eval_fraction=0).eval is None
    tiny = build(tmp_path, rows[:2], llama, format="text", eval_fraction=0.1)
    assert len(tiny.eval) == 1 and len(tiny.train) == 1


def test_eval_file_and_stats(tmp_path, llama):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b"}, {"text": "c"}])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": "d"}])
    b = build_datasets(DataSpec(train=str(train), eval=str(ev), format="text"), llama)
    assert (b.stats["rows_read"], b.stats["train_rows"], b.stats["eval_rows"]) == (3, 2, 1)
    assert b.stats["train_tokens"] == sum(len(r["input_ids"]) for r in b.train)
    assert b.stats["format"] == "text" and b.label_names is None
    only_train = build_datasets(DataSpec(train=str(train), format="text", eval_fraction=0), llama)
    assert only_train.stats["fingerprint"] == hashlib.sha256(train.read_bytes()).hexdigest()
    assert b.stats["fingerprint"] != only_train.stats["fingerprint"]
    json.dumps(b.stats)


# ---------------------------------------------------------------------------- classification


def cls(tmp_path, rows, eval_rows=None, num_labels=None, **spec):
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    ev = str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)) if eval_rows else None
    return build_datasets(DataSpec(train=str(train), eval=ev, format="classification", eval_fraction=0, **spec),
                          build_tokenizer("bert"), task="seq_cls", num_labels=num_labels)


def test_classification_string_labels(tmp_path):
    rows = [{"text": "I like this movie", "label": "positive"}, {"text": "terrible", "label": "negative"},
            {"text": "The weather is sunny today", "label": "neutral"}]
    b = cls(tmp_path, rows, eval_rows=[{"text": "great", "label": "positive"}])
    assert b.label_names == ["negative", "neutral", "positive"]
    assert b.train["labels"] == [2, 0, 1] and b.eval["labels"] == [2]
    batch = b.collator(list(b.train))
    assert batch["labels"].tolist() == [2, 0, 1] and str(batch["labels"].dtype) == "torch.int64"
    assert batch["labels"].shape == (3,)
    assert batch["input_ids"][:, 0].eq(build_tokenizer("bert").cls_token_id).all()  # special tokens kept
    with pytest.raises(DataError, match="'bored' does not occur in the train data") as e:
        cls(tmp_path, rows, eval_rows=[{"text": "meh", "label": "positive"}, {"text": "meh", "label": "bored"}])
    assert e.value.where.endswith("eval.jsonl:2")


def test_given_class_names_keep_a_trained_heads_ids(tmp_path):
    """evaluate --data: rows are mapped onto the adapter's saved classes, so a class missing from the file shifts
    no id; a class the head does not have is the file's mistake, at its line."""
    rows = [{"text": "meh", "label": "neutral"}, {"text": "great", "label": "positive"}, {"text": "x", "label": 0}]
    path = write_jsonl(tmp_path / "d.jsonl", rows[:2])
    spec = DataSpec(train=str(path), format="classification", eval_fraction=0)
    names = ["negative", "neutral", "positive"]
    b = build_datasets(spec, build_tokenizer("bert"), task="seq_cls", label_names=names)
    assert b.label_names == names and b.train["labels"] == [1, 2]
    write_jsonl(path, [rows[0], {"text": "meh", "label": "bored"}])
    with pytest.raises(DataError, match="'bored' is not one of the adapter's 3 classes") as e:
        build_datasets(spec, build_tokenizer("bert"), task="seq_cls", label_names=names)
    assert e.value.where == f"{path}:2"


def test_classification_int_labels_range_and_inference(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 2}]
    assert cls(tmp_path, rows).label_names == ["0", "1", "2"]
    with pytest.raises(DataError, match="out of range") as e:
        cls(tmp_path, rows, num_labels=2)
    assert e.value.where.endswith("train.jsonl:2")
    truncated = cls(tmp_path, [{"text": "one two three four five six seven eight nine ten " * 3, "label": 1}],
                    max_length=8)
    assert truncated.stats["truncated"] == 1 and len(truncated.train[0]["input_ids"]) == 8


def test_collator_for_seq_cls_pads_right(tmp_path):
    tok = build_tokenizer("bert")
    batch = make_collator(tok, "seq_cls")([{"input_ids": [6, 9, 7], "labels": 1}, {"input_ids": [6, 7], "labels": 0}])
    assert batch["input_ids"].tolist() == [[6, 9, 7], [6, 7, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_a_hub_dataset_stays_a_dataset_and_tokenizes_like_a_local_file(tmp_path, llama, monkeypatch):
    """A hub dataset is never copied into Python lists: datasets maps it (its cache, its num_proc); the
    tokens are the same as for the same rows in a local file, and a bad row is named by its index."""
    import datasets

    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("one", "two", "three", "four")]
    hub = datasets.Dataset.from_list(rows)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: hub)  # the hub, offline
    from_hub = build_datasets(DataSpec(train="alice/words", format="alpaca", eval_fraction=0), llama)
    local = build(tmp_path, rows, llama, format="alpaca", eval_fraction=0)
    assert from_hub.train["input_ids"] == local.train["input_ids"]
    assert from_hub.train["labels"] == local.train["labels"]
    assert from_hub.stats["fingerprint"] != local.stats["fingerprint"] and from_hub.stats["rows_read"] == 4

    calls = []
    real_map = datasets.Dataset.map

    def spy(self, *a, **k):
        calls.append(k.get("desc"))
        return real_map(self, *a, **k)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    bad = datasets.Dataset.from_list(rows[:2] + [{"instruction": "Say five.", "output": None}])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: bad)
    with pytest.raises(DataError, match="must be a string") as e:
        build_datasets(DataSpec(train="alice/words", format="alpaca", eval_fraction=0), llama)
    assert e.value.where == "alice/words[train] row 3" and calls[0] == "format"
