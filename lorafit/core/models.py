"""Models on disk and in memory: where a name points, its files, its tokenizer, its weights, its adapter.

One home for: "is this a hub id or a local path", which files make a tokenizer, loading a base (plain,
quantized, or from GGUF) for training, and loading base + adapter for inference (evaluate, generate,
merge, verify) with the same rules: the adapter's recorded base, revision, dtype, quantization, device.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lorafit import log
from lorafit.core import policies, tasks
from lorafit.core.adapters import AdapterSource
from lorafit.core.quantization import bnb_config, cpu_safe, silence_bitsandbytes
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
    or load pickles without a word."""
    path = local_dir(spec)
    if path is None:
        return
    if spec.gguf_file:
        gguf = Path(spec.gguf_file)
        if not (gguf.is_file() or (path / gguf).is_file()):
            raise ModelError(f"GGUF file not found: {spec.gguf_file} (looked in {path} and the working directory)",
                             where="model.gguf_file")
        return
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        if any(n.startswith("pytorch_model") and n.endswith((".bin", ".bin.index.json")) for n in names):
            log.warn(f"{path}: weights are a pytorch pickle (pytorch_model.bin), loaded with weights_only; "
                     "prefer safetensors")
        else:
            raise ModelError(f"{path} has config.json but no weights (*.safetensors or pytorch_model.bin)",
                             where="model.name", fix="point model.name at a complete model directory")
    if tokenizer and not any(n in names for n in TOKENIZER_VOCAB_FILES):
        raise ModelError(f"{path} has no tokenizer files (looked for {', '.join(TOKENIZER_VOCAB_FILES)})",
                         where="model.name", fix="save the tokenizer next to the weights (tokenizer.save_pretrained)")


def _source(spec: ModelSpec) -> tuple[str, dict]:
    path = local_dir(spec)
    kwargs: dict = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kwargs["gguf_file"] = spec.gguf_file
    return (str(path) if path else spec.name), kwargs


def gguf_cache_root() -> Path:
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(os.environ.get("LORAFIT_CACHE", str(Path(home) / "lorafit")))


