"""What each endpoint asks of the engine, in OpenAI's terms: a chat is rendered with the adapter's own saved
template (as `lorafit generate` renders it), a text completion tokenized as the adapter's training tokenized
its rows, both checked against the context, decoded by the engine and answered whole or streamed; classify
runs `lorafit predict`'s own classifier and tagger (stages.predict). No HTTP here: app.py routes to these.

Every method fills *note* (model, tokens in / out) for the request's log line.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import AsyncIterator

from lorafit.core.generation import is_chat, prompt_tokens, stop_ids
from lorafit.errors import LorafitError
from lorafit.serving import protocol as p
from lorafit.serving.decoding import Finished, Generation, SamplingParams
from lorafit.serving.engine import Engine
from lorafit.serving.protocol import APIError, NotFound
from lorafit.serving.registry import Registry, Served, check_name, runtime_adapter

DEFAULT_MAX_TOKENS = 256   # when a request names none (and the context leaves that much room)
UNBOUNDED_CAP = 4096       # max_tokens for a model whose context is unknown


class Handlers:
    def __init__(self, engine: Engine, registry: Registry, *, adapter_root: Path | None = None):
        self.engine, self.registry, self.adapter_root = engine, registry, adapter_root

    # -- models -------------------------------------------------------------------------------------

    def models(self) -> p.ModelList:
        reg = self.registry
        # root is the served name (vLLM's field; a path on this server's disk is nobody else's business)
        cards = [p.ModelCard(id=reg.base_id, created=reg.base.created, root=reg.base_id, max_model_len=reg.context,
                             task=reg.base.task.name, loaded=True)]
        cards += [p.ModelCard(id=s.name, created=s.created, root=s.name, parent=reg.base_id,
                              max_model_len=reg.context, task=s.task.name, loaded=reg.is_loaded(s))
                  for s in list(reg.adapters.values())]
        return p.ModelList(data=cards)

    def health(self) -> dict:
        """status "ok" while the engine's thread runs (app.py answers 503 otherwise)."""
        loaded = [s.name for s in list(self.registry.loaded.values()) if s.name in self.registry.adapters]
        alive = self.engine.alive
        return {"status": "ok" if alive else "engine stopped", "engine_alive": alive, "loaded": loaded,
                **self.engine.stats}

    # -- generation ---------------------------------------------------------------------------------

    async def chat(self, req: p.ChatCompletionRequest, note: dict):
        served = self._generator(req.model, note)
        text = render_chat(served, req.messages)
        ids = _tokens(served, text)
        gen = self._generation(served, ids, req, strip=True, param="messages")
        events = await self._start(gen, note)
        if req.stream:
            return self._chat_chunks(req, events, note)
        done = await _finish(events)
        note["out"], note["batch"] = done.completion_tokens, done.batch
        return p.ChatCompletion(model=req.model, usage=_usage(done), choices=[
            p.ChatChoice(message=p.ChatMessageOut(content=done.text), finish_reason=done.finish_reason)])

    async def completion(self, req: p.CompletionRequest, note: dict):
        served = self._generator(req.model, note)
        if isinstance(req.prompt, str):
            ids = _tokens(served, req.prompt)
        else:
            vocab = len(served.tokenizer)
            if any(not 0 <= t < vocab for t in req.prompt):
                raise APIError(f"token ids must lie in [0, {vocab})", param="prompt")
            ids = list(req.prompt)
        gen = self._generation(served, ids, req, strip=False, param="prompt")
        events = await self._start(gen, note)
        if req.stream:
            return self._completion_chunks(req, events, note)
        done = await _finish(events)
        note["out"], note["batch"] = done.completion_tokens, done.batch
        return p.Completion(model=req.model, usage=_usage(done),
                            choices=[p.CompletionChoice(text=done.text, finish_reason=done.finish_reason)])

    def _generator(self, name: str, note: dict) -> Served:
        note["model"] = name
        served = self.registry.get(name)
        note["model"] = served.name
        if not served.task.causal:
            raise APIError(f"'{name}' is a {served.task.name} model: it classifies, ask POST /v1/classify",
                           param="model")
        return served

    def _generation(self, served: Served, ids: list[int], req: p._Sampling, *, strip: bool, param: str) -> Generation:
        max_tokens = self._room(len(ids), req.limit, param)
        temperature = req.temperature or 0.0
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                top_p=req.top_p if req.top_p is not None and temperature > 0 else 1.0,
                                seed=req.seed, stop=tuple(req.stop or ()))
        return Generation(served, ids, stop_ids(served.tokenizer, served.data), params, sink=None, strip=strip)

    def _room(self, prompt: int, asked: int | None, param: str) -> int:
        """max_tokens within the context: prompt + max_tokens ≤ context (400 naming the limit otherwise)."""
        context = self.registry.context
        if context is None:
            if asked is not None and asked > UNBOUNDED_CAP:
                raise APIError(f"max_tokens {asked} is above this server's limit of {UNBOUNDED_CAP}", param="max_tokens")
            return asked or DEFAULT_MAX_TOKENS
        room = context - prompt
        if room < 1:
            raise APIError(f"the prompt is {prompt} tokens; this model's context is {context} tokens, which leaves "
                           "no room for an answer: shorten the prompt", param=param, code="context_length_exceeded")
        if asked is None:
            return min(DEFAULT_MAX_TOKENS, room)
        if asked > room:
            raise APIError(f"max_tokens {asked} is more than the {room} tokens left: this model's context is {context} "
                           f"tokens and the prompt takes {prompt}", param="max_tokens", code="context_length_exceeded")
        return asked

    async def _start(self, gen: Generation, note: dict) -> AsyncIterator[tuple]:
        """Submit *gen*; wait for its first event, so that a failure before any text is an error status."""
        note["in"] = len(gen.prompt)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(event: tuple) -> None:  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone (server stopped): nobody is listening
                gen.cancelled = True

        gen.sink = sink
        self.engine.submit(gen)
        try:
            first = await events.get()
        except asyncio.CancelledError:
            gen.cancelled = True
            raise
        if first[0] == "error":
            raise first[1]

        async def rest():
            try:
                event = first
                while True:
                    yield event
                    if event[0] != "text":
                        return
                    event = await events.get()
            finally:
                gen.cancelled = True  # a client that left stops its row; after the end this changes nothing

        return rest()

    async def _chat_chunks(self, req: p.ChatCompletionRequest, events, note: dict):
        head = {"id": p.new_id("chatcmpl"), "created": int(time.time()), "model": req.model}

        def chunk(delta: p.Delta, reason=None, usage=None, choices=True) -> str:
            choice = [p.ChatChunkChoice(delta=delta, finish_reason=reason)] if choices else []
            return p.ChatCompletionChunk(**head, choices=choice, usage=usage).model_dump_json(exclude_none=True)

        yield chunk(p.Delta(role="assistant", content=""))
        async for kind, value in events:
            if kind == "text":
                yield chunk(p.Delta(content=value))
            elif kind == "done":
                note["out"], note["batch"] = value.completion_tokens, value.batch
                yield chunk(p.Delta(), value.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield chunk(p.Delta(), usage=_usage(value), choices=False)
            else:
                yield value.body_json()
        yield "[DONE]"

    async def _completion_chunks(self, req: p.CompletionRequest, events, note: dict):
        head = {"id": p.new_id("cmpl"), "created": int(time.time()), "model": req.model}
        async for kind, value in events:
            if kind == "text":
                yield p.Completion(**head, choices=[p.CompletionChoice(text=value)]).model_dump_json(exclude_none=True)
            elif kind == "done":
                note["out"], note["batch"] = value.completion_tokens, value.batch
                usage = _usage(value) if req.stream_options and req.stream_options.include_usage else None
                yield p.Completion(**head, choices=[p.CompletionChoice(text="", finish_reason=value.finish_reason)],
                                   usage=usage).model_dump_json(exclude_none=True)
            else:
                yield value.body_json()
        yield "[DONE]"

    # -- classification -----------------------------------------------------------------------------

    async def classify(self, req: p.ClassifyRequest, note: dict) -> p.ClassifyResponse:
        from lorafit.recipe import DataSpec
        from lorafit.stages.predict import classify_texts, tag_words

        note["model"] = req.model
        served = self.registry.get(req.model)
        note["model"] = served.name
        if not served.task.labelled:
            raise APIError(f"'{req.model}' generates text: ask POST /v1/chat/completions or /v1/completions",
                           param="model")
        if served.is_base:
            names = ", ".join(self.registry.adapters) or "none"
            raise APIError(f"the base model's classification head is untrained: name an adapter ({names})",
                           param="model")
        tagging = served.task.per_word
        if tagging:
            items = [x.split() if isinstance(x, str) else list(x) for x in req.input]
        elif all(isinstance(x, str) for x in req.input):
            items = list(req.input)
        else:
            raise APIError("a sequence classifier takes texts: a string or a list of strings", param="input")
        max_length = (served.data or DataSpec(train="-")).max_length
        tokenizer = served.tokenizer

        def run(model):
            run = tag_words if tagging else classify_texts
            out = run(model, tokenizer, items, max_length, 8)
            counted = tokenizer(items, is_split_into_words=tagging, truncation=True, max_length=max_length)
            return out, sum(len(ids) for ids in counted["input_ids"])

        predictions, tokens = await asyncio.wrap_future(self.engine.call_with(served, run))
        note["in"] = tokens
        return p.ClassifyResponse(model=req.model, usage=p.Usage(prompt_tokens=tokens),
                                  data=[p.Classification(index=i, **row) for i, row in enumerate(predictions)])

    # -- adapters at run time -----------------------------------------------------------------------

    async def load_adapter(self, req: p.LoadAdapterRequest, note: dict) -> dict:
        root = self._runtime(note)
        note["model"] = req.lora_name
        # Its files are read (tokenizer, recipe, every path checked) off the event loop.
        served = await asyncio.to_thread(runtime_adapter, self.registry, req.lora_name, req.lora_path, root)

        def add():  # the names change on the engine's thread only: two loads of one name, one wins
            check_name(self.registry, served.name)
            self.registry.add(served)
            try:
                self.registry.load(served)  # now, so that a broken adapter is this request's error
            except BaseException:
                self.registry.remove(served.name)
                raise
            self.registry.release(served)

        await asyncio.wrap_future(self.engine.call(add))
        return {"object": "model", "id": served.name, "parent": self.registry.base_id, "root": served.name,
                "loaded": self.registry.is_loaded(served)}

    async def unload_adapter(self, req: p.UnloadAdapterRequest, note: dict) -> dict:
        self._runtime(note)
        note["model"] = req.lora_name
        self._served_adapter(req.lora_name)

        def drop():  # checked again here: of two unloads of one name, the second finds it gone
            self._served_adapter(req.lora_name)
            self.registry.remove(req.lora_name)
            self.registry.tidy()

        await asyncio.wrap_future(self.engine.call(drop))
        return {"object": "model", "id": req.lora_name, "deleted": True}

    def _served_adapter(self, name: str) -> None:
        if name not in self.registry.adapters:
            raise NotFound(f"no adapter is served as '{name}'; adapters: "
                           f"{', '.join(self.registry.adapters) or 'none'}", param="lora_name")

    def _runtime(self, note: dict) -> Path:
        if self.adapter_root is None:
            raise NotFound("loading adapters at run time is off: start the server with --allow-runtime-adapters "
                           "--adapter-root DIR", code="not_enabled")
        return self.adapter_root


# ----------------------------------------------------------------------------------------------


def render_chat(served: Served, messages: list[p.ChatMessage]) -> str:
    """The conversation as the model is asked it: a chat-trained adapter (or a model with a template, no
    recipe) through its own saved template with the generation prompt, as `lorafit generate` renders; an
    adapter trained on another format answers one user message, rendered by that format."""
    from lorafit.core.generation import render_prompt
    from lorafit.core.prompts import chat_renderer
    from lorafit.recipe import DataSpec

    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if turns[-1]["role"] != "user":
        raise APIError("the last message must be the user's: the answer follows it", param="messages")
    spec, tokenizer = served.data, served.tokenizer
    try:
        if is_chat(tokenizer, spec):
            return chat_renderer(spec or DataSpec(train="-", format="chat"), tokenizer)(turns, True, "messages")
        if len(turns) > 1:
            how = f"data.format {spec.format}" if spec else "a model without a chat template"
            raise APIError(f"'{served.name}' was trained on {how}: it answers one user message, with no system "
                           "prompt or earlier turns (send raw text to /v1/completions)", param="messages")
        return render_prompt(turns[0]["content"], tokenizer, spec)
    except LorafitError as e:  # the template refused the conversation (e.g. no system role)
        raise APIError(f"the chat template cannot render these messages: {e.message}"
                       + (f"; {e.fix}" if e.fix else ""), param="messages") from None


def _tokens(served: Served, text: str) -> list[int]:
    """Token ids as training tokenized its rows (a chat render as it is, BOS once otherwise)."""
    return prompt_tokens(text, served.tokenizer, served.data, seq2seq=False)


async def _finish(events) -> Finished:
    async for kind, value in events:
        if kind == "done":
            return value
        if kind == "error":
            raise value
    raise APIError("the generation ended without an answer", status=500)


def _usage(done: Finished) -> p.Usage:
    return p.Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens)
