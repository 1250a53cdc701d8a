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
import os
import re
import shutil
import tempfile
from pathlib import Path

from lorafit import log
from lorafit.adapters import AdapterSource, find_adapter
from lorafit.errors import ModelError
from lorafit.merge_streaming import checkpoint_index, checkpoint_key, merge_streaming, read_header

DTYPES = ("bfloat16", "float16", "float32")
REPORT_FILE = "merge_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


# ----------------------------------------------------------------------------------------------
# The command


def merge(adapter_dir: str | Path, output: str | Path, *, base: str | None = None, dtype: str = "bfloat16",
          verify: bool = False, low_memory: bool = False, max_shard_size: str | int = "2GB",
          force: bool = False) -> dict:
    """Merge an adapter into its base and write a plain model to *output*. Returns the report dict."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}", where="--dtype", fix="use one of: " + ", ".join(DTYPES))
    source = find_adapter(adapter_dir, base)
    output = Path(output)
    _check_output(output, source, force)
    shard_bytes = _parse_size(max_shard_size)
    _quiet_transformers()
    base_dir = _base_dir(source.base)  # local files: shapes check, low-memory streaming, config
    _check_shapes(source, base_dir)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.merging-", dir=output.parent))
    try:
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
            from lorafit.verify import verify_merged  # verify loads models through this module

            report["verify"] = verify_merged(tmp, source, dtype=dtype)
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            report["files"] = sorted(p.name for p in tmp.iterdir())
        _move_into_place(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def summary_lines(report: dict) -> list[str]:
    """What the CLI prints after a merge."""
    mb = report["bytes"] / 1e6
    lines = [f"merged {report['lora_modules']} LoRA modules of {report['adapter']} into {report['base']}",
             f"wrote {report['output']} ({report['dtype']}, {len(report['files'])} files, {mb:.1f} MB, "
             f"{report['mode'].replace('_', ' ')} mode)"]
    v = report.get("verify")
    if v:
        lines.append(f"verify on {v['prompts']} prompts ({v['prompt_source']}, {v['tokens']} tokens):")
        lines.append(f"  max |logit diff| merged vs base+adapter: {v['max_abs_logit_diff']:.3g} "
                     f"(tolerance {v['tolerance']:.3g})")
        if v.get("perplexity_adapter") is not None:
            lines.append(f"  perplexity base+adapter {v['perplexity_adapter']:.4f}, merged {v['perplexity_merged']:.4f}")
        q = v.get("quantized")
        if q:
            lines.append(f"  gap to the {q['bits']}-bit model it was trained on: max |logit diff| "
                         f"{q['max_abs_logit_diff']:.3g}, perplexity {q['perplexity_quantized']:.4f} (quantized) "
                         f"vs {v['perplexity_merged']:.4f} (merged)")
        lines.append(f"  {'passed' if v['passed'] else 'FAILED: merged model differs from base+adapter'}; "
                     f"details in {REPORT_FILE}")
    return lines


# ----------------------------------------------------------------------------------------------
# Checks before any work


def _check_output(output: Path, source: AdapterSource, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ModelError("exists and is not a directory", where=f"--output {output}", fix="choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise ModelError("output directory is not empty", where=f"--output {output}",
                         fix="choose a new or empty directory, or pass --force to replace its contents")
    resolved = output.resolve()
    for protected in (source.adapter_dir, source.run_dir, Path(source.base)):
        if protected is not None and protected.exists():
            p = protected.resolve()
            if resolved == p or resolved in p.parents:
                raise ModelError(f"would overwrite {protected}", where=f"--output {output}",
                                 fix="write the merged model to a directory of its own")


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ModelError(f"cannot read size {size!r}", where="--max-shard-size", fix="use e.g. 500MB, 2GB or 5GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return max(1, int(float(m.group(1)) * scale))


def _base_dir(base: str) -> Path:
    """The base model's files on disk: a local directory, or the hub cache (offline mode respected)."""
    if Path(base).is_dir():
        return Path(base)
    if Path(base).exists() or base.startswith((".", "/", "~")) or base.count("/") > 1:
        raise ModelError("base model directory not found", where=base,
                         fix="pass the base model the adapter was trained on with --base (hub id or directory)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                            "*.jinja", "*.bin"]))
    except Exception as e:  # offline without a cached copy, no such repo, gated, ...
        raise ModelError(f"base model not found ({type(e).__name__}: {str(e).splitlines()[0][:200]})", where=base,
                         fix="pass a local model directory with --base, or download it first (unset HF_HUB_OFFLINE)") from None


def _lora_modules(source: AdapterSource) -> dict[str, dict[str, tuple]]:
    """Adapted module path (as in the base model) → {'A': shape, 'B': shape}, read from the file header."""
    modules: dict[str, dict[str, tuple]] = {}
    for key, info in _adapter_header(source.adapter_dir).items():
        m = re.match(r"^base_model\.model\.(.+)\.lora_(A|B)\.weight$", key)
        if m:
            modules.setdefault(m.group(1), {})[m.group(2)] = tuple(info["shape"])
    return modules


def _adapter_header(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        bins = adapter_dir / "adapter_model.bin"
        fix = "re-save it with safetensors (peft's save_pretrained does by default)" if bins.is_file() else \
            "the directory must hold the adapter weights saved by peft"
        raise ModelError("no adapter_model.safetensors", where=str(adapter_dir), fix=fix)
    return read_header(path)


def _check_shapes(source: AdapterSource, base_dir: Path) -> None:
    """Refuse a base whose weights do not fit the adapter, before loading anything big."""
    index = checkpoint_index(base_dir)
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
    for module, ab in modules.items():
        key = checkpoint_key(module, index)
        if key is None or "A" not in ab or "B" not in ab:
            continue
        shape = tuple(index[key][1]["shape"])
        want = (ab["B"][0], ab["A"][1])
        if fan_in_fan_out:
            want = want[::-1]
        if len(shape) == 2 and shape != want:
            raise ModelError(f"{module} is {shape[0]}×{shape[1]} in the base model but the adapter expects "
                             f"{want[0]}×{want[1]}", where=f"base model {source.base}",
                             fix="pass the base model the adapter was trained on with --base")


# ----------------------------------------------------------------------------------------------
# Normal merge: peft in memory


def _merge_in_memory(source: AdapterSource, out: Path, *, dtype: str, max_shard_size: int) -> None:
    model = load_adapted(source, dtype)
    model = model.merge_and_unload()
    _save_model(model, out, max_shard_size)
    del model


def load_adapted(source: AdapterSource, dtype: str, quantization_config=None):
    """Base (reloaded in *dtype*, quantized only when asked for) + adapter, unmerged, in eval mode."""
    import warnings

    from peft import PeftModel

    base = load_base(source, dtype, quantization_config)
    if quantization_config is not None:
        from lorafit.stages.quantize import cpu_safe

        cpu_safe(base)
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = PeftModel.from_pretrained(base, str(source.adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()
        raise ModelError(f"the adapter does not fit the base model: {' '.join(first[:3])[:300]}",
                         where=f"base model {source.base}",
                         fix="pass the base model the adapter was trained on with --base") from None
    return model.eval()


def load_base(source: AdapterSource, dtype: str, quantization_config=None):
    import torch
    import transformers

    auto = getattr(transformers, source.auto_class)
    kwargs = {"dtype": getattr(torch, dtype)}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = auto.from_pretrained(source.base, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load the base model ({str(e).splitlines()[0][:200]})", where=source.base,
                         fix="pass a local model directory with --base") from None
    if quantization_config is None and getattr(model.config, "quantization_config", None):
        raise ModelError("the base checkpoint is itself quantized; merging into it would lose the adapter's precision",
                         where=source.base, fix="pass the unquantized original model with --base")
    return model.eval()


def _quiet_transformers() -> None:
    # Four loads per verified merge: their progress bars drown the few lines that matter.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _save_model(model, out: Path, max_shard_size: int) -> None:
    model.save_pretrained(out, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------------------------
# Finishing the output directory


def _copy_tokenizer(source: AdapterSource, base_dir: Path, out: Path) -> None:
    """The adapter's tokenizer (lorafit saves it, it may have added tokens), else the base's."""
    src = source.adapter_dir if any((source.adapter_dir / f).is_file() for f in TOKENIZER_FILES) else base_dir
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copy2(src / name, out / name)


def _check_no_lora_keys(out: Path) -> None:
    leaked = [k for p in out.glob("*.safetensors") for k in read_header(p) if "lora_" in k]
    if leaked:
        raise RuntimeError(f"merged checkpoint still holds LoRA tensors: {leaked[:3]}")


def _move_into_place(tmp: Path, output: Path) -> None:
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()
    if output.exists():  # --force: swap, then drop the old contents
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        os.replace(output, old / "x")
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, output)
