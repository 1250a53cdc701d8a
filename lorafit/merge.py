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
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit import log
from lorafit.errors import ModelError

DTYPES = ("bfloat16", "float16", "float32")
# Max |logit difference| merged vs base+adapter allowed, relative to the largest |logit| (at least 1).
# fp32 merges are exact up to summation order. 16-bit merges round W + ΔW where base+adapter rounds W·x and
# ΔW·x apart: on the tiny test model that alone moves bf16 logits by ~6 % of the largest (fp16: ~0.4 %).
TOLERANCE = {"float32": 1e-5, "float16": 3e-2, "bfloat16": 1.5e-1}
PPL_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # relative perplexity difference
REPORT_FILE = "merge_report.json"
BUILTIN_PROMPTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time, a small model learned to answer questions about the weather and colours.",
]
MAX_PROMPTS, MAX_PROMPT_TOKENS = 4, 64
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


@dataclass
class AdapterSource:
    """An adapter directory, the run directory around it (when lorafit made it), and its config."""

    adapter_dir: Path
    run_dir: Path | None
    config: dict
    base: str

    @property
    def recipe(self) -> dict | None:
        if self.run_dir is None or not (self.run_dir / "recipe.yaml").is_file():
            return None
        import yaml

        return yaml.safe_load((self.run_dir / "recipe.yaml").read_text(encoding="utf-8")) or {}

    @property
    def auto_class(self) -> str:
        return TASK_CLASSES.get(self.config.get("task_type") or "CAUSAL_LM", "AutoModelForCausalLM")


def find_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """An adapter dir or a run dir (its adapter/) → AdapterSource. Raises ModelError."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
        run_dir = path.parent if (path.parent / "recipe.yaml").is_file() else None
    elif (path / "adapter" / "adapter_config.json").is_file():
        adapter_dir, run_dir = path / "adapter", path
    else:
        what = "does not exist" if not path.exists() else "has no adapter_config.json (nor adapter/adapter_config.json)"
        raise ModelError(f"{what}", where=str(path),
                         fix="pass an adapter directory saved by peft/lorafit, or a lorafit run directory")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"not valid JSON ({e})", where=str(adapter_dir / "adapter_config.json")) from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelError(f"a {config.get('peft_type')} adapter, not LoRA", where=str(adapter_dir / "adapter_config.json"),
                         fix="lorafit merges LoRA adapters only")
    name = base or config.get("base_model_name_or_path")
    if not name:
        raise ModelError("adapter_config.json names no base model", where=str(adapter_dir),
                         fix="pass the base model with --base")
    return AdapterSource(adapter_dir, run_dir, config, str(name))


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
    missing = [m for m in modules if _checkpoint_key(m, index) is None]
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    # Only when even the leaf names are absent: transformers may rename checkpoint prefixes on load.
    if modules and len(missing) == len(modules) and not any(f".{leaf}." in f".{k}" for k in index for leaf in leaves):
        raise ModelError(f"none of the adapter's {len(modules)} LoRA modules (e.g. {missing[0]}) exist in the base "
                         f"model", where=f"base model {source.base}",
                         fix="pass the base model the adapter was trained on with --base")
    for module, ab in modules.items():
        key = _checkpoint_key(module, index)
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
# Low-memory merge: tensor by tensor, shard by shard

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_header(path: Path) -> dict:
    """A safetensors file's tensor table (name → dtype, shape, data_offsets), without reading the data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    for info in header.values():
        info["start"] = 8 + n + info["data_offsets"][0]
    return header


