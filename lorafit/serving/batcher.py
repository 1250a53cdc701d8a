"""Mixed-adapter batches: lorafit's own decode step loop over the model's forward and KV cache.

transformers' generate takes one generation config per batch and streams a batch of one, so each row here
keeps its own sampler (temperature, top_p, seeded generator), stop strings, max_tokens and stream.

- A new request joins at the next step boundary: its prompt is prefilled alone (exactly as it would be
  decoded alone), its first token chosen, and its KV cache left-padded into the running batch. Waiting for
  the running batch to finish instead would hold a short request behind the longest one in the batch.
- One forward per step serves every row: rows for different adapters and for the base together, through
  peft's `adapter_names` (each LoRA layer adds each adapter's update to its own rows; "__base__" rows get
  none). When every row asks for the same adapter, the plain forward with that adapter set is used. DoRA
  adapters, which peft refuses in a mixed batch, decode in a sub-batch of their own; so does a row whose
  cache cannot be merged (a cache type other than transformers' DynamicLayer).
- Rows are left-padded: each keeps its own positions (position_ids), pads are masked out. A row that ends
  (an end token, a stop string, max_tokens, or its client gone) leaves the batch at once; columns that are
  padding for every remaining row are cut.
- At most max_batch rows decode at once; a request for an adapter that cannot be loaded yet (every loaded
  adapter pinned by running rows, --max-loaded reached) waits, and so does every request behind it
  (first come, first served: none starves).
- A row pins its adapter from its load until it leaves (release, once: `held`). One row's failure (its sampler,
  its text) is that row's error; a failed forward fails the rows of its group; the others decode on.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import traceback
from dataclasses import dataclass, field

from lorafit.serving.decoding import Finished, Generation, Sampler, TextStream
from lorafit.serving.protocol import APIError, ServerError, Unavailable

BASE = "__base__"  # peft's name for "no adapter" in adapter_names


@dataclass
class Row:
    gen: Generation
    sampler: Sampler | None     # set by the prefill
    stream: TextStream | None
    length: int                 # real tokens in the cache (its pads not counted)
    pending: int = -1           # the token chosen last, fed at the next step
    new: int = 0                # tokens generated (the end token included)
    pad: int = 0                # left padding in its group's cache
    batch: int = 1              # the most rows decoded with it in one forward
    held: bool = False          # its adapter pinned (registry.load), until released once

    @property
    def adapter(self) -> str:
        served = self.gen.served
        return BASE if served.is_base else served.peft_name


@dataclass
class Group:
    """Rows decoded by one forward."""

    key: str
    rows: list[Row] = field(default_factory=list)
    cache: object = None
    width: int = 0              # the cache's length, pads included


class Batcher:
    def __init__(self, registry, max_batch: int, stats: dict):
        self.registry, self.max_batch, self.stats = registry, max_batch, stats
        self.waiting: list = []
        self.groups: dict[str, Group] = {}
        self.joining: Row | None = None  # the row being prefilled

    @property
    def running(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.groups)

    # -- joining ----------------------------------------------------------------------------------

    def admit(self) -> None:
        """Waiting requests join, first come first served, while there is room."""
        while self.waiting and self.running < self.max_batch:
            gen = self.waiting[0]
            if gen.cancelled:
                self.waiting.pop(0)
                continue
            if not self.registry.can_load(gen.served):
                if self.groups:
                    return  # every loaded adapter is pinned by running rows: wait for one to be released
                self.waiting.pop(0)  # nothing runs, so nothing will be released: never expected
                gen.sink(("error", Unavailable(f"no room to load adapter '{gen.served.name}'")))
                continue
            self.waiting.pop(0)
            self.stats["requests"] += 1
            self.joining = row = Row(gen, None, None, length=len(gen.prompt))
            try:
                self.registry.load(gen.served)
                row.held = True
                self._prefill(row)
            except Exception as e:
                self._release(row)
                _fail(gen, e)
            self.joining = None  # still set if something worse escaped: reset() ends it

    def _prefill(self, row: Row) -> None:
        import torch

        gen, model = row.gen, self.registry.model
        row.sampler = Sampler(gen.params, model.device)
        row.stream = TextStream(gen.served.tokenizer, gen.params.stop, strip=gen.strip)
        cache = new_cache()
        ids = torch.tensor([gen.prompt], device=model.device)
        with active(model, None if gen.served.is_base else gen.served.peft_name):
            logits = forward(model, ids, torch.ones_like(ids), None, cache)
        if self._advance(row, logits[0]):  # ended at its first token
            self._release(row)
            return
        key = self._group_key(row, cache)
        group = self.groups.setdefault(key, Group(key))
        _join(group, row, cache)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], self.running)

    def _group_key(self, row: Row, cache) -> str:
        from transformers.cache_utils import DynamicLayer

        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            return f"alone:{id(row)}"
        peft_config = getattr(self.registry.model, "peft_config", {})
        name = row.adapter
        if name != BASE and getattr(peft_config.get(name), "use_dora", False):
            return f"dora:{name}"
        return "mixed"

    # -- stepping ---------------------------------------------------------------------------------

    def step(self) -> None:
        """One token for every running row."""
        for group in list(self.groups.values()):
            try:
                self._step(group)
            except Exception as e:  # a failed forward fails its rows; the server goes on
                self.groups.pop(group.key, None)
                for row in group.rows:
                    self._release(row)
                    _fail(row.gen, e)

    def reset(self, error: APIError) -> None:
        """Every request waiting or running ends with *error*, their pins returned: the engine's last resort after a
        failure outside any one request (engine.py), so that none waits forever and the engine goes on."""
        rows = [row for group in self.groups.values() for row in group.rows] + ([self.joining] if self.joining else [])
        waiting, self.waiting, self.groups, self.joining = self.waiting, [], {}, None
        for row in rows:
            with contextlib.suppress(Exception):
                self._release(row)
        for gen in [row.gen for row in rows] + waiting:
            with contextlib.suppress(Exception):
                gen.sink(("error", error))

    def _release(self, row: Row) -> None:
        """Its adapter unpinned, once whatever path the row leaves by."""
        if row.held:
            row.held = False
            self.registry.release(row.gen.served)

    def _step(self, group: Group) -> None:
        import torch

        model = self.registry.model
        device = model.device
        group.width += 1
        mask = torch.ones(len(group.rows), group.width, dtype=torch.long, device=device)
        for i, row in enumerate(group.rows):
            mask[i, :row.pad] = 0
        positions = torch.tensor([[row.length] for row in group.rows], device=device)
        tokens = torch.tensor([[row.pending] for row in group.rows], device=device)
        names = {row.adapter for row in group.rows}
        if len(names) == 1:  # one adapter (or the base): the plain forward, as a request alone runs it
            name = names.pop()
            with active(model, None if name == BASE else name):
                logits = forward(model, tokens, mask, positions, group.cache)
        else:
            logits = forward(model, tokens, mask, positions, group.cache,
                             adapter_names=[row.adapter for row in group.rows])
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(group.rows))
        keep, ended = [], []
        for i, row in enumerate(group.rows):
            row.length += 1
            row.batch = max(row.batch, len(group.rows))
            try:
                done = row.gen.cancelled or self._advance(row, logits[i])
            except Exception as e:  # this row's own failure (its sampler, its text): its error alone
                _fail(row.gen, e)
                done = True
            if done:
                ended.append(row)  # it leaves the batch at once
            else:
                keep.append(i)
        try:
            if len(keep) < len(group.rows):
                _select(group, keep)
            if not group.rows:
                del self.groups[group.key]
        finally:
            for row in ended:
                self._release(row)

    def _advance(self, row: Row, logits) -> bool:
        """Choose the row's next token, hand out its text; True when the row has ended."""
        gen = row.gen
        token = row.sampler.choose(logits)
        row.new += 1
        if token in gen.stop_ids:
            reason = "stop"
        else:
            piece = row.stream.push(token)
            if piece:
                gen.sink(("text", piece))
            reason = "stop" if row.stream.stopped_by_string else "length" if row.new >= gen.params.max_tokens else None
        if reason is None:
            row.pending = token
            return False
        piece = row.stream.finish()
        if piece:
            gen.sink(("text", piece))
        gen.sink(("done", Finished(row.stream.text, reason, len(gen.prompt), row.new, row.batch)))
        return True


