"""The Modelfile's TEMPLATE for every family template lorafit ships as a fixture (tests/data/chat_templates/): rendered
as Ollama renders it (Go's text/template with Ollama's values: SYSTEM first, .System, .Messages) it gives exactly the
tokenizer's own render of the conversation, system prompt or not, over several turns. Ollama is not on these
machines: render_go is checked on Go's own semantics first."""

from __future__ import annotations

import pytest

from lorafit.export.ollama import (family, go_template, modelfile_text, ollama_values, parse_modelfile, render_go,
                                   render_hf)
from tests.unit.test_chat_templates import FAMILIES, PRESENT, TEMPLATES, tokenizer_for

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, please."}],
]
SYSTEM = "You are a terse assistant."
EXPECTED_FAMILY = {"llama3": "llama3", "llama3.2": "llama3", "mistral-v0.3": "mistral", "mistral-nemo": "mistral",
                   "qwen2.5": "chatml", "smollm2": "chatml", "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi3",
                   "phi3.5": "phi3"}


def _tokenizer(name: str):
    if name == "llama3.2":  # Llama-3.2's own file, with Llama-3's special tokens
        from lorafit.tools.tiny import build_family_tokenizer

        _, specials, bos, eos, _, _ = FAMILIES["llama3"]
        return build_family_tokenizer(specials, bos=bos, eos=eos,
                                      chat_template=(TEMPLATES / "llama3.2.jinja").read_text())
    return tokenizer_for(name)


def test_go_semantics_the_templates_rely_on():
    data = {"System": "S", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    assert render_go("x  {{- .System -}}  y", data) == "xSy"  # {{- and -}} eat the spaces beside them
    assert render_go("{{ range $i, $m := .Messages }}{{ $i }}:{{ $m.Role }}={{ .Content }};{{ end }}", data) == \
        "0:user=a;1:assistant=b;"
    last = "{{ range $i, $_ := .Messages }}{{ if eq (len (slice $.Messages $i)) 1 }}last={{ .Content }}{{ end }}{{ end }}"
    assert render_go(last, data) == "last=b"
    branch = ('{{ range .Messages }}{{ if eq .Role "system" }}s{{ else if eq .Role "user" }}u{{ else }}o{{ end }}'
              "{{ end }}")
    assert render_go(branch, data) == "uo"
    assert render_go("{{ if and .System (eq 1 1) }}yes{{ end }}{{ if not .Missing }}none{{ end }}", data) == "yesnone"
    with pytest.raises(ValueError):
        render_go("{{ if .System }}unclosed", data)


def test_ollama_values_put_the_modelfile_system_first_and_merge_turns():
    values = ollama_values([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], system="S")
    assert values["System"] == "S"
    assert values["Messages"] == [{"Role": "system", "Content": "S"}, {"Role": "user", "Content": "a\n\nb"}]
    own = ollama_values([{"role": "system", "content": "mine"}, {"role": "user", "content": "a"}], system="S")
    assert own["System"] == "mine"  # a request's own system message wins over the Modelfile's


@pytest.mark.parametrize("name", PRESENT + ["llama3.2"])
def test_the_template_renders_every_conversation_as_the_tokenizer_does(name):
    tokenizer = _tokenizer(name)
    template, kind = go_template(tokenizer)
    assert kind == EXPECTED_FAMILY[name] and template is not None
    takes_system = FAMILIES.get(name, FAMILIES["llama3"])[5]
    for conversation in CONVERSATIONS:
        assert render_go(template, ollama_values(conversation)) == render_hf(tokenizer, conversation)
        if takes_system:  # SYSTEM in the Modelfile: Ollama adds it as the conversation's first message
            with_system = [{"role": "system", "content": SYSTEM}] + conversation
            assert render_go(template, ollama_values(conversation, system=SYSTEM)) == render_hf(tokenizer, with_system)


def test_the_modelfile_parses_back():
    template, _ = go_template(_tokenizer("llama3"))
    text = modelfile_text("dates-q8_0.gguf", template, ["<|eot_id|>", 'a "quoted" stop'], 'Say "hi".\nThen stop.')
    doc = parse_modelfile(text)
    assert doc["from"] == "./dates-q8_0.gguf" and doc["template"] == template
    assert doc["parameters"] == [("stop", "<|eot_id|>"), ("stop", 'a "quoted" stop')]
    assert doc["system"] == 'Say "hi".\nThen stop.'


@pytest.mark.parametrize("system", ['Say "hi"', 'Quote it: """like this""" and stop.', 'Two lines:\n"one"\n"two"',
                                    '"""', " padded "])
def test_a_system_prompt_with_quotes_round_trips_as_ollama_reads_it(system):
    """Ollama's Modelfile has no escapes: a value ends at the first line end where it stands closed. A system
    prompt ending with a quote, or holding triple quotes, is written in a form Ollama reads back whole."""
    template, _ = go_template(_tokenizer("llama3"))
    doc = parse_modelfile(modelfile_text("x.gguf", template, ["<|eot_id|>"], system))
    assert doc["system"] == system and doc["template"] == template and doc["parameters"] == [("stop", "<|eot_id|>")]


def test_a_system_prompt_no_modelfile_form_carries_is_left_out_and_said(tmp_path):
    """A line that ends with \"\"\" closes any quoted value there: such a prompt cannot be a SYSTEM line."""
    from lorafit.export.ollama import quote, write_modelfile

    system = 'Wrap code like this:\n"""\ncode\n"""'
    assert quote(system) is None
    with pytest.raises(ValueError, match="SYSTEM"):
        modelfile_text("x.gguf", None, [], system)
    report = write_modelfile(tmp_path, "x.gguf", _tokenizer("llama3"), None, system)
    doc = parse_modelfile((tmp_path / "Modelfile").read_text())
    assert "system" not in doc and report["system"] is None and "no SYSTEM line" in report["note"]


def test_the_parser_reads_as_ollamas_does():
    doc = parse_modelfile('# a comment\nFROM ./m.gguf\nPARAMETER num_ctx 4096\nPARAMETER stop <|end|>\n'
                          'MESSAGE user "Hi there"\nSYSTEM one line with spaces\n')
    assert doc == {"from": "./m.gguf", "parameters": [("num_ctx", "4096"), ("stop", "<|end|>")],
                   "messages": [("user", "Hi there")], "system": "one line with spaces"}
    for bad in ("SYSTEM x\n", "FROM x\nSYSTEM \"\"\"open\n", "FROM x\nNOPE y\n", "FROM x\nMESSAGE robot hi\n"):
        with pytest.raises(ValueError):
            parse_modelfile(bad)


def test_a_template_of_no_known_family_or_shape_gets_no_template_line():
    from lorafit.tools.tiny import build_family_tokenizer

    odd = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tokenizer = build_family_tokenizer([], bos=None, eos="</s>", chat_template=odd)
    assert family(odd) is None and go_template(tokenizer) == (None, None)
    # ChatML tokens in another layout: lorafit's ChatML template would not render as it does, so it is left out.
    chatml_like = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + ': ' + m['content'] + '<|im_end|>' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant: ' }}{% endif %}")
    tokenizer = build_family_tokenizer(["<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                                       chat_template=chatml_like)
    assert go_template(tokenizer) == (None, "chatml")
    assert "TEMPLATE" not in modelfile_text("x.gguf", None, ["<|im_end|>"], None)
