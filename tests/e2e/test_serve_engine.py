"""`lorafit serve`'s engine in-process, where a failure has to be provoked: one request's failure is that request's
error (its batch-mates decode on, the adapter's pin count stays true), a failure anywhere in the loop leaves the
engine serving, and an adapter loaded at run time never reads its run's model section nor a file that left the
adapter root after it was checked. The base and two chat adapters ('a' → "Paris.", 'b' → "Blue.") load once."""

from __future__ import annotations

import json
import queue
import shutil

import pytest

from tests.e2e.conftest import CHAT_PROMPTS

ASK = CHAT_PROMPTS[0]


@pytest.fixture(scope="module")
def registry(chat_runs):
    from lorafit.core.adapters import find_adapter
    from lorafit.serving.registry import open_registry

    named = [(name, find_adapter(chat_runs[name])) for name in ("a", "b")]
    return open_registry(named, None, max_loaded=2)


def _generation(served, max_tokens: int = 8, **sampling):
    """A chat request for *served* and the queue its events arrive on."""
    from lorafit.core.generation import prompt_tokens, stop_ids
    from lorafit.serving.decoding import Generation, SamplingParams
    from lorafit.serving.handlers import render_chat
    from lorafit.serving.protocol import ChatMessage

    ids = prompt_tokens(render_chat(served, [ChatMessage(role="user", content=ASK)]), served.tokenizer, served.data,
                        seq2seq=False)
    events: queue.Queue = queue.Queue()
    gen = Generation(served, ids, stop_ids(served.tokenizer, served.data),
                     SamplingParams(max_tokens=max_tokens, **sampling), sink=events.put, strip=True)
    return gen, events


def _outcome(events: queue.Queue, timeout: float = 30):
    """("done", Finished) or ("error", APIError): the request's last event (bounded wait)."""
    while True:
        kind, value = events.get(timeout=timeout)
        if kind != "text":
            return kind, value


def test_a_failing_row_fails_alone_and_is_released_once(registry):
    """Three rows of adapter 'a' in one batch: the first ends at this step, the second's sampler fails, the third
    decodes on to its answer; every pin is returned exactly once."""
    import torch

    from lorafit.serving.batcher import Batcher

    a = registry.get("a")
    batcher = Batcher(registry, 8, {"requests": 0, "running": 0, "largest_batch": 0})
    asks = [_generation(a, max_tokens=n) for n in (2, 8, 4)]
    batcher.waiting += [gen for gen, _ in asks]
    with torch.no_grad():
        batcher.admit()
        assert registry.pins[a.peft_name] == 3 and batcher.running == 3
        failing = next(row for row in batcher.groups["mixed"].rows if row.gen is asks[1][0])

        def fail(logits):
            raise RuntimeError("the sampler met NaN")

        failing.sampler.choose = fail
        while batcher.busy:
            batcher.step()
    (first, first_events), (_, failed_events), (_, third_events) = asks
    kind, done = _outcome(first_events)
    assert kind == "done" and done.completion_tokens == 2 and first_events.empty()  # no error after its answer
    kind, error = _outcome(failed_events)
    assert kind == "error" and error.status == 500 and "NaN" in error.message
    kind, done = _outcome(third_events)
    assert kind == "done" and done.completion_tokens == 4 and done.text.startswith("Paris")
    assert registry.pins[a.peft_name] == 0


def test_a_failure_in_the_engine_loop_fails_its_requests_and_the_engine_goes_on(registry, monkeypatch):
    from lorafit.serving.engine import Engine

    engine = Engine(registry, max_batch=4)
    real, calls = registry.can_load, []

    def can_load_once(served):  # an unexpected failure inside the loop (outside any request's own handling)
        calls.append(served.name)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(served)

    monkeypatch.setattr(registry, "can_load", can_load_once)
    engine.start()
    try:
        gen, events = _generation(registry.get("b"))
        engine.submit(gen)
        kind, error = _outcome(events)
        assert kind == "error" and error.status == 500
        gen, events = _generation(registry.get("b"))
        engine.submit(gen)
        kind, done = _outcome(events)
        assert kind == "done" and done.text == "Blue." and engine.alive
    finally:
        engine.stop()
    assert not any(registry.pins.values())


def test_a_runtime_adapter_reads_nothing_of_its_run_s_model_section(registry, chat_runs, tmp_path, monkeypatch):
    """No tokenizer beside it: the served base's is used (its recipe's model.trust_remote_code / revision are never
    asked); a weights file swapped for a link outside the root after the check is refused when the weights open."""
    from lorafit.core import models
    from lorafit.core.models import TOKENIZER_FILES
    from lorafit.serving.protocol import APIError
    from lorafit.serving.registry import runtime_adapter

    root = tmp_path / "root"
    run = root / "remote"
    shutil.copytree(chat_runs["a"] / "adapter", run / "adapter",
                    ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    recipe = (chat_runs["a"] / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe.replace("model:\n", "model:\n  trust_remote_code: true\n  revision: x\n", 1))
    asked = []
    real = models.base_spec
    monkeypatch.setattr(models, "base_spec", lambda source, *a, **k: (asked.append(source.adapter_dir), real(source, *a, **k))[1])
    served = runtime_adapter(registry, "remote", "remote", root)
    assert run / "adapter" not in asked and (root / "remote" / "adapter").resolve() not in asked
    assert served.tokenizer.get_vocab() == registry.base.tokenizer.get_vocab()
    assert served.tokenizer is not registry.base.tokenizer
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(chat_runs["b"] / "adapter" / "adapter_model.safetensors")  # after the check, before the load
    registry.add(served)
    try:
        with pytest.raises(APIError) as e:
            registry.load(served)
        assert e.value.status == 403 and served.peft_name not in registry.loaded
    finally:
        registry.remove("remote")


def test_adapters_with_the_same_tokenizer_share_one_object(chat_runs, tmp_path):
    """Adapters of one base mostly save the same tokenizer files: one object serves them (a copy of SmolLM2's costs
    ~14 MB resident); another template ('b') or other files get their own, and each name still renders its own way."""
    from lorafit.core.adapters import find_adapter
    from lorafit.serving.handlers import render_chat
    from lorafit.serving.protocol import ChatMessage
    from lorafit.serving.registry import open_registry, runtime_adapter

    copy = tmp_path / "root" / "a-copy"
    shutil.copytree(chat_runs["a"], copy)
    edited = tmp_path / "root" / "a-edited"
    shutil.copytree(chat_runs["a"], edited)
    config = edited / "adapter" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 77}))
    named = [(name, find_adapter(path)) for name, path in
             (("a", chat_runs["a"]), ("a2", copy), ("d", chat_runs["d"]), ("b", chat_runs["b"]), ("e", edited))]
    registry = open_registry(named, None, max_loaded=1)
    a, a2, d, b, e = (registry.get(name).tokenizer for name in ("a", "a2", "d", "b", "e"))
    assert a is a2 and a is d and a is registry.base.tokenizer
    assert b is not a and e is not a and e.model_max_length == 77 != a.model_max_length
    assert len(registry.tokenizers) == 3
    ask = [ChatMessage(role="user", content=ASK)]
    assert render_chat(registry.get("b"), ask) != render_chat(registry.get("a"), ask)
    assert render_chat(registry.get("a2"), ask) == render_chat(registry.get("a"), ask)
    runtime = runtime_adapter(registry, "later", "a-copy", tmp_path / "root")  # a stranger's folder, the same files
    assert runtime.tokenizer is a
