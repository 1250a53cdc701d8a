"""Chat data on the families' own templates (tests/data/chat_templates/, sources in SOURCES.md), applied
to a tiny tokenizer that has each family's special tokens: the ids trained on are exactly the template's
render of the whole conversation, and the labels are each assistant reply and its end-of-turn token."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafit.core.prompts import IGNORE, chat_renderer, chat_tokens, end_of_turn_ids, inference_prompt
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.tools.tiny import build_family_tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"

# family → (template file, special tokens, bos, eos, end-of-turn token, takes a system message)
FAMILIES = {
    "llama3": ("llama3.jinja", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", True),
    "mistral-v0.3": ("mistral-v0.3.jinja", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                            "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                     "<s>", "</s>", "</s>", True),
    "mistral-nemo": ("mistral-nemo.jinja", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                                            "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                     "<s>", "</s>", "</s>", True),
    "qwen2.5": ("qwen2.5.jinja", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>",
                "<|im_end|>", True),
    "gemma2": ("gemma2.jinja", ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", False),
    "gemma3": ("gemma3.jinja", ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>", True),
    "phi3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
             "<s>", "<|endoftext|>", "<|end|>", True),
    "phi3.5": ("phi3.5.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
               "<s>", "<|endoftext|>", "<|end|>", True),
    "smollm2": ("smollm2.jinja", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"], "<|im_start|>", "<|im_end|>",
                "<|im_end|>", True),
}
PRESENT = [f for f, spec in FAMILIES.items() if (TEMPLATES / spec[0]).is_file()]
REPLIES = ["Paris is the capital.", "It has about two million people."]


def tokenizer_for(family: str):
    file, specials, bos, eos, _, _ = FAMILIES[family]
    return build_family_tokenizer(specials, bos=bos, eos=eos, chat_template=(TEMPLATES / file).read_text())


def conversation(system: bool) -> list[dict]:
    head = [{"role": "system", "content": "You answer briefly."}] if system else []
    return head + [{"role": "user", "content": "What is the capital of France?"},
                   {"role": "assistant", "content": REPLIES[0]},
                   {"role": "user", "content": "How many people live there?"},
                   {"role": "assistant", "content": REPLIES[1]}]


def test_the_required_families_have_their_real_templates():
    required = {"llama3", "mistral-v0.3", "mistral-nemo", "qwen2.5", "gemma2", "gemma3", "phi3", "smollm2"}
    assert required <= set(PRESENT), f"missing fixtures: {sorted(required - set(PRESENT))}"
    assert (TEMPLATES / "SOURCES.md").is_file()


def _labelled_runs(ids, labels, tokenizer) -> list[str]:
    runs, current = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            current.append(t)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("family", PRESENT)
def test_ids_are_the_full_render_and_labels_are_the_replies(family):
    tok = tokenizer_for(family)
    _, _, _, _, eot, system = FAMILIES[family]
    messages = conversation(system)
    spec = DataSpec(train="-", format="chat")
    ids, labels = chat_tokens(messages, tok, chat_renderer(spec, tok), "row 1")
    assert ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    runs = [r.strip() for r in _labelled_runs(ids, labels, tok)]
    assert runs == [f"{reply}{eot}" for reply in REPLIES], runs
    # Inference asks in the text training saw: the generation prompt after the conversation so far.
    first = messages[: 2 if system else 1]
    prompt = inference_prompt(first[-1]["content"], tok, spec, system=first[0]["content"] if system else None)
    assert prompt == tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
    assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(eot)]


@pytest.mark.parametrize("family", [f for f in PRESENT if not FAMILIES[f][5]])
def test_a_template_without_a_system_role_names_the_row_and_the_fix(family):
    tok = tokenizer_for(family)
    spec = DataSpec(train="-", format="chat")
    with pytest.raises(DataError) as e:
        chat_tokens(conversation(True), tok, chat_renderer(spec, tok), "train.jsonl:7")
    assert e.value.where == "train.jsonl:7" and "fold the system message" in e.value.fix
    assert "chatml" not in e.value.fix


@pytest.mark.parametrize("family", [f for f in PRESENT if "<|im_start|>" not in FAMILIES[f][1]])
def test_a_fix_never_suggests_tokens_the_tokenizer_lacks(family):
    tok = tokenizer_for(family)
    tok.chat_template = "{% for m in messages %}{{ m['content']|upper }}{% endfor %}"
    with pytest.raises(DataError) as e:
        chat_tokens(conversation(False), tok, chat_renderer(DataSpec(train="-", format="chat"), tok), "x.jsonl:1")
    assert "chatml" not in e.value.fix and "data.format: completion" in e.value.fix


def test_generation_markers_use_transformers_assistant_mask():
    """Templates with {% generation %} blocks (e.g. SmolLM3's, TRL's) mark the assistant tokens themselves."""
    tok = tokenizer_for("qwen2.5")
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    messages = conversation(True)
    ids, labels = chat_tokens(messages, tok, chat_renderer(DataSpec(train="-", format="chat"), tok), "row 1")
    assert ids == list(tok.apply_chat_template(messages, tokenize=True)["input_ids"])
    assert [r.strip() for r in _labelled_runs(ids, labels, tok)] == [f"{r}<|im_end|>" for r in REPLIES]
