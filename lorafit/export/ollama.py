'''`lorafit export --to ollama`: a Modelfile beside the GGUF, so that Ollama asks the model as training did.

  FROM ./NAME-QUANT.gguf
  TEMPLATE """..."""          the chat template in Ollama's Go syntax, for the families lorafit knows (ChatML:
                              Qwen / SmolLM / any <|im_start|>; Llama-3; Mistral; Gemma; Phi-3); otherwise no
                              TEMPLATE line, and Ollama uses the template embedded in the GGUF
  PARAMETER stop "..."        one per token that ends a turn (EOS and end-of-turn)
  SYSTEM """..."""            when every training conversation opened with one system prompt

Ollama's Modelfile has no escapes: a value ends at the first line end where it stands closed ("""...""" or
"..."). Each value is written in the form Ollama reads back whole (parse_modelfile is its parser, line for line);
a value no form carries (a line inside it that ends with """) is left out, and the report says so.

A family's template is filled in from the tokenizer's own (its default system prompt, Llama-3's date header,
Mistral's spacing) and then checked: rendered here (render_go, the subset of Go's text/template these
templates use, with Ollama's values: .System = the system messages, .Messages = the conversation) for probe
conversations, it must give exactly the text the tokenizer's template gives (less a leading BOS, which
llama.cpp adds). A template that does not is left out, and the report says so.
'''

from __future__ import annotations

import re
from pathlib import Path

from lorafit import log

# Probe contents: no surrounding whitespace (templates trim), nothing a template treats specially.
_PROBES = [
    [{"role": "user", "content": "U1"}],
    [{"role": "system", "content": "S0"}, {"role": "user", "content": "U1"}],
    [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}],
    [{"role": "system", "content": "S0"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
     {"role": "user", "content": "U2"}],
]


def family(template: str | None) -> str | None:
    """The chat-template family lorafit writes Ollama templates for, by the special tokens the template uses."""
    if not isinstance(template, str):
        return None
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "mistral"
    if "<start_of_turn>" in template:
        return "gemma"
    if "<|user|>" in template and "<|end|>" in template:
        return "phi3"
    return None


def go_template(tokenizer) -> tuple[str | None, str | None]:
    """(the tokenizer's chat template in Ollama's Go syntax, its family), or (None, family or None) when lorafit
    has no template for the family or the one it fills in does not render as the tokenizer's does."""
    kind = family(getattr(tokenizer, "chat_template", None))
    if kind is None:
        return None, None
    try:
        text = _BUILDERS[kind](lambda messages: render_hf(tokenizer, messages))
    except (ValueError, IndexError):
        return None, kind
    return (text if round_trips(text, tokenizer) else None), kind


def render_hf(tokenizer, messages: list[dict]) -> str:
    """The tokenizer's own render of a conversation with the generation prompt, less the BOS its template writes
    (`bos_token`): llama.cpp adds that one itself."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    writes_bos = "bos_token" in (tokenizer.chat_template or "")
    return text[len(bos):] if writes_bos and bos and text.startswith(bos) else text


def round_trips(template: str, tokenizer, conversations: list[list[dict]] = _PROBES) -> bool:
    """*template* renders each conversation the template accepts exactly as the tokenizer's template does."""
    checked = 0
    for messages in conversations:
        try:
            want = render_hf(tokenizer, messages)
        except Exception:  # a template that refuses the conversation (gemma-2 takes no system role)
            continue
        if render_go(template, ollama_values(messages)) != want:
            return False
        checked += 1
    return checked > 0