def materialize_gguf(spec: ModelSpec) -> ModelSpec:
    """A GGUF checkpoint, dequantized once into a cached safetensors model directory.

    transformers refuses to train a model loaded from GGUF, and merge/peft need a plain base to reload:
    so training runs on the converted directory, which the adapter's config then names as its base.
    Returns *spec* unchanged when there is no gguf_file.
    """
    if not spec.gguf_file:
        return spec
    import torch

    check_model_files(spec)
    name, kwargs = _source(spec)
    auto_class = tasks.auto_model_class
    gguf = Path(spec.gguf_file) if Path(spec.gguf_file).is_file() else Path(name) / spec.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{spec.task}".encode()).hexdigest()[:16]
    out = gguf_cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if not (out / "config.json").is_file():
        log.info(f"model: dequantizing {gguf.name} once into {out}")
        tmp = out.with_name(out.name + f".partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        previous = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # transformers' raw dequantization bar
        try:
            from transformers import AutoTokenizer

            loaded = auto_class(spec.task).from_pretrained(name, dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            config = loaded.config
            for attr in ("quantization_config",):
                if hasattr(config, attr):
                    delattr(config, attr)
            # A fresh model from the config: no GGUF quantizer attached, ties re-made after loading.
            plain = auto_class(spec.task).from_config(config, dtype=torch.float32)
            plain.load_state_dict(loaded.state_dict(), strict=False)
            plain.tie_weights()
            plain.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if previous is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = previous
    return spec.model_copy(update={"name": str(out), "gguf_file": None})


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    check_model_files(spec)
    name, kwargs = _source(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of '{spec.name}': {str(e).splitlines()[0]}",
                         where="model.name", fix="pass a model directory with tokenizer files, or a cached hub id") from None
    if len(tokenizer) == 0 or tokenizer.eos_token_id is None and tokenizer.sep_token_id is None:
        raise ModelError(f"the tokenizer of '{spec.name}' is empty or has no EOS token", where="model.name",
                         fix="check the tokenizer files")
    return tokenizer


def load_model(spec: ModelSpec, quant: QuantizationSpec | None, dtype: str, *, num_labels: int | None = None,
               label_names: list[str] | None = None, pad_token_id: int | None = None, device: str | None = None,
               with_tokenizer: bool = True):
    """The base model in *dtype* (policies.weights_dtype), on the GPU when there is one (unless *device* is
    "cpu"), quantized through bitsandbytes when *quant* asks for it (then made CPU-safe). A local
    directory must hold tokenizer files too unless *with_tokenizer* is False (merge needs weights only)."""
    import torch

    check_model_files(spec, tokenizer=with_tokenizer)
    name, kwargs = _source(spec)
    kwargs["dtype"] = getattr(torch, dtype)
    quantized = quant is not None and quant.bits is not None
    if quantized:
        silence_bitsandbytes()
        kwargs["quantization_config"] = bnb_config(quant)
    if (device or policies.this_device()) == "cuda" and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if tasks.task(spec.task).labelled:
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if label_names:
            names = list(label_names) + [f"LABEL_{i}" for i in range(len(label_names), num_labels or 0)]
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    try:
        model = tasks.auto_model_class(spec.task).from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load '{spec.name}' as {spec.task}: {first}", where="model.name",
                         fix="check model.name and model.task") from None
    if quantized:
        cpu_safe(model)
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
    else adapter_config.json alone (also when the run's recipe no longer validates)."""
    recorded = source.config.get("base_model_name_or_path")
    try:
        recipe = source.run_recipe()
    except LorafitError:
        recipe = None
    task = source.task.name
    if recipe is not None:
        update = {"name": source.base, "task": task, "gguf_file": None}
        if source.base != recorded:
            update["revision"] = None
        return recipe.model.model_copy(update=update), recipe.quantization, recipe.training
    revision = source.config.get("revision") if source.base == recorded else None
    return ModelSpec(name=source.base, task=task, revision=revision), None, None


def saved_num_labels(source: AdapterSource) -> int | None:
    """Classes of the head the adapter saved in full (seq_cls / token_cls), read from its weights' header."""
    if not source.task.labelled:
        return None
    from safetensors import safe_open

    weights = source.adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    with safe_open(str(weights), "pt") as f:
        heads = [k for k in f.keys() if "lora_" not in k and k.endswith(".weight")
                 and set(k.split(".")) & set(source.task.heads) and len(f.get_slice(k).get_shape()) == 2]
        # RoBERTa-style heads are dense → out_proj: the last matrix gives the classes.
        heads.sort(key=lambda k: k.endswith("out_proj.weight"))
        return int(f.get_slice(heads[-1]).get_shape()[0]) if heads else None


def load_adapter_tokenizer(source: AdapterSource):
    """The tokenizer the adapter was trained with (saved beside it: pad token, chat template), else the base's."""
    from transformers import AutoTokenizer

    if has_tokenizer(source.adapter_dir):
        return AutoTokenizer.from_pretrained(str(source.adapter_dir))
    return load_tokenizer(base_spec(source)[0])


def load_adapted(source: AdapterSource, *, dtype: str | None = None, quantized: bool = True,
                 device: str | None = None, num_labels: int | None = None, label_names: list[str] | None = None,
                 with_tokenizer: bool = True):
    """Base + adapter, unmerged, in eval mode: the one loader of evaluate, generate, merge and verify.

    The base is the adapter's recorded one (or --base), loaded with the run's revision and
    trust_remote_code, in *dtype* (default: the dtype training used on this machine), quantized as in
    training unless *quantized* is False (merge: never into a 4-bit model), on the GPU when there is one
    unless *device* is "cpu". Returns (model, tokenizer); the tokenizer is None without *with_tokenizer*.
    """
    import warnings

    from peft import PeftModel

    spec, quant, training = base_spec(source)
    quant = quant if quantized and quant is not None and quant.bits is not None else None
    if dtype is None:
        try:
            precision = policies.precision(training or TrainingSpec())
        except ModelError:  # trained in fp16 on a GPU, reloaded on a CPU: fp32 here
            precision = "fp32"
        dtype = policies.weights_dtype(spec, quant or QuantizationSpec(), precision)
    tokenizer = load_adapter_tokenizer(source) if with_tokenizer else None
    model = load_model(spec, quant, dtype, num_labels=num_labels or saved_num_labels(source),
                       label_names=label_names, pad_token_id=tokenizer.pad_token_id if tokenizer else None,
                       device=device, with_tokenizer=with_tokenizer)
    if not quantized and getattr(model.config, "quantization_config", None):
        raise ModelError("the base checkpoint is itself quantized; merging into it would lose the adapter's "
                         "precision", where=source.base, fix="pass the unquantized original model with --base")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(source.adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"the adapter does not fit the base model: {' '.join(first[:3])[:300]}",
                         where=f"base model {source.base}",
                         fix="pass the base model the adapter was trained on with --base") from None
    return model.eval(), tokenizer
