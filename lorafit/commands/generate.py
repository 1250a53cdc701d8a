"""`lorafit generate`: answers from base + adapter (or a plain model), the prompt rendered as training
rendered it (core.prompts) and the model loaded as training loaded it (core.models). Several adapters of
one base share it (peft load_adapter / set_adapter / disable_adapter); greedy unless asked to sample."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorafit.core import libs, models
from lorafit.core.adapters import (ADAPTER_NAME, AdapterSource, check_same_base, find_adapter, find_named, holds_adapter,
                                   parse_adapters, same_base)
from lorafit.core.generation import generate_greedy, is_chat, prompt_ids, prompt_tokens, render_prompt, stop_ids
from lorafit.core.models import load_for_inference
from lorafit.errors import LorafitError, ModelError


def complete(model, tokenizer, recipe, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer to one prompt (core.generation, shared with the evaluate stage's metrics)."""
    spec = recipe.data if recipe else None
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    return generate_greedy(model, tokenizer, [prompt_ids(prompt, tokenizer, spec, seq2seq=seq2seq)],
                           max_new_tokens=max_new_tokens, stop=stop_ids(tokenizer, spec))[0]


# ----------------------------------------------------------------------------------------------
# The command: one base, one or several adapters (switched with peft's set_adapter), greedy or sampled


@dataclass(frozen=True)
class Sampling:
    """Decoding: greedy at temperature 0 (the default), else sampled at *temperature* with nucleus *top_p*;
    *seed* makes a sampled answer repeatable (each answer is seeded afresh, so --compare's order is moot)."""

    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise LorafitError(f"{self.temperature:g} is negative", where="--temperature",
                               fix="use 0 for greedy decoding, or a positive value such as 0.7 to sample")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise LorafitError(f"{self.top_p:g} is outside (0, 1]", where="--top-p",
                               fix="use a fraction of probability mass such as 0.9")
        if self.top_p is not None and self.temperature == 0:
            raise LorafitError("greedy decoding (temperature 0) ignores top-p", where="--top-p",
                               fix="add --temperature 0.7 (or another positive value) to sample")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:  # greedy, whatever the model's generation_config suggests
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p or 1.0}

    def describe(self) -> dict:
        if self.temperature == 0:
            return {"mode": "greedy"}
        return {"mode": "sample", "temperature": self.temperature, "top_p": self.top_p or 1.0, "seed": self.seed}


def answer(model, tokenizer, recipe, prompt: str, max_new_tokens: int = 64, *, system: str | None = None,
           sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None) -> dict:
    """One answer to *prompt*, asked as training rendered its rows (with *system* first, for chat), ending at
    EOS or the end-of-turn token. *on_text* receives the text as it is generated (a streamer's pieces).
    Returns {text, new_tokens, stopped ('end' | 'max_new_tokens'), rendered_prompt, prompt_tokens}."""
    import torch
    from transformers import set_seed

    spec = recipe.data if recipe else None
    chat = is_chat(tokenizer, spec)
    if system and not chat:
        how = f"data.format {spec.format}" if spec else "a model without a chat template"
        raise LorafitError(f"this adapter was trained on {how}, which has no system prompt", where="--system",
                           fix="drop --system (put the instruction into --prompt), or use a chat-trained adapter")
    # core.generation's prompt_ids in two steps, the rendered text being part of the answer
    rendered = render_prompt(prompt, tokenizer, spec, system=system)
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))  # the prompt is the encoder's source
    ids = prompt_tokens(rendered, tokenizer, spec, seq2seq=seq2seq)
    stop = stop_ids(tokenizer, spec)
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  eos_token_id=stop or None, **sampling.generate_kwargs(),
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0])
    if sampling.seed is not None:
        set_seed(sampling.seed)
    out = _generate_streaming(model, tokenizer, kwargs, on_text) if on_text else model.generate(**kwargs)
    # An encoder-decoder returns the decoder's output alone, opened by its start token.
    new = out[0, 1:].tolist() if seq2seq else out[0, input_ids.shape[1]:].tolist()
    ended = bool(new) and new[-1] in stop
    return {"text": tokenizer.decode(new, skip_special_tokens=True).strip(), "new_tokens": len(new),
            "stopped": "end" if ended else "max_new_tokens", "rendered_prompt": rendered, "prompt_tokens": len(ids)}


def _generate_streaming(model, tokenizer, kwargs: dict, on_text: Callable[[str], None]):
    """model.generate in a thread, its text handed to *on_text* piece by piece (transformers'
    TextIteratorStreamer); leading whitespace is dropped, as the finished answer strips it."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict = {}

    def run() -> None:
        try:
            result["out"] = model.generate(**kwargs, streamer=streamer)
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = False
    for piece in streamer:
        piece = piece if started else piece.lstrip()
        if piece:
            started = True
            on_text(piece)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["out"]


@dataclass
class Served:
    """A base with adapters loaded side by side; each adapter's own tokenizer and recipe render its prompts."""

    model: object
    sources: dict[str, AdapterSource] = field(default_factory=dict)
    tokenizers: dict[str, object] = field(default_factory=dict)
    recipes: dict[str, object] = field(default_factory=dict)


def load_adapters(pairs: list[tuple[str, Path]], option: str = "--adapter") -> Served:
    """Load the base once with the first adapter, then every other one beside it (peft load_adapter)."""
    named = find_named(pairs, option)
    check_same_base(named, option)
    first_name, first = named[0]
    model, tokenizer = models.load_adapted(first, adapter_name=first_name)
    served = Served(model)
    for name, source in named:
        if name != first_name:
            models.load_beside(model, source, name, where=f"{option} {name}")
            tokenizer = models.load_adapter_tokenizer(source)
        served.sources[name], served.tokenizers[name] = source, tokenizer
        served.recipes[name] = source.run_recipe()
    model.set_adapter(first_name)
    return served


