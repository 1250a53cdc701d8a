"""Models on disk and in memory: their files, their tokenizer, their weights, their adapter.

One home for: which files make a model and a tokenizer, loading a base (plain, quantized, or from GGUF)
for training, and loading base + adapter for inference (evaluate, generate, merge, verify) with the same
rules: the adapter's recorded base, revision, dtype, quantization, device. Where a name points (hub id or
path) is core.hub's; GGUF files, read and dequantized, are core.gguf's. Their names are importable from
here too: a caller asking for a model need not know which kind of file it is.
"""

from __future__ import annotations

import contextlib
import json
from contextvars import ContextVar
from pathlib import Path

from lorafit import log
from lorafit.core import distributed, policies, tasks
from lorafit.core.adapters import BLEND_FILE, AdapterSource, find_adapter, holds_adapter
from lorafit.core.gguf import (BUILTIN_MODELS, builtin_gguf, check_gguf_mapping, gguf_dtype, gguf_origin, gguf_hub_id, gguf_metadata,  # noqa: F401
                               gguf_metadata_memo, gguf_path, gguf_source, gguf_spec, is_builtin, is_gguf_cache,
                               is_gguf_name, materialize_gguf)
from lorafit.core.hub import hub_id, is_hub_id, local_dir, local_path, looks_like_path  # noqa: F401
from lorafit.core.quantization import bnb_config, cpu_safe
from lorafit.core.weights import is_lora_key, read_header
from lorafit.errors import LorafitError, ModelError
from lorafit.recipe import ModelSpec, QuantizationSpec, TrainingSpec

# Files that hold a tokenizer's vocabulary: at least one must be there.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                         "tiktoken.model")
# Everything that makes up a saved tokenizer (copied with a merged model).
TOKENIZER_FILES = TOKENIZER_VOCAB_FILES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt",
                                           "added_tokens.json", "chat_template.jinja", "chat_template.json")


def has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_VOCAB_FILES + ("tokenizer_config.json",))


def check_model_files(spec: ModelSpec, *, tokenizer: bool = True) -> None:
    """A local directory must hold weights and a tokenizer: transformers would build an empty tokenizer
    or load pickles without a word. A GGUF file must be there (it holds both)."""
    spec = gguf_spec(spec)
    path = local_dir(spec)
    if path is None:
        return
    if spec.gguf_file:
        gguf_path(spec)
        return
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        pickles = sorted(n for n in names if n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json"))
                         or n.endswith((".pt", ".pth", ".ckpt")))
        if pickles and not getattr(spec, "allow_pickle", False):
            # A pickle can run code when it is read: refused unless the recipe opts in.
            raise ModelError(f"{path / pickles[0]} holds the weights as a pickle, which can run code when loaded; "
                             "lorafit loads safetensors only", where="model.name",
                             fix="convert it once, if you trust it: AutoModel.from_pretrained(DIR).save_pretrained(DIR, "
                                 "safe_serialization=True) writes model.safetensors; or set model.allow_pickle: true "
                                 "(then read with torch.load(weights_only=True))")
        if pickles:
            log.warn(f"{path}: weights are a pickle ({pickles[0]}), read with weights_only because model.allow_pickle "
                     "is true; prefer safetensors")
        else:
            raise ModelError(f"{path} has config.json but no weights (*.safetensors or pytorch_model.bin)",
                             where="model.name", fix="point model.name at a complete model directory")
    if tokenizer and not any(n in names for n in TOKENIZER_VOCAB_FILES):
        raise ModelError(f"{path} has no tokenizer files (looked for {', '.join(TOKENIZER_VOCAB_FILES)})",
                         where="model.name", fix="save the tokenizer next to the weights (tokenizer.save_pretrained)")


def warn_remote_code(spec, *, why: str = "model.trust_remote_code is on") -> None:
    """model.trust_remote_code on a model that ships code: say, before it runs, whose code runs."""
    if not spec.trust_remote_code:
        return
    path = Path(spec.name).expanduser()
    if path.is_dir():
        try:
            if not json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map"):
                return  # nothing of its own to run
        except (OSError, ValueError):
            return
        source = f"the local directory {path}"
    else:
        source = f"{spec.name} at revision {spec.revision or 'main (unpinned)'}"
    log.warn(f"{why}: the Python code of {source} will run on this machine; read it, "
             "and pin model.revision to a commit so that it cannot change under you")


