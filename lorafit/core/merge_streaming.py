"""Low-memory merge: stream the base checkpoint tensor by tensor, add each LoRA delta, write shard by shard.

Names and shapes come from the headers (core.weights); tensors are read through safetensors' ``safe_open``,
one at a time, each through its own short-lived handle, so the memory map of a whole shard never stays
resident. Writing
is ours: safetensors' save_file would first build the whole shard in RAM. RAM stays near one tensor
plus the adapter.
Same result as peft's merge_and_unload: W + scale·B·A, with rsLoRA, alpha_pattern, GPT-2's transposed
Conv1D weights and modules_to_save handled.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

from lorafit.core.adapters import AdapterSource
from lorafit.core.weights import DTYPES, PEFT_PREFIX, is_lora_key, lora_factor, lora_modules, model_index, read_header
from lorafit.errors import ModelError


def _read_tensor(path: Path, name: str):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # closed at once: the map of the whole file is dropped
        return f.get_tensor(name)


def checkpoint_key(module: str, index: dict, suffix: str = "weight") -> str | None:
    """The base checkpoint's name for *module*'s *suffix* tensor (index: core.weights.model_index)."""
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
    index = model_index(base_dir)
    if not index:
        raise ModelError("--low-memory needs a safetensors checkpoint", where=source.base,
                         fix="merge without --low-memory")
    target = getattr(torch, dtype)
    adapter_path = source.adapter_dir / "adapter_model.safetensors"
    header = read_header(adapter_path)
    modules = lora_modules(header)
    deltas: dict[str, tuple[str, float]] = {}  # checkpoint key → (module, scale)
    replace: dict[str, str] = {}  # checkpoint key → adapter key (modules_to_save, trained biases)
    for module in modules.values():
        if module.embedding or not module.name.startswith(PEFT_PREFIX):
            raise ModelError(f"--low-memory does not know adapter module {module.name}", where=str(source.adapter_dir),
                             fix="merge without --low-memory")
        ck = checkpoint_key(module.path, index)
        if ck is None:
            raise ModelError(f"adapted module {module.path} has no weight in the base checkpoint",
                             where=source.base, fix="pass the base model the adapter was trained on with --base")
        deltas[ck] = (module.path, 0.0)
    for key in header:
        found = lora_factor(key)
        if found and found[0] in modules:
            continue
        if is_lora_key(key) or not key.startswith(PEFT_PREFIX):
            raise ModelError(f"--low-memory does not know adapter tensor {key}", where=str(source.adapter_dir),
                             fix="merge without --low-memory")
        module, _, suffix = key.removeprefix(PEFT_PREFIX).rpartition(".")
        ck = checkpoint_key(module, index, suffix)
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
        _, shape, code = index[name]
        nbytes = math.prod(shape) * (target.itemsize if _is_float(code) else getattr(torch, DTYPES[code]).itemsize)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    total = 0
    with safe_open(str(adapter_path), "pt") as adapter:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

            def produce(name):
                path, shape, _ = index[name]
                t = adapter.get_tensor(replace[name]) if name in replace else _read_tensor(path, name)
                if tuple(t.shape) != shape:
                    raise ModelError(f"adapter tensor {replace[name]} is {list(t.shape)}, the base's {name} is "
                                     f"{list(shape)}", where=str(source.adapter_dir),
                                     fix="pass the base model the adapter was trained on with --base")
                if name in deltas:
                    module = deltas[name][0]
                    a = adapter.get_tensor(f"base_model.model.{module}.lora_A.weight").float()
                    b = adapter.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
                    delta = (b @ a) * _scaling(cfg, module, a.shape[0])
                    t = t.float() + (delta.T if fan_in_fan_out else delta)
                return t.to(target) if t.is_floating_point() else t

            total += _write_safetensors(out / fname, shard, produce, {n: (index[n][1:], target) for n in shard})
            weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n", encoding="utf-8")
    _write_config(base_dir, out, dtype)


def _write_safetensors(path: Path, names: list[str], produce, plan: dict) -> int:
    """Write one safetensors file tensor by tensor: the header comes from the plan, so at most one
    tensor is in memory (safetensors' save_file would first build the whole file in RAM)."""
    import torch

    codes = {v: k for k, v in DTYPES.items()}
    header, offset = {}, 0
    for name in names:
        (shape, code), target = plan[name]
        dtype = str(target).removeprefix("torch.") if _is_float(code) else DTYPES[code]
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
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