# ----------------------------------------------------------------------------------------------
# The group's cache: rows joined (left-padded to one width), rows removed, common padding cut


def _join(group: Group, row: Row, cache) -> None:
    import torch
    import torch.nn.functional as F

    length = cache.get_seq_length()
    if group.cache is None:
        group.cache, group.width, row.pad = cache, length, 0
        group.rows.append(row)
        return
    width = max(group.width, length)
    grow, row.pad = width - group.width, width - length
    for old, new in zip(group.cache.layers, cache.layers):
        old.keys = torch.cat([F.pad(old.keys, (0, 0, grow, 0)), F.pad(new.keys, (0, 0, row.pad, 0))])
        old.values = torch.cat([F.pad(old.values, (0, 0, grow, 0)), F.pad(new.values, (0, 0, row.pad, 0))])
    for other in group.rows:
        other.pad += grow
    group.width = width
    group.rows.append(row)


def _select(group: Group, keep: list[int]) -> None:
    import torch

    group.rows = [group.rows[i] for i in keep]
    if not group.rows:
        group.cache = None
        return
    cut = min(row.pad for row in group.rows)
    index = torch.tensor(keep, device=group.cache.layers[0].keys.device)
    for layer in group.cache.layers:
        layer.keys = layer.keys.index_select(0, index)[..., cut:, :]
        layer.values = layer.values.index_select(0, index)[..., cut:, :]
    for row in group.rows:
        row.pad -= cut
    group.width -= cut


def _fail(gen, e: Exception) -> None:
    if isinstance(e, APIError):
        gen.sink(("error", e))
        return
    traceback.print_exc(file=sys.stderr)  # ours: on the server's log; the client gets a 500
    gen.sink(("error", ServerError(f"internal error while generating: {type(e).__name__}: {e}")))


# ----------------------------------------------------------------------------------------------
# The model, as the step loop calls it


@contextlib.contextmanager
def active(model, peft_name: str | None):
    """The adapter switched on (peft set_adapter), or with None every adapter off (the base)."""
    if not hasattr(model, "disable_adapter"):  # a plain model: it is the base
        yield
    elif peft_name is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(peft_name)
        yield


def new_cache():
    from transformers import DynamicCache

    return DynamicCache()


_ARGS: dict = {}  # model class → (its cache argument's name, whether it can keep only the last logits)


def forward(model, input_ids, attention_mask, position_ids, cache, **extra):
    """The last position's logits (batch × vocab, float32), the KV *cache* extended in place. transformers 5
    names the cache argument `cache` (older releases `past_key_values`): the model's own signature decides."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _ARGS:
        params = inspect.signature(base.forward).parameters
        _ARGS[kind] = ("cache" if "cache" in params else "past_key_values", "logits_to_keep" in params)
    name, keep = _ARGS[kind]
    kwargs = {name: cache, "use_cache": True, **extra}
    if keep:
        kwargs["logits_to_keep"] = 1
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.logits[:, -1].float()