# The user's consent to run a base model's own code, given on the command at hand (--trust-remote-code), with the
# bases already announced. A run dir's recipe saying model.trust_remote_code: true records the consent of whoever
# trained it, on their machine: never consent here. The CLI sets it around a command (trusting_remote_code);
# base_spec, the one place a run's base is resolved, applies it.
_REMOTE_CODE: ContextVar[tuple[bool, set]] = ContextVar("lorafit_remote_code", default=(False, set()))


@contextlib.contextmanager
def trusting_remote_code(allowed: bool):
    """The command at hand may (*allowed*) run the code a base model ships."""
    token = _REMOTE_CODE.set((bool(allowed), set()))
    try:
        yield
    finally:
        _REMOTE_CODE.reset(token)


def remote_code_allowed() -> bool:
    return _REMOTE_CODE.get()[0]


def remote_code_rule(spec: ModelSpec, source: AdapterSource) -> ModelSpec:
    """train's remote-code rule, for a run dir (or adapter) another command loads: the base's own code runs only
    when that command says --trust-remote-code, and it is said (once) whose code runs; a run whose recipe needed
    it is refused without."""
    allowed, announced = _REMOTE_CODE.get()
    if spec.trust_remote_code and not allowed:
        recorded = source.recipe_file or source.adapter_dir / BLEND_FILE
        raise ModelError(f"its base {spec.name} runs its own Python code (model.trust_remote_code: true in {recorded}), "
                         "and a run dir is no consent to run that code on this machine",
                         where=str(source.run_dir or source.adapter_dir),
                         fix="read that code first; then add --trust-remote-code to this command")
    spec = spec.model_copy(update={"trust_remote_code": allowed})
    if allowed and spec.name not in announced:
        announced.add(spec.name)
        warn_remote_code(spec, why="--trust-remote-code")
    return spec


def _source(spec: ModelSpec) -> tuple[str, dict]:
    spec = gguf_spec(spec)
    path = local_dir(spec)
    kwargs: dict = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return (str(path) if path else spec.name), kwargs


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    check_model_files(spec)
    name, kwargs = _source(spec)
    try:
        with gguf_metadata_memo():  # a GGUF's vocabulary: read from its metadata, no weights
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of '{spec.name}': {str(e).splitlines()[0]}",
                         where="model.name", fix="pass a model directory with tokenizer files, or a cached hub id") from None
    if len(tokenizer) == 0 or tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
        raise ModelError(f"the tokenizer of '{spec.name}' is empty or has no EOS token", where="model.name",
                         fix="check the tokenizer files")
    if tasks.task(spec.task).per_word and prefix_space_for_words(tokenizer):
        log.info(f"tokenizer: byte-level BPE given words one by one ({spec.task}): add_prefix_space on, so that each "
                 "word is tokenized as in running text (saved with the adapter)")
    return tokenizer