def checkpoint_index(model_dir: Path) -> dict[str, tuple[Path, dict]]:
    """Tensor name → (file, header entry) over all safetensors files of a model directory."""
    index: dict[str, tuple[Path, dict]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in read_header(path).items():
            index[name] = (path, info)
    return index


def _read_tensor(f, info: dict):
    import torch

    f.seek(info["start"])
    begin, end = info["data_offsets"]
    data = bytearray(f.read(end - begin))
    dtype = getattr(torch, _ST_DTYPES[info["dtype"]])
    if not data:
        return torch.empty(info["shape"], dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(info["shape"])


def _checkpoint_key(module: str, index: dict, suffix: str = "weight") -> str | None:
    # Checkpoints sometimes omit the base-model prefix (gpt2's "h.0..." vs the module path "transformer.h.0...").
    candidates = [module, module.split(".", 1)[1] if "." in module else module]
    for cand in candidates:
        if f"{cand}.{suffix}" in index:
            return f"{cand}.{suffix}"
    return None


def _scaling(config: dict, module: str, r: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = config.get("lora_alpha", 8)
    pattern = config.get("alpha_pattern") or {}
    if pattern:
        alpha = pattern.get(get_pattern_key(list(pattern), module), alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def merge_streaming(source: AdapterSource, base_dir: Path, out: Path, *, dtype: str, max_shard_size: int) -> None:
    """Read the base tensor by tensor, add ΔW = scale·B·A where the adapter has one, write shards."""
    import torch
    from safetensors import safe_open

    cfg = source.config
    if cfg.get("use_dora") or cfg.get("lora_bias"):
        raise ModelError("--low-memory does not handle DoRA or lora_bias adapters", where=str(source.adapter_dir),
                         fix="merge without --low-memory")
    index = checkpoint_index(base_dir)
    if not index:
        raise ModelError("--low-memory needs a safetensors checkpoint", where=source.base,
                         fix="merge without --low-memory")
    target = getattr(torch, dtype)
    adapter_path = source.adapter_dir / "adapter_model.safetensors"
    deltas: dict[str, tuple[str, float]] = {}  # checkpoint key → (module, scale)
    replace: dict[str, str] = {}  # checkpoint key → adapter key (modules_to_save, trained biases)
    for key in read_header(adapter_path):
        m = re.match(r"^base_model\.model\.(.+)\.lora_(A|B)\.weight$", key)
        if m:
            if m.group(2) == "A":
                ck = _checkpoint_key(m.group(1), index)
                if ck is None:
                    raise ModelError(f"adapted module {m.group(1)} has no weight in the base checkpoint",
                                     where=source.base, fix="pass the base model the adapter was trained on with --base")
                deltas[ck] = (m.group(1), 0.0)
            continue
        if "lora_" in key or not key.startswith("base_model.model."):
            raise ModelError(f"--low-memory does not know adapter tensor {key}", where=str(source.adapter_dir),
                             fix="merge without --low-memory")
        module, _, suffix = key.removeprefix("base_model.model.").rpartition(".")
        ck = _checkpoint_key(module, index, suffix)
        if ck is None:
            raise ModelError(f"adapter tensor {key} has no counterpart in the base checkpoint", where=source.base,
                             fix="merge without --low-memory")
        replace[ck] = key

    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    names = list(index)
    weight_map: dict[str, str] = {}
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:  # plan shards from the header sizes, in checkpoint order
        info = index[name][1]
        nbytes = math.prod(info["shape"]) * (target.itemsize if _is_float(info["dtype"]) else
                                             getattr(torch, _ST_DTYPES[info["dtype"]]).itemsize)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = 0
    with safe_open(str(adapter_path), "pt") as adapter:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            handles: dict[Path, object] = {}

            def produce(name, handles=handles):
                path, info = index[name]
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                t = adapter.get_tensor(replace[name]) if name in replace else _read_tensor(f, info)
                if list(t.shape) != list(info["shape"]):
                    raise ModelError(f"adapter tensor {replace[name]} is {list(t.shape)}, the base's {name} is "
                                     f"{list(info['shape'])}", where=str(source.adapter_dir),
                                     fix="pass the base model the adapter was trained on with --base")
                if name in deltas:
                    module = deltas[name][0]
                    a = adapter.get_tensor(f"base_model.model.{module}.lora_A.weight").float()
                    b = adapter.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
                    delta = (b @ a) * _scaling(cfg, module, a.shape[0])
                    t = t.float() + (delta.T if fan_in_fan_out else delta)
                return t.to(target) if t.is_floating_point() else t

            try:
                total += _write_safetensors(out / fname, shard, produce,
                                            {n: (index[n][1], target) for n in shard})
            finally:
                for f in handles.values():
                    f.close()
            weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
    _write_config(base_dir, out, dtype)


def _write_safetensors(path: Path, names: list[str], produce, plan: dict) -> int:
    """Write one safetensors file tensor by tensor: the header comes from the plan, so at most one
    tensor is in memory (safetensors' save_file would first build the whole file in RAM)."""
    import torch

    codes = {v: k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for name in names:
        info, target = plan[name]
        dtype = _ST_DTYPES[info["dtype"]]
        if _is_float(info["dtype"]):
            dtype = str(target).removeprefix("torch.")
        nbytes = math.prod(info["shape"]) * getattr(torch, dtype).itemsize
        header[name] = {"dtype": codes[dtype], "shape": info["shape"], "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            t = produce(name).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            del t
    return offset


def _is_float(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))


def _write_config(base_dir: Path, out: Path, dtype: str) -> None:
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", out / "generation_config.json")


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


# ----------------------------------------------------------------------------------------------
# Verification


def verify_merged(merged_dir: str | Path, source: AdapterSource, *, dtype: str) -> dict:
    """Logits and perplexity of the merged model vs base+adapter (and vs the quantized model for QLoRA).

    Models are loaded one at a time, so RAM stays at about one copy of the base.
    """
    import gc

    import torch
    import transformers

    prompts, prompt_source = eval_prompts(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(merged_dir))
    batch = [tokenizer(p, return_tensors="pt", truncation=True, max_length=MAX_PROMPT_TOKENS)["input_ids"]
             for p in prompts]
    causal = source.auto_class == "AutoModelForCausalLM"

    log.info(f"verifying on {len(prompts)} prompts ({prompt_source})")
    ref = _score(load_adapted(source, dtype), batch, causal)
    gc.collect()
    merged_model = getattr(transformers, source.auto_class).from_pretrained(str(merged_dir), dtype=getattr(torch, dtype))
    merged = _score(merged_model.eval(), batch, causal)
    del merged_model
    gc.collect()

    diff = max(float((a - b).abs().max()) for a, b in zip(ref["logits"], merged["logits"]))
    scale = max(1.0, max(float(a.abs().max()) for a in ref["logits"]))
    tol = TOLERANCE[dtype] * scale
    passed = math.isfinite(diff) and diff <= tol
    result = {"prompts": len(prompts), "prompt_source": prompt_source, "tokens": sum(int(b.numel()) for b in batch),
              "max_abs_logit_diff": diff, "tolerance": tol, "max_abs_logit": scale,
              "perplexity_adapter": ref["ppl"], "perplexity_merged": merged["ppl"], "quantized": None}
    if causal and ref["ppl"] is not None:
        rel = abs(merged["ppl"] - ref["ppl"]) / ref["ppl"]
        result["perplexity_rel_diff"] = rel
        passed = passed and math.isfinite(rel) and rel <= PPL_TOLERANCE[dtype]
    result["passed"] = bool(passed)

    quant = _training_quantization(source)
    if quant is not None:
        q = _score(_load_quantized_adapted(source, quant), batch, causal)
        gc.collect()
        result["quantized"] = {
            "bits": quant.bits, "quant_type": quant.quant_type if quant.bits == 4 else None,
            "max_abs_logit_diff": max(float((a - b).abs().max()) for a, b in zip(q["logits"], merged["logits"])),
            "perplexity_quantized": q["ppl"]}
    return result


def _score(model, batch, causal: bool) -> dict:
    import torch

    logits, nll, count = [], 0.0, 0
    with torch.no_grad():
        for ids in batch:
            out = model(input_ids=ids).logits.float()
            logits.append(out[0])
            if causal and ids.shape[1] > 1:
                loss = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum")
                nll += float(loss)
                count += ids.shape[1] - 1
    del model
    return {"logits": logits, "ppl": math.exp(nll / count) if count else None}


def _training_quantization(source: AdapterSource):
    """The recipe's quantization section when the adapter was trained on a quantized base, else None."""
    recipe = source.recipe
    if not recipe or not (recipe.get("quantization") or {}).get("bits"):
        return None
    from lorafit.recipe import QuantizationSpec

    return QuantizationSpec.model_validate(recipe["quantization"])


def _load_quantized_adapted(source: AdapterSource, spec):
    from lorafit.stages.quantize import bnb_config, silence_bitsandbytes

    import torch

    silence_bitsandbytes()
    # As training loaded it (stages/load.py): unquantized parts in fp32 on CPU, compute dtype on GPU.
    dtype = spec.compute_dtype if torch.cuda.is_available() else "float32"
    return load_adapted(source, dtype, quantization_config=bnb_config(spec))


def eval_prompts(source: AdapterSource) -> tuple[list[str], str]:
    """A few texts from the run's eval data (else its train data), or built-in text when unknown."""
    recipe = source.recipe or {}
    data = recipe.get("data") or {}
    for key in ("eval", "train"):
        path = _find_data_file(data.get(key), source.run_dir)
        if path is None:
            continue
        rows = _read_rows(path, MAX_PROMPTS if key == "eval" else None)
        if key == "train":
            rows = rows[-MAX_PROMPTS:]  # the held-out split is drawn at random; the tail is the nearest guess
        texts = [t for t in (_row_text(r, data) for r in rows) if t.strip()]
        if texts:
            return texts[:MAX_PROMPTS], f"{'eval' if key == 'eval' else 'train'} data {path.name}"
    return list(BUILTIN_PROMPTS), "built-in text"


def _find_data_file(name: str | None, run_dir: Path | None) -> Path | None:
    if not name:
        return None
    for cand in (Path(name), *((run_dir / name, run_dir.parent / name) if run_dir else ())):
        if cand.is_file() and cand.suffix in (".jsonl", ".json"):
            return cand
    return None


def _read_rows(path: Path, limit: int | None) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else []
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r, dict)]
    return rows[:limit] if limit else rows


def _row_text(row: dict, data: dict) -> str:
    cols = {"text": "text", "instruction": "instruction", "input": "input", "output": "output",
            "messages": "messages", "prompt": "prompt", "completion": "completion", **(data.get("columns") or {})}
    fmt = data.get("format", "text")
    if fmt == "alpaca":
        return " ".join(str(row.get(cols[k]) or "") for k in ("instruction", "input", "output"))
    if fmt == "completion":
        return f"{row.get(cols['prompt']) or ''}{row.get(cols['completion']) or ''}"
    if fmt == "chat":
        msgs = row.get(cols["messages"]) or []
        return "\n".join(str(m.get("content", "")) for m in msgs if isinstance(m, dict))
    return str(row.get(cols["text"]) or "")
