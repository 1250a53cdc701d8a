"""A LoRA adapter folded into its base model: a plain model directory (sharded safetensors, config with the
right dtype, generation config, tokenizer, no LoRA keys). `lorafit merge` writes it for the user (checks,
--verify, the report: commands/merge.py); `lorafit export --to gguf` merges in float32 before llama.cpp's
converter reads it.

The base is always reloaded in 16/32-bit (never 4- or 8-bit, even for a QLoRA adapter). Two ways, same result:
  normal      load base + adapter with peft, ``merge_and_unload``, ``save_pretrained``  (RAM ≈ one base)
  low memory  stream the base checkpoint tensor by tensor, add each LoRA delta, write shard by shard
              (RAM ≈ one output shard: core/merge_streaming.py)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lorafit.core.adapters import AdapterSource
from lorafit.core.hub import local_path
from lorafit.core.merge_streaming import checkpoint_key, merge_streaming
from lorafit.core.models import TOKENIZER_FILES, base_spec, has_tokenizer, load_adapted
from lorafit.core.weights import LoraModule, adapter_weights, is_lora_key, lora_modules, model_index, read_header, \
    tensor_shapes
from lorafit.errors import ModelError

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_SHARD_BYTES = 2 * 10**9  # save_pretrained's "2GB"


def merge_adapter(source: AdapterSource, out: Path, *, dtype: str, low_memory: bool = False,
                  max_shard_size: int = DEFAULT_SHARD_BYTES) -> None:
    """Merge *source* into its base and write the model into the directory *out* (made when missing): the base's
    files found and checked against the adapter first, then write_merged."""
    base_dir = base_files(source)
    check_shapes(source, base_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_merged(source, base_dir, out, dtype=dtype, low_memory=low_memory, max_shard_size=max_shard_size)


def base_files(source: AdapterSource) -> Path:
    """The base model's files on disk: a local directory (the run's local copy of a GGUF base included), or the
    hub cache (offline mode respected): at the run's pinned revision (model.revision, recorded with the adapter),
    which the normal and the --low-memory merge both read, and safetensors only unless the run's model.allow_pickle
    (a pickle can run code when it is read)."""
    spec = base_spec(source)[0]
    base = spec.name
    try:
        path = local_path(base, where=base)
    except ModelError:
        path = Path(base)
    if path is not None:
        if path.is_dir():
            return path
        raise ModelError("base model directory not found", where=base,
                         fix="pass the base model the adapter was trained on with --base (hub id or directory)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"] + (["*.bin"] if spec.allow_pickle else [])
    try:
        folder = Path(snapshot_download(base, revision=spec.revision, allow_patterns=patterns))
    except Exception as e:  # offline without a cached copy, no such repo, gated, ...
        raise ModelError(f"base model not found ({type(e).__name__}: {str(e).splitlines()[0][:200]})", where=base,
                         fix="pass a local model directory with --base, or download it first (unset HF_HUB_OFFLINE)") from None
    if not spec.allow_pickle and not any(folder.glob("*.safetensors")):
        raise ModelError(f"{base}{f' at revision {spec.revision}' if spec.revision else ''} has no safetensors "
                         "weights, only pickles, which can run code when they are read", where=base,
                         fix="pass a safetensors copy with --base, or set model.allow_pickle: true in the run's recipe")
    return folder


def adapted_modules(source: AdapterSource) -> dict[str, LoraModule]:
    """Adapted module path (as in the base model) → its LoRA factors' shapes, read from the file header."""
    return {m.path: m for m in lora_modules(read_header(adapter_weights(source.adapter_dir))).values()
            if not m.embedding}


def check_shapes(source: AdapterSource, base_dir: Path) -> None:
    """Refuse a base whose weights do not fit the adapter, before loading anything big."""
    index = model_index(base_dir)
    if not index:
        return  # .bin-only checkpoint: peft's own load reports mismatches
    fan_in_fan_out = bool(source.config.get("fan_in_fan_out"))
    modules = adapted_modules(source)
    missing = [m for m in modules if checkpoint_key(m, index) is None]
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    # Only when even the leaf names are absent: transformers may rename checkpoint prefixes on load.
    if modules and len(missing) == len(modules) and not any(f".{leaf}." in f".{k}" for k in index for leaf in leaves):
        raise ModelError(f"none of the adapter's {len(modules)} LoRA modules (e.g. {missing[0]}) exist in the base "
                         f"model", where=f"base model {source.base}",
                         fix="pass the base model the adapter was trained on with --base")
    for module, factors in modules.items():
        key = checkpoint_key(module, index)
        if key is None or factors.b is None:
            continue
        shape = index[key][1]
        want = (factors.b[0], factors.a[1])
        if fan_in_fan_out:
            want = want[::-1]
        if len(shape) == 2 and shape != want:
            raise ModelError(f"{module} is {shape[0]}×{shape[1]} in the base model but the adapter expects "
                             f"{want[0]}×{want[1]}", where=f"base model {source.base}",
                             fix="pass the base model the adapter was trained on with --base")


def write_merged(source: AdapterSource, base_dir: Path, out: Path, *, dtype: str, low_memory: bool = False,
                 max_shard_size: int = DEFAULT_SHARD_BYTES) -> None:
    """The merged model into the existing directory *out*: weights, config, the adapter's tokenizer (else the
    base's); RuntimeError (ours) when a LoRA tensor is left in it."""
    quiet_transformers()
    if low_memory:
        merge_streaming(source, base_dir, out, dtype=dtype, max_shard_size=max_shard_size)
    else:
        model, _ = load_adapted(source, dtype=dtype, quantized=False, device="cpu", with_tokenizer=False)
        model = model.merge_and_unload()
        model.save_pretrained(out, max_shard_size=max_shard_size)
        del model
    _copy_tokenizer(source, base_dir, out)
    leaked = [k for p in out.glob("*.safetensors") for k in tensor_shapes(p) if is_lora_key(k)]
    if leaked:
        raise RuntimeError(f"merged checkpoint still holds LoRA tensors: {leaked[:3]}")


def quiet_transformers() -> None:
    # Four loads per verified merge: their progress bars drown the few lines that matter.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _copy_tokenizer(source: AdapterSource, base_dir: Path, out: Path) -> None:
    """The adapter's tokenizer (lorafit saves it, it may have added tokens), else the base's."""
    src = source.adapter_dir if has_tokenizer(source.adapter_dir) else base_dir
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)
