"""`lorafit merge`: fold a LoRA adapter into its base model and prove the result.

The base is always reloaded in 16/32-bit (never 4- or 8-bit, even for a QLoRA adapter), the adapter is
merged, and a plain model directory is written: sharded safetensors, config with the right dtype,
generation config, tokenizer, no LoRA keys. Output goes to a temporary directory beside the target and
is renamed into place, so a failed merge leaves nothing half-written.

Two ways to merge, same result:
  normal      load base + adapter with peft, ``merge_and_unload``, ``save_pretrained``  (RAM ≈ one base)
  low memory  stream the base checkpoint tensor by tensor, add each LoRA delta, write shard by shard
              (RAM ≈ one output shard)
``--verify`` then loads base + adapter and the merged model (one at a time) and compares their logits
and perplexity on a few prompts; for a QLoRA-trained adapter it also measures the gap between the
merge and the quantized model the adapter was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorafit import log
from lorafit.commands.merge_streaming import checkpoint_key, merge_streaming
from lorafit.commands.verify import verify_merged
from lorafit.core.adapters import AdapterSource, find_adapter
from lorafit.core.files import atomic_dir
from lorafit.core.weights import LoraModule, is_lora_key, lora_modules, model_index, read_header, tensor_shapes
from lorafit.core.hub import local_path
from lorafit.core.models import TOKENIZER_FILES, base_spec, has_tokenizer, load_adapted
from lorafit.errors import ModelError

DTYPES = ("bfloat16", "float16", "float32")
REPORT_FILE = "merge_report.json"


# ----------------------------------------------------------------------------------------------
# The command


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, dtype: str = "bfloat16",
          verify: bool = False, low_memory: bool = False, max_shard_size: str | int = "2GB",
          overwrite: bool = False, force: bool = False) -> dict:
    """Merge an adapter into its base and write a plain model to *output* (*overwrite*: replacing a non-empty
    one; *force* is its old name). Returns the report dict."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}", where="--dtype", fix="use one of: " + ", ".join(DTYPES))
    source = find_adapter(adapter_dir, base)
    output = Path(output)
    _check_output(output, source, overwrite or force)
    shard_bytes = _parse_size(max_shard_size)
    _quiet_transformers()
    base_dir = _base_dir(base_spec(source)[0].name)  # local files (the run's local copy of a GGUF base): shapes check, streaming, config
    _check_shapes(source, base_dir)

    with atomic_dir(output, "merging") as tmp:  # a failed merge leaves nothing half-written
        log.info(f"merging {source.adapter_dir} into {source.base} ({dtype}{', low memory' if low_memory else ''})")
        if low_memory:
            merge_streaming(source, base_dir, tmp, dtype=dtype, max_shard_size=shard_bytes)
        else:
            _merge_in_memory(source, tmp, dtype=dtype, max_shard_size=shard_bytes)
        _copy_tokenizer(source, base_dir, tmp)
        _check_no_lora_keys(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        report = {"adapter": str(source.adapter_dir), "base": source.base, "output": str(output), "dtype": dtype,
                  "mode": "low_memory" if low_memory else "normal", "files": files,
                  "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
                  "lora_modules": len(_lora_modules(source))}
        if verify:
            report["verify"] = verify_merged(tmp, source, dtype=dtype)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            report["files"] = sorted(p.name for p in tmp.iterdir())
    return report


# ----------------------------------------------------------------------------------------------
# Checks before any work


def _check_output(output: Path, source: AdapterSource, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ModelError("exists and is not a directory", where=f"--output {output}", fix="choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ModelError("output directory is not empty", where=f"--output {output}",
                         fix="choose a new or empty directory, or pass --overwrite (formerly --force) to replace "
                             "its contents")
    resolved = output.resolve()
    for protected in (source.adapter_dir, source.run_dir, Path(source.base)):
        if protected is not None and protected.exists():
            p = protected.resolve()
            if resolved == p or resolved in p.parents:
                raise ModelError(f"would overwrite {protected}", where=f"--output {output}",
                                 fix="write the merged model to a directory of its own")


def _parse_size(size: str | int) -> int:
    """--max-shard-size as save_pretrained reads it (transformers' own parser: 500MB, 2GB, 5GiB)."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return max(1, int(convert_file_size_to_int(size)))
    except ValueError:
        raise ModelError(f"cannot read size {size!r}", where="--max-shard-size", fix="use e.g. 500MB, 2GB or 5GiB") from None


def _base_dir(base: str) -> Path:
    """The base model's files on disk: a local directory, or the hub cache (offline mode respected)."""
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

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja", "*.bin"]))
    except Exception as e:  # offline without a cached copy, no such repo, gated, ...
        raise ModelError(f"base model not found ({type(e).__name__}: {str(e).splitlines()[0][:200]})", where=base,
                         fix="pass a local model directory with --base, or download it first (unset HF_HUB_OFFLINE)") from None


def _lora_modules(source: AdapterSource) -> dict[str, LoraModule]:
    """Adapted module path (as in the base model) → its LoRA factors' shapes, read from the file header."""
    return {m.path: m for m in lora_modules(read_header(_adapter_weights(source.adapter_dir))).values()
            if not m.embedding}


def _adapter_weights(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        bins = adapter_dir / "adapter_model.bin"
        fix = "re-save it with safetensors (peft's save_pretrained does by default)" if bins.is_file() else \
            "the directory must hold the adapter weights saved by peft"
        raise ModelError("no adapter_model.safetensors", where=str(adapter_dir), fix=fix)
    return path


def _check_shapes(source: AdapterSource, base_dir: Path) -> None:
    """Refuse a base whose weights do not fit the adapter, before loading anything big."""
    index = model_index(base_dir)
    if not index:
        return  # .bin-only checkpoint: peft's own load reports mismatches
    fan_in_fan_out = bool(source.config.get("fan_in_fan_out"))
    modules = _lora_modules(source)
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


# ----------------------------------------------------------------------------------------------
# Normal merge: peft in memory


def _merge_in_memory(source: AdapterSource, out: Path, *, dtype: str, max_shard_size: int) -> None:
    model, _ = load_adapted(source, dtype=dtype, quantized=False, device="cpu", with_tokenizer=False)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size=max_shard_size)
    del model


def _quiet_transformers() -> None:
    # Four loads per verified merge: their progress bars drown the few lines that matter.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Finishing the output directory


def _copy_tokenizer(source: AdapterSource, base_dir: Path, out: Path) -> None:
    """The adapter's tokenizer (lorafit saves it, it may have added tokens), else the base's."""
    src = source.adapter_dir if has_tokenizer(source.adapter_dir) else base_dir
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def _check_no_lora_keys(out: Path) -> None:
    leaked = [k for p in out.glob("*.safetensors") for k in tensor_shapes(p) if is_lora_key(k)]
    if leaked:
        raise RuntimeError(f"merged checkpoint still holds LoRA tensors: {leaked[:3]}")
