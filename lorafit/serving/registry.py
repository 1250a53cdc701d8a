"""What `lorafit serve` answers to, and which adapters' weights are in the model right now.

One base, loaded once as training loaded it (core.models: GGUF bases and builtin: names included); each
adapter under its name with its own tokenizer and recipe (its prompts are rendered as it was trained); the
base answers under its own name (and as "base"), asked as the first adapter was trained, as
`lorafit generate --no-adapter` asks it. Tokenizers and recipes are read at start, adapter weights on first
use; at most *max_loaded* adapters stay in the model, the least recently used evicted first (peft's
load_adapter / delete_adapter). Weights change only on the engine's thread. Adapters whose tokenizers are the same
(the same saved files, rendered the same way) share one tokenizer object: each copy of SmolLM2's costs ~14 MB
resident, most of an r16 adapter's own 18.7 MB (docs/serving.md).

An adapter loaded at run time (/v1/load_lora_adapter) is a stranger's folder: every file it or its run holds must
resolve inside --adapter-root (checked when it is asked for, and again on the engine's thread just before its
weights open); its tokenizer is its own or the served base's, and its recipe is read for its data section only
(how prompts are rendered), never its model section (remote code, revision).
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import threading
import time
import traceback
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lorafit.core import libs, models, policies, tasks
from lorafit.core.adapters import ADAPTER_NAME, AdapterSource, find_adapter, same_base
from lorafit.errors import LorafitError, ModelError
from lorafit.serving.protocol import APIError, NotFound

BASE_ALIAS = "base"


@dataclass
class Served:
    """One name the server answers to: the base (source None) or an adapter."""

    name: str
    task: tasks.Task
    tokenizer: object
    recipe: object | None                  # the run's Recipe: how prompts are rendered
    source: AdapterSource | None = None
    runtime: bool = False                  # loaded through /v1/load_lora_adapter
    root: Path | None = None               # a runtime adapter's --adapter-root: no file it reads leaves it
    created: int = field(default_factory=lambda: int(time.time()))
    peft_name: str | None = None           # its name inside the peft model

    @property
    def is_base(self) -> bool:
        return self.source is None

    @property
    def data(self):
        return self.recipe.data if self.recipe is not None else None


class Tokenizers:
    """One tokenizer object per distinct tokenizer, alive while a served name holds it. Shared objects are only
    read: prompts are encoded on the event loop (classify's on the engine thread), answers decoded on the engine
    thread, with no truncation or padding setting ever changed between calls."""

    def __init__(self):
        self._held: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, key: tuple, load: Callable[[], object]):
        with self._lock:
            found = self._held.get(key)
        if found is not None:
            return found
        tokenizer = load()
        with self._lock:
            return self._held.setdefault(key, tokenizer)

    def __len__(self) -> int:
        return len(self._held)


def tokenizer_key(folder: Path | None, fallback: str, recipe) -> tuple:
    """What makes two served tokenizers the same: the bytes of the tokenizer files in *folder* (else *fallback*,
    the base they come from) and the chat template the recipe renders with (_ready sets it)."""
    if folder is not None and models.has_tokenizer(folder):
        digest = hashlib.sha256()
        for name in models.TOKENIZER_FILES:
            if (folder / name).is_file():
                digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
        origin = ("files", digest.hexdigest())
    else:
        origin = ("base", fallback)
    data = recipe.data if recipe is not None else None
    template = data.chat_template if data is not None and data.format == "chat" else None
    return origin, template


class Registry:
    """The served names and the adapter cache. Names are read by the HTTP side; load(), release() and
    tidy() run on the engine's thread only."""

    def __init__(self, model, base: Served, *, base_id: str, max_loaded: int, context: int | None,
                 base_tokenizer: Callable[[], object] | None = None, tokenizers: Tokenizers | None = None):
        self.model, self.base, self.base_id = model, base, base_id
        self.tokenizers = tokenizers or Tokenizers()
        self.max_loaded, self.context = max_loaded, context
        self.adapters: dict[str, Served] = {}
        self.loaded: OrderedDict[str, Served] = OrderedDict()  # peft name → adapter, least recently used first
        self.pins: Counter = Counter()
        self._names = 0
        self._base_tokenizer = base_tokenizer or (lambda: base.tokenizer)
        self._base_tokenizer_loaded = None

    def base_tokenizer(self):
        """A copy of the base model's own tokenizer (for a runtime adapter that brings none)."""
        if self._base_tokenizer_loaded is None:
            self._base_tokenizer_loaded = self._base_tokenizer()
        return copy.deepcopy(self._base_tokenizer_loaded)

    # -- names ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [self.base_id, *self.adapters]

    def get(self, name: str) -> Served:
        if name in (self.base_id, BASE_ALIAS):
            return self.base
        if name in self.adapters:
            return self.adapters[name]
        raise NotFound(f"the model '{name}' is not served here; served: {', '.join(self.names())}", param="model")

    def add(self, served: Served) -> None:
        self._names += 1
        served.peft_name = served.peft_name or f"lorafit_{self._names}"
        self.adapters[served.name] = served

    def remove(self, name: str) -> Served:
        served = self.adapters.pop(name)
        return served

    def is_loaded(self, served: Served) -> bool:
        return served.is_base or served.peft_name in self.loaded

    # -- weights (engine thread) ------------------------------------------------------------------

    def can_load(self, served: Served) -> bool:
        """Its weights are in, or can come in: a free slot, or a loaded adapter no running row uses."""
        if served.is_base or served.peft_name in self.loaded:
            return True
        return len(self.loaded) < self.max_loaded or any(self.pins[p] <= 0 for p in self.loaded)

    def load(self, served: Served) -> None:
        """Make *served*'s weights usable and pin them until release(); evict beyond max_loaded."""
        if not served.is_base:
            if served.peft_name not in self.loaded:
                self._load_weights(served)
            self.loaded.move_to_end(served.peft_name)
            self.pins[served.peft_name] += 1
            self.tidy()

    def release(self, served: Served) -> None:
        """One pin of load() returned: once per load (batcher.Row.held); an adapter with no pin can be evicted."""
        if not served.is_base:
            self.pins[served.peft_name] -= 1
            self.tidy()

    def _load_weights(self, served: Served) -> None:
        from peft import PeftModel

        if served.root is not None:  # checked when it was asked for; again now, just before its files open
            check_inside(served.source, served.root, served.name, run=False)
        try:
            if isinstance(self.model, PeftModel):
                models.load_beside(self.model, served.source, served.peft_name, where=served.name)
            else:  # a plain base: its first adapter makes it a peft model
                self.model = PeftModel.from_pretrained(self.model, str(served.source.adapter_dir),
                                                       adapter_name=served.peft_name, is_trainable=False).eval()
        except Exception as e:  # whatever the files hold (a truncated safetensors, shapes that do not fit)
            self._forget_partial(served.peft_name)
            first = (e.message if isinstance(e, ModelError) else " ".join(str(e).strip().splitlines()[:2]))[:300]
            raise APIError(f"adapter '{served.name}' does not load onto the base: {first}", param="model",
                           status=500, code="adapter_load_failed") from None
        self.loaded[served.peft_name] = served

    def _forget_partial(self, peft_name: str) -> None:
        """peft adds an adapter's layers before it reads the weights: a failed load leaves them, untrained."""
        if peft_name in (getattr(self.model, "peft_config", None) or {}) and len(self.model.peft_config) > 1:
            try:
                self.model.delete_adapter(peft_name)
            except Exception:
                traceback.print_exc(file=sys.stderr)

    def tidy(self) -> None:
        """Delete unpinned adapters that are no longer served, then the least recently used beyond max_loaded.
        The last adapter of a peft model is never deleted (peft cannot run without one): a new one loads first.
        Housekeeping: an adapter that will not delete stays loaded (the server's log says why), tried again later."""
        served = {s.peft_name for s in self.adapters.values()}
        try:
            for peft_name in [p for p in self.loaded if p not in served and self.pins[p] <= 0]:
                if len(self.loaded) > 1:
                    self._delete(peft_name)
            for peft_name in list(self.loaded):
                if len(self.loaded) <= self.max_loaded:
                    break
                if self.pins[peft_name] <= 0:
                    self._delete(peft_name)
        except Exception:
            traceback.print_exc(file=sys.stderr)

    def _delete(self, peft_name: str) -> None:
        self.model.delete_adapter(peft_name)
        del self.loaded[peft_name]
        self.pins.pop(peft_name, None)


# ----------------------------------------------------------------------------------------------
# Opening: the adapters checked before any weight loads, then the base (with the first adapter)


def check_servable(named: list[tuple[str, AdapterSource]], option: str = "--adapter") -> None:
    """Tasks `lorafit serve` answers (the task table's servable rows), one number of classes."""
    for name, source in named:
        if not source.task.servable:
            generating = " / ".join(t.name for t in tasks.TASKS.values() if t.servable and t.generates)
            classifying = " / ".join(t.name for t in tasks.TASKS.values() if t.servable and t.labelled)
            raise ModelError(f"adapter '{name}' is a {source.task.name} adapter; serve answers {generating} "
                             f"(chat and text completions) and {classifying} (classify) adapters",
                             where=f"{option} {name}", fix="use `lorafit generate` or `lorafit predict` for it")
    if named and named[0][1].task.labelled:
        first_name, first = named[0]
        classes = models.saved_num_labels(first)
        for name, source in named[1:]:
            if models.saved_num_labels(source) != classes:
                raise ModelError(f"adapter '{name}' has {models.saved_num_labels(source)} classes, '{first_name}' "
                                 f"{classes}: one base head shape serves them all", where=f"{option} {name}",
                                 fix="serve adapters with the same classes together")


def adapter_entry(name: str, source: AdapterSource, tokenizers: Tokenizers) -> Served:
    """An adapter given at start: its name, tokenizer (saved beside it, else its base's; one object for the same
    files) and recipe; no weights yet."""
    recipe = _recipe(source)
    tokenizer = tokenizers.get(tokenizer_key(source.adapter_dir, str(source.base), recipe),
                               lambda: _ready(models.load_adapter_tokenizer(source), recipe))
    return Served(name, source.task, tokenizer, recipe, source)


def _recipe(source: AdapterSource):
    try:
        return source.run_recipe()
    except LorafitError:
        return None  # a run whose recipe no longer validates: rendered as a model without one


def _ready(tokenizer, recipe):
    if recipe is not None and recipe.data.format == "chat" and recipe.data.chat_template:
        from lorafit.core.prompts import chat_renderer

        chat_renderer(recipe.data, tokenizer)  # sets the template trained with on the tokenizer
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token  # classification batches pad (training set the same)
    return tokenizer


def open_registry(named: list[tuple[str, AdapterSource]], model_name: str | None, *, max_loaded: int,
                  trust_remote_code: bool = False) -> Registry:
    """The base loaded once (with the first adapter, which proves the two fit before the server starts),
    every adapter's tokenizer and recipe read. *named* may be empty: a plain model is served alone."""
    libs.quiet_libraries()
    tokenizers = Tokenizers()
    entries = [adapter_entry(name, source, tokenizers) for name, source in named]
    if named:
        first = entries[0]
        first.peft_name = "lorafit_1"
        model, _ = models.load_adapted(named[0][1], adapter_name=first.peft_name, trust_remote_code=trust_remote_code)
        base = Served(named[0][1].base, first.task, first.tokenizer, first.recipe)
        base_id = named[0][1].base

        def base_tokenizer():  # the base's own, as the first adapter (given at start) loaded it
            with models.trusting_remote_code(trust_remote_code):
                return models.load_tokenizer(models.base_spec(named[0][1])[0])
    else:
        model, tokenizer, recipe = models.load_for_inference(model_name, trust_remote_code=trust_remote_code)
        plain = copy.deepcopy(tokenizer)
        _ready(tokenizer, recipe)
        base = Served(str(model_name), tasks.task(None), tokenizer, recipe)
        base_id = str(model_name)

        def base_tokenizer():
            return plain
    found = policies.context_limit(model.config, base.tokenizer)
    registry = Registry(model, base, base_id=base_id, max_loaded=max_loaded, context=found[0] if found else None,
                        base_tokenizer=base_tokenizer, tokenizers=tokenizers)
    for entry in entries:
        registry.add(entry)
    if named:
        registry.loaded[entries[0].peft_name] = entries[0]
        registry.tidy()
    return registry


def runtime_adapter(registry: Registry, name: str, path: str, root: Path) -> Served:
    """An adapter asked for by /v1/load_lora_adapter: under *root* (no file it or its run holds leaves it, links
    included), of the served base and task, under a new name. Reads files: called off the event loop."""
    check_name(registry, name)
    root = root.resolve()
    target = root / path
    if not _inside(target, root):
        raise _outside(path)
    target = target.resolve()
    if not target.is_dir():
        raise APIError(f"'{path}': no such folder under the adapter root", param="lora_path")
    _check_folder(target, root, path)  # before adapter_config.json is read
    try:
        source = find_adapter(target)
    except ModelError as e:
        raise APIError(f"{path}: {e.message}", param="lora_path") from None
    check_inside(source, root, path)
    reference = next(iter(registry.adapters.values()), None)
    base = reference.source.base if reference is not None else registry.base_id
    if not same_base(source.base, base):
        raise APIError(f"'{path}' was trained on {source.base}; this server's base is {base}", param="lora_path")
    if source.task != registry.base.task:
        raise APIError(f"'{path}' is a {source.task.name} adapter; this server serves {registry.base.task.name}",
                       param="lora_path")
    try:
        check_servable(([(reference.name, reference.source)] if reference else []) + [(name, source)], "lora_path")
        recipe = _recipe(source)  # its data section renders prompts; its model section is never read

        def load():
            if models.has_tokenizer(source.adapter_dir):
                from transformers import AutoTokenizer

                return _ready(AutoTokenizer.from_pretrained(str(source.adapter_dir)), recipe)
            return _ready(registry.base_tokenizer(), recipe)

        tokenizer = registry.tokenizers.get(tokenizer_key(source.adapter_dir, registry.base_id, recipe), load)
    except LorafitError as e:
        raise APIError(str(e), param="lora_path") from None
    except (OSError, ValueError) as e:
        raise APIError(f"'{path}': its tokenizer does not load: {' '.join(str(e).splitlines()[:1])[:300]}",
                       param="lora_path") from None
    return Served(name, source.task, tokenizer, recipe, source, runtime=True, root=root)


def check_name(registry: Registry, name: str) -> None:
    """A runtime adapter's name: usable by peft, not the base's, not one already served (400)."""
    if not ADAPTER_NAME.fullmatch(name) or name in (BASE_ALIAS, registry.base_id):
        raise APIError(f"'{name}' cannot name an adapter: use letters, digits, '_' or '-' (not 'base')",
                       param="lora_name")
    if name in registry.adapters:
        raise APIError(f"an adapter is already served as '{name}'; unload it first or pick another name",
                       param="lora_name")


def check_inside(source: AdapterSource, root: Path, path: str, *, run: bool = True) -> None:
    """Every file of the adapter dir (and, with *run*, of the run dir around it, whose recipe is read) resolves
    inside *root* (403 otherwise): a link anywhere in them, to a file or a folder, may not lead out."""
    for folder in [source.adapter_dir] + ([source.run_dir] if run and source.run_dir is not None else []):
        _check_folder(folder, root, path)


def _check_folder(folder: Path, root: Path, path: str) -> None:
    if not _inside(folder, root):
        raise _outside(path)
    for parent, dirs, files in os.walk(folder):  # links to folders are listed, not followed
        for entry in dirs + files:
            if not _inside(Path(parent) / entry, root):
                raise _outside(path)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a link loop leads nowhere inside
        return False


def _outside(path: str) -> APIError:
    """403; the root itself is not shown (a path on the server's disk)."""
    return APIError(f"'{path}' leads outside the adapter root (--adapter-root): adapters load from inside it only, "
                    "links included", param="lora_path", status=403, code="path_outside_adapter_root")