def ollama_values(messages: list[dict], system: str | None = None) -> dict:
    """What Ollama hands a chat template: the Modelfile's SYSTEM first when the conversation has no system
    message (server/routes.go), consecutive messages of one role merged, .System = every system message
    (template.go: collate)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}] + list(messages)
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"),
            "Messages": collated}


# ----------------------------------------------------------------------------------------------
# The families: each builder renders probes with the tokenizer's template (*hf*) to fill in its parameters


def _between(text: str, before: str, after: str) -> str:
    start = text.index(before) + len(before)
    return text[start:text.index(after, start)]


def _chatml(hf) -> str:
    plain = hf([{"role": "user", "content": "U1"}])
    default = ""
    if plain.startswith("<|im_start|>system\n"):
        default = (f"{{{{ if not .System }}}}<|im_start|>system\n"
                   f"{_between(plain, '<|im_start|>system' + chr(10), '<|im_end|>')}<|im_end|>\n{{{{ end }}}}")
    return (default + "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
            "<|im_start|>assistant\n")


def _llama3(hf) -> str:
    prefix = _between(hf([{"role": "system", "content": "S0"}, {"role": "user", "content": "U1"}]),
                      "system<|end_header_id|>\n\n", "S0")
    return ("<|start_header_id|>system<|end_header_id|>\n\n" + prefix + "{{ .System }}<|eot_id|>"
            "{{ range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def _mistral(hf) -> str:
    text = hf([{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
               {"role": "user", "content": "U2"}])
    opening = text[:text.index("U1")]           # "[INST] " (v0.3) or "[INST]" (Nemo)
    answer = _between(text, "[/INST]", "A1")    # " " or ""
    eos = _between(text, "A1", opening)         # "</s>"
    return ("{{ range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}" + opening
            + "{{ if and $.System (eq (len (slice $.Messages $i)) 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}[/INST]"
            "{{ else if eq .Role \"assistant\" }}" + answer + "{{ .Content }}" + eos + "{{ end }}{{ end }}")


def _gemma(hf) -> str:
    hf([{"role": "user", "content": "U1"}])  # a template this family's shape does not fit fails the round trip
    return ("{{ range $i, $_ := .Messages }}{{ if eq .Role \"user\" }}<start_of_turn>user\n"
            "{{ if and $.System (eq $i 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
            "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}"
            "<start_of_turn>model\n")


def _phi3(hf) -> str:
    hf([{"role": "user", "content": "U1"}])
    return ("{{ range .Messages }}{{ if eq .Role \"system\" }}<|system|>\n{{ .Content }}<|end|>\n"
            "{{ else if eq .Role \"user\" }}<|user|>\n{{ .Content }}<|end|>\n"
            "{{ else if eq .Role \"assistant\" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}<|assistant|>\n")


_BUILDERS = {"chatml": _chatml, "llama3": _llama3, "mistral": _mistral, "gemma": _gemma, "phi3": _phi3}


# ----------------------------------------------------------------------------------------------
# The Modelfile


def modelfile_text(gguf_name: str, template: str | None, stops: list[str], system: str | None) -> str:
    """The Modelfile; ValueError naming the instruction whose value Ollama could not read back whole (quote)."""
    lines = [f"FROM ./{gguf_name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quoted('TEMPLATE', template)}")
    lines += [f"PARAMETER stop {_quoted('PARAMETER stop', s, triple=False)}" for s in stops]
    if system:
        lines.append(f"SYSTEM {_quoted('SYSTEM', system)}")
    return "\n".join(lines) + "\n"


def quote(value: str, *, triple: bool = True) -> str | None:
    """*value* as a Modelfile value Ollama reads back exactly: \"\"\"...\"\"\"  (first with *triple*) or "...";
    None when neither form carries it."""
    forms = [f'"""{value}"""', f'"{value}"']
    for form in forms if triple else forms[::-1]:
        try:
            if parse_modelfile(f"FROM x\nSYSTEM {form}\n").get("system") == value:
                return form
        except ValueError:
            pass
    return None


def _quoted(instruction: str, value: str, *, triple: bool = True) -> str:
    form = quote(value, triple=triple)
    if form is None:
        raise ValueError(f"{instruction}: Ollama's Modelfile cannot carry this value (a line of it ends with \"\"\")")
    return form


def write_modelfile(out: Path, gguf_name: str, tokenizer, recipe, system: str | None) -> dict:
    """Write OUT/Modelfile; returns {family, template (bool), stops, system, note}."""
    from lorafit.core.generation import stop_ids

    template, kind = go_template(tokenizer)
    stops = tokenizer.convert_ids_to_tokens(stop_ids(tokenizer, recipe.data if recipe is not None else None))
    note = None
    if kind is not None and template is None:
        note = (f"the adapter's chat template looks like {kind} but lorafit's {kind} template does not render as it "
                "does: no TEMPLATE line, Ollama uses the template embedded in the GGUF")
    elif kind is None and getattr(tokenizer, "chat_template", None):
        note = "a chat template of no family lorafit knows: no TEMPLATE line, Ollama uses the one embedded in the GGUF"
    if note:
        log.warn(f"export: {note}")
    if system and quote(system) is None:
        note = (note + "; " if note else "") + ("no SYSTEM line: a line of the system prompt ends with \"\"\", which "
                                                "Ollama's Modelfile cannot quote; give it with each request")
        log.warn(f"export: {note}")
        system = None
    if template and system and not round_trips(template, tokenizer, [[{"role": "system", "content": system},
                                                                      {"role": "user", "content": "U1"}]]):
        note = (note + "; " if note else "") + "the system prompt does not render as in training"
    (out / "Modelfile").write_text(modelfile_text(gguf_name, template, stops, system), encoding="utf-8")
    return {"family": kind, "template": template is not None, "stops": stops, "system": system, "note": note}


def parse_modelfile(text: str) -> dict:
    """A Modelfile read as Ollama's parser reads it (parser/parser.go: ParseFile, its states, unquote; no
    escapes): {from, template, system, ..., parameters: [(name, value)], messages: [(role, value)]}. ValueError
    where Ollama's parser fails."""
    doc: dict = {"parameters": [], "messages": []}
    state, buf, name, param, role = "nil", "", "", "", ""

    def finish(value: str) -> None:
        if name == "parameter":
            doc["parameters"].append((param, value))
        elif name == "message":
            doc["messages"].append((role, value))
        else:
            doc["from" if name == "from" else name] = value

    for ch in text:
        nxt, keep = _next_state(state, ch)
        if nxt != state:
            if state == "name":
                if buf.lower() not in _COMMANDS:
                    raise ValueError(f"unknown Modelfile instruction {buf!r}")
                name = buf.lower()
                nxt = {"parameter": "parameter", "message": "message"}.get(name, nxt)
            elif state == "parameter":
                param = buf
            elif state == "message":
                if buf not in ("system", "user", "assistant"):
                    raise ValueError(f"unknown MESSAGE role {buf!r}")
                role = buf
            elif state == "value":
                value = _unquote(buf.strip())
                if value is None or ch in " \t":  # still open, or a space: the value goes on
                    buf += ch
                    continue
                finish(value)
            buf, state = "", nxt
        if keep and ch.isprintable():
            buf += ch
    if state == "value":
        value = _unquote(buf.strip())
        if value is None:
            raise ValueError(f"the Modelfile ends inside a quoted value: {buf[:40]!r}")
        finish(value)
    elif state not in ("nil", "comment"):
        raise ValueError("the Modelfile ends inside an instruction")
    if "from" not in doc:
        raise ValueError("no FROM line")
    return doc


