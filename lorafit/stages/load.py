"""Load stage: find the model, check its files, load tokenizer and weights (quantized when asked)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from lorafit import log
from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec, QuantizationSpec, TrainingSpec

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tiktoken.model")


def resolve_precision(training: TrainingSpec) -> str:
    """auto → bf16 on a GPU that supports it, else fp32 (CPU bf16 autocast is slower than fp32 on most CPUs)."""
    import torch

    if training.precision != "auto":
        if training.precision == "fp16" and not torch.cuda.is_available():
            raise ModelError("fp16 mixed precision needs a CUDA GPU", where="training.precision",
                             fix="use precision: bf16, fp32 or auto on CPU")
        return training.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def weights_dtype(spec: ModelSpec, precision: str):
    import torch

    if spec.dtype != "auto":
        return getattr(torch, spec.dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def local_dir(spec: ModelSpec) -> Path | None:
    path = Path(spec.name).expanduser()
    return path if path.is_dir() else None


def check_model_files(spec: ModelSpec) -> None:
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
    if not any(n in names for n in _TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})",
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

    from lorafit.targets import auto_class

    check_model_files(spec)
    name, kwargs = _source(spec)
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


def load_model(spec: ModelSpec, quant: QuantizationSpec, precision: str, *, num_labels: int | None = None,
               label_names: list[str] | None = None, pad_token_id: int | None = None):
    """The base model, on GPU when there is one, quantized through bitsandbytes when the recipe says so."""
    import torch

    from lorafit.targets import auto_class

    check_model_files(spec)
    name, kwargs = _source(spec)
    kwargs["dtype"] = weights_dtype(spec, precision)
    if quant.bits is not None:
        from lorafit.stages.quantize import bnb_config, silence_bitsandbytes

        silence_bitsandbytes()
        kwargs["quantization_config"] = bnb_config(quant)
        kwargs["dtype"] = getattr(torch, quant.compute_dtype) if torch.cuda.is_available() else torch.float32
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    if spec.task in ("seq_cls", "token_cls"):
        if num_labels is not None:
            kwargs["num_labels"] = num_labels
        if label_names:
            names = list(label_names) + [f"LABEL_{i}" for i in range(len(label_names), num_labels or 0)]
            kwargs["id2label"] = dict(enumerate(names))
            kwargs["label2id"] = {n: i for i, n in enumerate(names)}
    try:
        model = auto_class(spec.task).from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load '{spec.name}' as {spec.task}: {first}", where="model.name",
                         fix="check model.name and model.task") from None
    if pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        # Sequence classification finds each row's last token through pad_token_id.
        model.config.pad_token_id = pad_token_id
    return model
