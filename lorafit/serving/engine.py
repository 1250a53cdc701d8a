"""The one thread that runs the model. Everything that touches the weights (decoding, classifying, loading
and unloading adapters) is a job on its queue, so the HTTP side never waits on a lock and the model is never
used by two threads at once. Generation answers through a sink (text pieces, then the finished result),
called on this thread; handlers.py turns it into an async stream.

Generation is lorafit's own step loop over the model's forward and KV cache (not transformers' generate),
so that each request keeps its own sampler, stop strings and stream.
"""

from __future__ import annotations

import contextlib
import inspect
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from lorafit.serving.decoding import Sampler, SamplingParams, TextStream
from lorafit.serving.protocol import APIError, ServerError, Unavailable
from lorafit.serving.registry import Registry, Served


@dataclass
class Finished:
    text: str
    finish_reason: str          # "stop" (end-of-turn token or stop string) | "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int      # the end token included, as `lorafit generate` counts new_tokens


@dataclass
class Generation:
    """One request to decode. *sink* receives ("text", piece) ... then ("done", Finished) or ("error", APIError),
    on the engine's thread; setting *cancelled* (the client left) stops it at the next step."""

    served: Served
    prompt: list[int]
    stop_ids: list[int]
    params: SamplingParams
    sink: Callable[[tuple], None]
    strip: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, registry: Registry):
        self.registry = registry
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="lorafit-engine", daemon=True)
        self.stopping = False
        self.stats = {"requests": 0, "running": 0, "largest_batch": 0}

    # -- the HTTP side's calls ----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping = True
        self.jobs.put(None)
        self.thread.join(timeout)

    def submit(self, generation: Generation) -> None:
        if self.stopping:
            raise Unavailable("the server is shutting down")
        self.jobs.put(generation)

    def call(self, fn: Callable[[], object]):
        """Run *fn* on the engine's thread, between generations; a concurrent.futures.Future of its result."""
        from concurrent.futures import Future

        if self.stopping:
            raise Unavailable("the server is shutting down")
        future: Future = Future()
        self.jobs.put((fn, future))
        return future

    def call_with(self, served: Served, fn: Callable[[object], object]):
        """Run fn(model) on the engine's thread with *served* switched on (its weights loaded first)."""

        def job():
            self.registry.load(served)
            try:
                with self._active(served):
                    return fn(self.registry.model)
            finally:
                self.registry.release(served)

        return self.call(job)

    # -- the engine's thread -----------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if isinstance(job, tuple):
                fn, future = job
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to the caller, who turns it into an error answer
                    future.set_exception(e)
                continue
            self._generate(job)

    def _generate(self, gen: Generation) -> None:
        if gen.cancelled:
            return
        self.stats["requests"] += 1
        self.stats["running"], self.stats["largest_batch"] = 1, max(1, self.stats["largest_batch"])
        try:
            self.registry.load(gen.served)
            try:
                with self._active(gen.served):
                    result = self._decode(gen)
            finally:
                self.registry.release(gen.served)
        except APIError as e:
            gen.sink(("error", e))
        except Exception as e:  # ours: said on the server's log, a 500 to the client, the server keeps serving
            traceback.print_exc(file=sys.stderr)
            gen.sink(("error", ServerError(f"internal error while generating: {type(e).__name__}: {e}")))
        else:
            if result is not None:
                gen.sink(("done", result))
        finally:
            self.stats["running"] = 0

    @contextlib.contextmanager
    def _active(self, served: Served):
        """The adapter switched on (peft set_adapter), or with the base every adapter off."""
        model = self.registry.model
        if not hasattr(model, "disable_adapter"):  # a plain model: it is the base
            yield
        elif served.is_base:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(served.peft_name)
            yield

    def _decode(self, gen: Generation) -> Finished | None:
        """Prefill the prompt, then one token per step until an end token, a stop string or max_tokens."""
        import torch

        model = self.registry.model
        device = model.device
        sampler = Sampler(gen.params, device)
        stream = TextStream(gen.served.tokenizer, gen.params.stop, strip=gen.strip)
        cache = new_cache()
        ids = torch.tensor([gen.prompt], device=device)
        logits = forward(model, ids, torch.ones_like(ids), None, cache)
        length, new = len(gen.prompt), 0
        while True:
            token = sampler.choose(logits[0])
            new += 1
            if token in gen.stop_ids:
                reason = "stop"
            else:
                piece = stream.push(token)
                if piece:
                    gen.sink(("text", piece))
                reason = "stop" if stream.stopped_by_string else "length" if new >= gen.params.max_tokens else None
            if reason is not None:
                piece = stream.finish()
                if piece:
                    gen.sink(("text", piece))
                return Finished(stream.text, reason, len(gen.prompt), new)
            if gen.cancelled:  # the client left: nobody reads the rest
                return None
            length += 1
            step = torch.tensor([[token]], device=device)
            logits = forward(model, step, torch.ones(1, length, dtype=torch.long, device=device), None, cache)


# ----------------------------------------------------------------------------------------------
# The model's forward, as the step loop calls it


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


_CACHE_ARG: dict = {}  # model class → its cache argument's name, and whether it keeps only the last logits


def forward(model, input_ids, attention_mask, position_ids, cache, **extra):
    """The last position's logits (batch × vocab), the KV *cache* extended in place. transformers 5 names the
    cache argument `cache` (older releases `past_key_values`): the model's own signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _CACHE_ARG:
        params = inspect.signature(base.forward).parameters
        _CACHE_ARG[kind] = "cache" if "cache" in params else "past_key_values"
        _CACHE_ARG[(kind, "keep")] = "logits_to_keep" in params
    kwargs = {_CACHE_ARG[kind]: cache, "use_cache": True, **extra}
    if _CACHE_ARG[(kind, "keep")]:
        kwargs["logits_to_keep"] = 1
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.logits[:, -1].float()