_COMMANDS = ("from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
             "message", "requires")


def _next_state(state: str, ch: str) -> tuple[str, bool]:
    """(the state after *ch*, whether *ch* is kept): Ollama's parseRuneForState."""
    space, newline = ch in " \t", ch in "\r\n"
    if state == "nil":
        return ("comment", False) if ch == "#" else ("nil", False) if space or newline else ("name", True)
    if state == "name":
        if ch.isascii() and ch.isalpha():
            return "name", True
        if space:
            return "value", False
        raise ValueError(f"a Modelfile instruction cannot hold {ch!r}")
    if state == "value":
        return ("nil", True) if space or newline else ("value", True)
    if state in ("parameter", "message"):
        if ch.isascii() and (ch.isalpha() or (state == "parameter" and (ch.isdigit() or ch == "_"))):
            return state, True
        if space:
            return "value", False
        raise ValueError(f"a Modelfile {state} name cannot hold {ch!r}")
    return ("nil", False) if newline else ("comment", False)


def _unquote(text: str) -> str | None:
    """Ollama's unquote: the value inside \"\"\"...\"\"\" or "...", the text itself unquoted; None while a quote is open."""
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


# ----------------------------------------------------------------------------------------------
# Go's text/template, the subset the templates above (and Ollama's own) use: text; {{ }} with {{- -}} trimming;
# if / else if / else / end; range (with $i, $x :=); fields (.X, $.X, $v.X); "strings"; integers; ( ); and the
# functions eq, ne, and, or, not, len, slice, index. Missing keys are empty (Ollama's missingkey=zero).


_ACTION = re.compile(r"{{(-\s)?(.*?)(\s-)?}}", re.S)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|:=|,|[$.\w]+(?:\.\w+)*|-?\d+)')