def prefix_space_for_words(tokenizer) -> bool:
    """Byte-level BPE (RoBERTa, GPT-2, BART) keeps a word's leading space inside its first token ("Ġworld"); words
    handed over one by one (token_cls, is_split_into_words) lose it, so every word would be tokenized as if it
    began the text, unlike anything pretraining saw (transformers 5 no longer refuses this). Turns on the
    add_prefix_space of a tokenizer whose pre-tokenizer is ByteLevel alone; True when it changed it. A ByteLevel
    inside a Sequence (a regex Split first, as Llama 3) is left as it is: a prefix there would go before every
    piece of the split, not only before each word."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    doc = json.loads(backend.to_str())
    pre = doc.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        return False
    from tokenizers import Tokenizer

    pre["add_prefix_space"] = True
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(doc))
    tokenizer.add_prefix_space = True
    return True


def load_model(spec: ModelSpec, quant: QuantizationSpec | None, dtype: str, *, num_labels: int | None = None,
               label_names: list[str] | None = None, pad_token_id: int | None = None, device: str | None = None,
               with_tokenizer: bool = True, sharded: str | None = None, attn_implementation: str | None = None):
    """The base model in *dtype* (policies.weights_dtype), on the GPU when there is one (unless *device* is
    "cpu"), quantized through bitsandbytes when *quant* asks for it (then made CPU-safe), with
    *attn_implementation* (policies.attention; None: transformers' default). A local
    directory must hold tokenizer files too unless *with_tokenizer* is False (merge needs weights only).
    *sharded* (distributed.sharding: "fsdp", "zero3"): loaded as that strategy intends (distributed.loading_kwargs),
    never whole onto every GPU."""
    import torch

    check_model_files(spec, tokenizer=with_tokenizer)
    name, kwargs = _source(spec)
    kwargs["dtype"] = getattr(torch, dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    quantized = quant is not None and quant.bits is not None
    if quantized:
        # Sharded weights (FSDP, ZeRO-3) are stored in the compute dtype, so that they shard with the 16-bit ones.
        kwargs["quantization_config"] = bnb_config(quant, fsdp=sharded is not None)
    place = (device or policies.this_device()) if torch.cuda.is_available() else "cpu"
    if place == "cuda":
        torch.cuda.set_device(distributed.local_rank())  # under torchrun each rank owns one GPU, not cuda:0
    kwargs.update(distributed.loading_kwargs(sharded, device=place))
    if not getattr(spec, "allow_pickle", False) and not kwargs.get("gguf_file"):
        kwargs["use_safetensors"] = True  # a hub checkpoint too: pickles run code when unpickled
    if tasks.task(spec.task).labelled:
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
            # A checkpoint whose own head has another number of classes: that head is drawn afresh (it is
            # trained in full anyway), instead of failing on its shape.
            kwargs["ignore_mismatched_sizes"] = True
        if label_names:
            names = list(label_names) + [f"LABEL_{i}" for i in range(len(label_names), num_labels or 0)]
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    try:
        model = tasks.auto_model_class(spec.task).from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if attn_implementation and any(w in first.lower() for w in ("attention", "flash")):
            # What check_attention cannot see before loading (e.g. a GPU too old for the kernel).
            other = "sdpa" if attn_implementation.startswith("flash") else "auto (transformers' default)"
            raise ModelError(f"cannot load '{spec.name}' with attn_implementation {attn_implementation}: {first}",
                             where="model.attn_implementation", fix=f"set model.attn_implementation: {other}") from None
        if isinstance(e, ImportError):
            raise
        if kwargs.get("use_safetensors") and "safetensors" in str(e).lower():
            raise ModelError(f"'{spec.name}' has no safetensors weights, only pickles ({first})", where="model.name",
                             fix="convert it to safetensors, or set model.allow_pickle: true (read with "
                                 "weights_only)") from None
        raise ModelError(f"cannot load '{spec.name}' as {spec.task}: {first}", where="model.name",
                         fix="check model.name and model.task") from None
    if quantized:
        cpu_safe(model)
    if spec.base_id and spec.base_id != name:
        # What peft records as the adapter's base (base_model_name_or_path, its README's base_model): the
        # hub id, not a local path.
        model.name_or_path = model.config.name_or_path = spec.base_id
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds each row's last token through pad_token_id.
        model.config.pad_token_id = pad_token_id
    return model


# ----------------------------------------------------------------------------------------------
# Base + adapter, for everything after training


def base_spec(source: AdapterSource) -> tuple[ModelSpec, QuantizationSpec | None, TrainingSpec | None]:
    """(the base as the run loaded it, its quantization, its training section) for an adapter.

    The run's recipe when the adapter sits in a run directory (revision, trust_remote_code, dtype,
    quantization), always with the adapter's recorded base (or --base, which drops the run's revision);
    else adapter_config.json alone (also when the run's recipe no longer validates).

    A run on a local base records its hub id when one is known (model.base_id, a GGUF's metadata): the
    run's recipe still names the local model, and that is what is reloaded here. A GGUF base is its cached
    conversion, rebuilt from the GGUF the recipe names when the directory was deleted.

    The base's own code runs only with the command's consent (remote_code_rule)."""
    spec, quant, training = _recorded_base(source)
    return remote_code_rule(spec, source), quant, training


def _recorded_base(source: AdapterSource) -> tuple[ModelSpec, QuantizationSpec | None, TrainingSpec | None]:
    recorded = source.config.get("base_model_name_or_path")
    try:
        recipe = source.run_recipe()
    except LorafitError:
        recipe = None
    task = source.task.name
    if recipe is not None:
        local = _run_local_base(recipe.model, recorded) if source.base == recorded else None
        if local is not None:
            return local.model_copy(update={"task": task}), recipe.quantization, recipe.training
        update = {"name": source.base, "task": task, "gguf_file": None}
        if source.base != recorded:
            update.update(revision=None, base_id=None)
        spec, quant, training = recipe.model.model_copy(update=update), recipe.quantization, recipe.training
    else:
        revision = source.config.get("revision") if source.base == recorded else None
        spec, quant, training = ModelSpec(name=source.base, task=task, revision=revision), None, None
    if is_gguf_cache(spec.name) and not Path(spec.name).is_dir():
        raise ModelError(f"the base model {spec.name} was a GGUF file dequantized by lorafit, and that directory "
                         "has been deleted", where=str(source.adapter_dir),
                         fix="use the adapter inside its run directory (its recipe.yaml names the GGUF, which is "
                             "converted again), or pass the base model with --base (a .gguf file works)")
    return materialize_gguf(spec), quant, training  # --base FILE.gguf: converted (once) too


def _run_local_base(model: ModelSpec, recorded: str | None) -> ModelSpec | None:
    """The local model a run's recipe names, when the adapter's recorded base stands for it (its GGUF
    conversion, or the hub id recorded in its place); None when the recorded base is to be loaded."""
    try:
        model = gguf_spec(model)
        if model.gguf_file:
            if is_gguf_cache(recorded):
                if (Path(recorded) / "config.json").is_file():  # exactly the directory training used
                    return model.model_copy(update={"name": recorded, "gguf_file": None})
                log.info(f"model: the adapter's base {recorded} was deleted; converting {model.gguf_file} again")
                return materialize_gguf(model)
            hub = model.base_id or gguf_hub_id(gguf_metadata(gguf_path(model)))
            return materialize_gguf(model) if recorded and recorded == hub else None
        if model.base_id and recorded == model.base_id and local_dir(model) is not None:
            return model
    except ModelError as e:
        if is_gguf_cache(recorded):
            raise ModelError(f"the adapter's base {recorded} (dequantized from {model.gguf_file}) was deleted and "
                             f"cannot be rebuilt: {e.message}", where="base model",
                             fix="pass the base model with --base") from None
        return None  # the local model is gone: the recorded hub id is loaded instead
    return None


def adapter_hub_base(source: AdapterSource) -> str | None:
    """The hub id an adapter's base stands for, for what leaves the machine (push): the recorded base
    when it is one; else the run recipe's model.base_id, the hub id in its GGUF's metadata, or the one
    the recorded GGUF conversion noted; None when nothing on this machine knows it."""
    recorded = source.config.get("base_model_name_or_path")
    if hub_id(recorded):
        return recorded
    model = (source.recipe or {}).get("model") or {}
    if hub_id(model.get("base_id")):
        return model["base_id"]
    try:
        if model.get("name") and (model.get("gguf_file") or is_gguf_name(model["name"])):
            found = gguf_hub_id(gguf_metadata(gguf_path(ModelSpec(name=model["name"], gguf_file=model.get("gguf_file")))))
            if found:
                return found
    except (ModelError, ValueError):
        pass
    return hub_id((gguf_source(recorded) if recorded and is_gguf_cache(recorded) else {}).get("hub_id"))


def saved_num_labels(source: AdapterSource) -> int | None:
    """Classes of the head the adapter saved in full (seq_cls / token_cls), read from its weights' header."""
    if not source.task.labelled:
        return None
    weights = source.adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    header = read_header(weights)
    heads = [k for k, t in header.items() if not is_lora_key(k) and k.endswith(".weight")
             and set(k.split(".")) & set(source.task.heads) and len(t.shape) == 2]
    # RoBERTa-style heads are dense → out_proj: the last matrix gives the classes.
    heads.sort(key=lambda k: k.endswith("out_proj.weight"))
    return int(header[heads[-1]].shape[0]) if heads else None


def saved_label_names(source: AdapterSource) -> list[str] | None:
    """The class names a seq_cls / token_cls adapter was trained with (config.json beside it: id2label)."""
    if not source.task.labelled:
        return None
    try:
        config = json.loads((source.adapter_dir / "config.json").read_text(encoding="utf-8"))
        id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return None
    return [id2label[i] for i in range(len(id2label))] if set(id2label) == set(range(len(id2label))) else None


def load_adapter_tokenizer(source: AdapterSource, base: ModelSpec | None = None):
    """The tokenizer the adapter was trained with (saved beside it: pad token, chat template), else the
    base's (*base*: its base_spec, when the caller has it already)."""
    from transformers import AutoTokenizer

    if has_tokenizer(source.adapter_dir):
        return AutoTokenizer.from_pretrained(str(source.adapter_dir))
    return load_tokenizer(base or base_spec(source)[0])


def load_adapted(source: AdapterSource, *, dtype: str | None = None, quantized: bool = True,
                 device: str | None = None, num_labels: int | None = None, label_names: list[str] | None = None,
                 with_tokenizer: bool = True, adapter_name: str = "default", trust_remote_code: bool = False):
    """Base + adapter, unmerged, in eval mode: the one loader of evaluate, generate, merge, verify and serve.

    The base is the adapter's recorded one (or --base), loaded with the run's revision and
    trust_remote_code, in *dtype* (default: the dtype training used on this machine), quantized as in
    training unless *quantized* is False (merge: never into a 4-bit model), on the GPU when there is one
    unless *device* is "cpu". Returns (model, tokenizer); the tokenizer is None without *with_tokenizer*.
    *trust_remote_code* (serve's --trust-remote-code) runs the base's own code even when the run did not ask.
    """
    import warnings

    from peft import PeftModel

    with trusting_remote_code(trust_remote_code or remote_code_allowed()):  # serve passes its flag
        spec, quant, training = base_spec(source)
    quant = quant if quantized and quant is not None and quant.bits is not None else None
    if dtype is None:
        try:
            precision = policies.precision(training or TrainingSpec())
        except ModelError:  # trained in fp16 on a GPU, reloaded on a CPU: fp32 here
            precision = "fp32"
        dtype = policies.weights_dtype(spec, quant or QuantizationSpec(), precision)
    tokenizer = load_adapter_tokenizer(source, spec) if with_tokenizer else None
    model = load_model(spec, quant, dtype, num_labels=num_labels or saved_num_labels(source),
                       label_names=label_names or saved_label_names(source), pad_token_id=tokenizer.pad_token_id if tokenizer else None,
                       device=device, with_tokenizer=with_tokenizer)
    if not quantized and getattr(model.config, "quantization_config", None):
        raise ModelError("the base checkpoint is itself quantized; merging into it would lose the adapter's "
                         "precision", where=source.base, fix="pass the unquantized original model with --base")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False,
                                              adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"the adapter does not fit the base model: {' '.join(first[:3])[:300]}",
                         where=f"base model {source.base}",
                         fix="pass the base model the adapter was trained on with --base") from None
    return model.eval(), tokenizer


def load_beside(model, source: AdapterSource, adapter_name: str, *, where: str) -> None:
    """Another adapter of the same base loaded beside those *model* (a PeftModel) holds, under *adapter_name*
    (peft load_adapter): generate's and blend's several adapters. One that does not fit is ModelError at *where*."""
    try:
        model.load_adapter(str(source.adapter_dir), adapter_name=adapter_name, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(f"the adapter does not fit the base model: {str(e).strip()[:300]}", where=where,
                         fix="give adapters trained on the same base") from None


def load_for_inference(model_or_adapter: str | Path, *, trust_remote_code: bool = False):
    """(model, tokenizer, recipe or None) ready for generation (generate, serve): base + adapter when given an
    adapter or run dir, else a plain model (a local dir, a .gguf file, builtin:NAME or a cached hub id)."""
    trust_remote_code = trust_remote_code or remote_code_allowed()  # the command's --trust-remote-code
    if holds_adapter(model_or_adapter):
        source = find_adapter(model_or_adapter)
        model, tokenizer = load_adapted(source, trust_remote_code=trust_remote_code)
        return model, tokenizer, source.run_recipe()
    spec = ModelSpec(name=str(model_or_adapter), trust_remote_code=trust_remote_code)
    warn_remote_code(spec, why="--trust-remote-code")
    if is_builtin(spec.name):  # builtin:NAME: its packaged GGUF file
        spec = ModelSpec(name=str(builtin_gguf(spec.name, where="MODEL")[0]))
    path = local_path(spec.name, where=str(model_or_adapter))
    if path is not None and path.is_file() and is_gguf_name(spec.name):
        spec = materialize_gguf(spec)  # a .gguf file: its cached plain conversion
    elif path is not None and not (path / "config.json").is_file():
        raise ModelError("neither a model, an adapter nor a run directory", where=str(model_or_adapter),
                         fix="pass a run dir, an adapter dir, a local model dir, a .gguf file or a cached hub id")
    tokenizer = load_tokenizer(spec)
    dtype = policies.weights_dtype(spec, QuantizationSpec(), policies.precision(TrainingSpec()))
    model = load_model(spec, None, dtype, pad_token_id=tokenizer.pad_token_id)
    return model.eval(), tokenizer, None


def attention_implementation(model) -> str:
    """The attention implementation a loaded model (or peft model) runs with, as transformers resolved it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) or "eager"
