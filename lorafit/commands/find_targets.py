"""``lorafit find-targets``: every module of a model that can take LoRA, and what each preset costs.

Everything is read from the config on the meta device (no weights; a .gguf file's config is its
metadata); counts come from ``lorafit.targets``, the same code that training's inject stage uses. The
JSON document is described in docs/targets.md (``schema_version`` 1).
"""

from __future__ import annotations

import re
from collections import OrderedDict

from lorafit.core import targets as T
from lorafit.core import tasks

SCHEMA_VERSION = 1
BLOCKS = ("attention", "mlp", "other")


def find_targets(model: str, *, r: int = 16, task: str = tasks.DEFAULT, trust_remote_code: bool = False) -> dict:
    """The report behind ``lorafit find-targets`` (a JSON-ready dict). Raises ModelError."""
    tasks.known(task, where="--task")
    config = T.load_config(model, trust_remote_code=trust_remote_code, where="MODEL", config_only=True)
    meta = T.build_meta_model(config, task, trust_remote_code=trust_remote_code)
    return describe(meta, r=r, task=task, model_name=model, model_type=getattr(config, "model_type", None))


def describe(meta, *, r: int, task: str, model_name: str, model_type: str | None = None) -> dict:
    """Report for an already built (meta) model."""
    modules = T.linear_modules(meta)
    total = T.count_params(meta)
    groups = _groups(modules)
    presets = OrderedDict()
    heads: tuple[str, ...] = ()
    for preset in T.PRESETS:
        chosen = T.select(modules, preset)
        if not chosen:
            presets[preset] = None
            continue
        keys = T.minimal_keys(chosen, modules)
        count = T.count_trainable(meta, chosen, r=r, task=task)
        heads = count.saved_modules
        presets[preset] = {
            "target_modules": keys,
            "modules": count.adapted_modules,
            "trainable_params": count.trainable,
            "lora_params": count.lora,
            "head_params": count.modules_to_save,
            "percent": round(count.percent, 4),
            "yaml": lora_yaml(r, preset, keys),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model_name,
        "model_type": model_type,
        "architecture": type(meta).__name__,
        "task": task,
        "r": r,
        "total_params": total,
        "modules": [
            {**g, "lora_params": g["count"] * r * (g["in_features"] + g["out_features"])} for g in groups
        ],
        "modules_to_save_candidates": _save_candidates(meta),
        "task_heads": list(heads) if any(presets.values()) else [],
        "presets": presets,
    }


def _pattern(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)


def _groups(modules: list[T.LinearModule]) -> list[dict]:
    """Modules with the same path (layer index wildcarded) and shape, in model order."""
    groups: OrderedDict[tuple, list[T.LinearModule]] = OrderedDict()
    for m in modules:
        groups.setdefault((_pattern(m.name), m.in_features, m.out_features), []).append(m)
    out = []
    for (pattern, fin, fout), members in groups.items():
        key, also = _key_for(members, modules)
        out.append({
            "name": pattern,
            "key": key,
            "also_matches": also,
            "block": members[0].block,
            "kind": "fused" if members[0].fused else "linear",
            "count": len(members),
            "in_features": fin,
            "out_features": fout,
        })
    order = {b: i for i, b in enumerate(BLOCKS)}
    return sorted(out, key=lambda g: order[g["block"]])  # stable: model order within a block


def _key_for(members: list[T.LinearModule], modules: list[T.LinearModule]) -> tuple[str, int]:
    """Shortest target_modules entry (no layer index) selecting exactly these modules; else the leaf name
    and how many other modules it also matches."""
    names = {m.name for m in members}
    parts = members[0].name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        key = ".".join(parts[i:])
        if any(p.isdigit() for p in parts[i:]):
            break
        hits = {m.name for m in modules if T.matches(m.name, key)}
        if hits == names:
            return key, 0
    leaf = parts[-1]
    hits = {m.name for m in modules if T.matches(m.name, leaf)}
    return leaf, len(hits - names)


def _save_candidates(meta) -> list[dict]:
    """Embeddings and output heads: trained in full through lora.modules_to_save, never by a preset."""
    import torch.nn as nn

    heads = T.output_head_names(meta)
    out_emb = meta.get_output_embeddings() if hasattr(meta, "get_output_embeddings") else None
    in_emb = meta.get_input_embeddings() if hasattr(meta, "get_input_embeddings") else None
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    found = []
    for name, module in meta.named_modules():
        if isinstance(module, nn.Embedding) or name in heads:
            found.append({
                "name": name,
                "key": name.rsplit(".", 1)[-1],
                "kind": "embedding" if isinstance(module, nn.Embedding) else "head",
                "params": sum(p.numel() for p in module.parameters(recurse=True)),
                "tied": bool(tied and module in (out_emb, in_emb)),
            })
    return found


def lora_yaml(r: int, preset: str, keys: list[str]) -> str:
    """A ready-to-paste ``lora:`` section listing the keys the preset resolves to."""
    listed = "".join(f"    - {k}\n" for k in keys)
    return (f"lora:\n  r: {r}\n  alpha: {2 * r}\n  dropout: 0.05\n"
            f"  target_modules:   # preset '{preset}' resolves to these for this model\n{listed}")