def render_go(template: str, data: dict) -> str:
    nodes, end = _parse(_lex(template), 0, ())
    out: list[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def _lex(template: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        if parts and parts[-1][0] == "trim":
            parts.pop()
            text = text.lstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        if m.group(3):
            parts.append(("trim", ""))
        pos = m.end()
    text = template[pos:]
    if parts and parts[-1][0] == "trim":
        parts.pop()
        text = text.lstrip()
    parts.append(("text", text))
    return parts


def _parse(parts, i: int, stop: tuple[str, ...]):
    nodes = []
    while i < len(parts):
        kind, body = parts[i]
        if kind == "text":
            nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in stop or (word == "else" and "else" in stop):
            return nodes, i
        if word == "if":
            branches, i = [], i
            cond = body[2:].strip()
            while True:
                block, i = _parse(parts, i + 1, ("end", "else"))
                branches.append((cond, block))
                here = parts[i][1]
                if here == "end":
                    nodes.append(("if", branches, []))
                    break
                if here.startswith("else if"):
                    cond = here[len("else if"):].strip()
                    continue
                otherwise, i = _parse(parts, i + 1, ("end",))
                nodes.append(("if", branches, otherwise))
                break
            i += 1
        elif word == "range":
            spec = body[len("range"):].strip()
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=", 1)
                names = [n.strip() for n in left.split(",")]
            block, i = _parse(parts, i + 1, ("end", "else"))
            otherwise = []
            if parts[i][1] == "else":
                otherwise, i = _parse(parts, i + 1, ("end",))
            nodes.append(("range", names, spec.strip(), block, otherwise))
            i += 1
        else:
            nodes.append(("print", body))
            i += 1
    if stop:
        raise ValueError(f"template ends inside a block (expected {' or '.join(stop)})")
    return nodes, i


def _run(nodes, dot, scope: dict, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "print":
            value = _eval(node[1], dot, scope)
            out.append("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
        elif node[0] == "if":
            for cond, block in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    _run(block, dot, scope, out)
                    break
            else:
                _run(node[2], dot, scope, out)
        else:
            _, names, spec, block, otherwise = node
            items = _eval(spec, dot, scope) or []
            if not items:
                _run(otherwise, dot, scope, out)
            for k, item in enumerate(items):
                inner = dict(scope)
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = k, item
                elif names:
                    inner[names[0]] = item
                _run(block, item, inner, out)


def _truth(value) -> bool:
    return bool(value) if value is not None else False


def _eval(expr: str, dot, scope: dict):
    tokens = [t for t in _TOKEN.findall(expr)]
    if "".join(tokens).replace(" ", "") != re.sub(r"\s+", "", expr):
        raise ValueError(f"cannot read {{{{ {expr} }}}}")
    value, rest = _command(tokens, dot, scope)
    if rest:
        raise ValueError(f"cannot read {{{{ {expr} }}}}")
    return value


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]), "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "len": lambda a: len(a), "index": lambda a, *k: _index(a, k), "slice": lambda a, i=0, j=None: a[i:j],
}


def _index(value, keys):
    for k in keys:
        value = value[k]
    return value


def _command(tokens: list[str], dot, scope: dict):
    """Evaluate tokens up to a closing parenthesis: a function call with its arguments, or one operand."""
    if tokens and tokens[0] in _FUNCS:
        name, tokens, args = tokens[0], tokens[1:], []
        while tokens and tokens[0] != ")":
            value, tokens = _operand(tokens, dot, scope)
            args.append(value)
        return _FUNCS[name](*args), tokens
    return _operand(tokens, dot, scope)


def _operand(tokens: list[str], dot, scope: dict):
    head, rest = tokens[0], tokens[1:]
    if head == "(":
        value, rest = _command(rest, dot, scope)
        return value, rest[1:]
    if head.startswith('"'):
        return bytes(head[1:-1], "utf-8").decode("unicode_escape"), rest
    if re.fullmatch(r"-?\d+", head):
        return int(head), rest
    if head.startswith("$"):
        name, _, path = head.partition(".")
        return _field(scope[name], path), rest
    if head.startswith("."):
        return _field(dot, head[1:]), rest
    raise ValueError(f"unknown word {head!r}")


def _field(value, path: str):
    for name in filter(None, path.split(".")):
        value = value.get(name) if isinstance(value, dict) else getattr(value, name, None)
    return value