def generate(model_or_adapter: str | Path | None, prompt: str, *, adapters: list[str] | None = None,
             use: str | None = None, compare: bool = False, no_adapter: bool = False, system: str | None = None,
             sampling: Sampling = Sampling(), max_new_tokens: int = 64,
             on_text: Callable[[str], None] | None = None) -> dict:
    """`lorafit generate`: the answer of one adapter (or of the base, --no-adapter), or with *compare* of every
    adapter and the base, to one prompt. The base is asked in the text the (first) adapter was trained on,
    so what differs is the weights alone. Returns {prompt, system, sampling, max_new_tokens, answers:
    [{adapter, text, new_tokens, stopped, ...}], text (when one answer)}."""
    pairs = _check_options(model_or_adapter, adapters or [], use, compare, no_adapter)
    sampling.check()
    _check_generating(pairs or [], "--adapter" if adapters else "MODEL")
    if system and pairs:  # before any weight loads: an adapter whose training rows had no system prompt
        for name in list(dict(pairs)) if compare else [use or pairs[0][0]]:
            recipe = find_adapter(dict(pairs)[name]).run_recipe()
            if recipe is not None and recipe.data.format != "chat":
                raise LorafitError(f"adapter '{name}' was trained on data.format {recipe.data.format}, which has no "
                                   "system prompt", where="--system",
                                   fix="drop --system (put the instruction into --prompt), or use a chat-trained adapter")
    libs.quiet_libraries()
    if pairs is None:  # a plain model: no adapter to switch
        model, tokenizer, recipe = load_for_inference(model_or_adapter)
        asked = [(None, None, tokenizer, recipe)]
    else:
        served = load_adapters(pairs, "--adapter" if adapters else "MODEL")
        names = list(served.sources)
        chosen = names if compare else [] if no_adapter else [use or names[0]]
        ref = use or names[0]  # the base is asked as this adapter was trained
        asked = [(n, n, served.tokenizers[n], served.recipes[n]) for n in chosen]
        if compare or no_adapter:
            asked.append((None, ref, served.tokenizers[ref], served.recipes[ref]))
        model = served.model
    answers = []
    for name, rendered_as, tokenizer, recipe in asked:
        with _active(model, name):
            one = answer(model, tokenizer, recipe, prompt, max_new_tokens, system=system, sampling=sampling,
                         on_text=on_text if len(asked) == 1 else None)
        label = name if name is None or adapters else str(model_or_adapter)
        asked_as = (rendered_as if adapters else str(model_or_adapter)) if name is None else None
        answers.append({"adapter": label, "prompt_as": asked_as, **one})
    doc = {"prompt": prompt, "system": system, "sampling": sampling.describe(), "max_new_tokens": max_new_tokens,
           "answers": answers}
    if len(answers) == 1:
        doc["text"] = answers[0]["text"]
    return doc


def _check_options(model_or_adapter, adapters: list[str], use, compare, no_adapter) -> list[tuple[str, Path]] | None:
    """The adapters to load ([(name, dir)]), None for a plain model; every option clash refused first."""
    if model_or_adapter is not None and adapters:
        raise LorafitError("give either MODEL or --adapter options, not both", where="--adapter",
                           fix="name the first adapter too: --adapter one=DIR --adapter two=DIR2")
    if model_or_adapter is None and not adapters:
        raise LorafitError("nothing to generate with", where="MODEL",
                           fix="pass an adapter dir, a run dir or a model, or --adapter NAME=DIR (repeatable)")
    if compare and (use or no_adapter):
        raise LorafitError("--compare answers with every adapter and the base", where="--use" if use else "--no-adapter",
                           fix="drop --use / --no-adapter, or drop --compare")
    if use and no_adapter:
        raise LorafitError("--use picks an adapter, --no-adapter none", where="--use", fix="keep one of them")
    pairs = parse_adapters(adapters)
    if use is not None and use not in dict(pairs):
        shown = ", ".join(dict(pairs)) or "none (--use picks one of several --adapter NAME=DIR)"
        raise LorafitError(f"no adapter is named '{use}'; the names given: {shown}", where="--use",
                           fix="use one of the --adapter names")
    if pairs:
        return pairs
    if holds_adapter(model_or_adapter):
        return [("adapter", Path(model_or_adapter))]
    if compare:
        raise LorafitError(f"{model_or_adapter} is a plain model: there is no adapter to compare with it",
                           where="--compare", fix="pass an adapter or run dir, or several --adapter NAME=DIR")
    return None  # --no-adapter on a plain model: it is the base already


def _check_generating(pairs: list[tuple[str, Path]], option: str) -> None:
    """Before any weight loads: a classifier adapter (seq_cls, token_cls) has a head, not a language model's
    output, so there is nothing to generate; `lorafit predict` runs it."""
    for name, directory in pairs:
        try:
            task = find_adapter(directory).task
        except ModelError:
            continue  # load_adapters reports a wrong path, naming the option
        if not task.generates:
            where = f"--adapter {name}={directory}" if option == "--adapter" else option
            raise LorafitError(f"{directory} is a {task.name} adapter: it classifies, it does not generate text",
                               where=where, fix=f"run `lorafit predict {directory} --data FILE.jsonl --output OUT.jsonl`")


@contextlib.contextmanager
def _active(model, name: str | None):
    """Adapter *name* switched on (peft set_adapter), or with None every adapter off (the base)."""
    if not hasattr(model, "disable_adapter"):  # a plain model
        yield
    elif name is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


# Former names of the NAME=DIR helpers (now core.adapters), for lorafit.serving until it imports them there.
_NAME, _same_base = ADAPTER_NAME, same_base
