"""`lorafit blend`: several LoRA adapters of one base combined into one new adapter, with peft's own
``add_weighted_adapter``. Every rule peft enforces (and some it does not) is checked first, from the
adapters' configs and weight headers, so that a mismatch is the user's one-line error, not peft's
ValueError halfway through; the result is written to a temporary directory and renamed into place.

Methods (peft's combination types):
  linear       weighted sum of the A and of the B factors: cheap, exact only for one adapter; same ranks
               and the same modules
  cat          A and B stacked: the exact weighted sum of the updates, rank = sum of the ranks
  ties         TIES on the factors: keep the largest *density* of each, elect signs, average; same ranks
  dare_linear  DARE on the factors: drop values at random (keep *density*), rescale, sum; same ranks
  svd          weighted sum of the full updates, truncated back to the largest rank by SVD
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit import log
from lorafit.commands.card import build_blend_card
from lorafit.core import libs, models
from lorafit.core.adapters import BLEND_FILE, AdapterSource, check_same_base, find_named, parse_adapters
from lorafit.core.files import atomic_dir, check_output
from lorafit.core.weights import adapter_ranks
from lorafit.errors import LorafitError, ModelError

# Methods that combine the A and B factors one by one: every adapter needs the same modules and ranks.
FACTORWISE = ("linear", "ties", "dare_linear")
METHODS = FACTORWISE + ("cat", "svd")
NEEDS_DENSITY = ("ties", "dare_linear")


def blend(adapters: list[str], weights: str | list[float], output: str | Path, *, method: str = "linear",
          density: float | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """Blend --adapter NAME=DIR sources with *weights* into *output* (an ordinary peft adapter directory).
    Returns what was done: sources, weights, method, resulting rank, files written."""
    pairs = parse_adapters(adapters)
    weights = parse_weights(weights, len(pairs))
    check_method(method, density, len(pairs))
    output = Path(output)
    named = find_named(pairs)
    check_output(output, [d for _, s in named for d in (s.adapter_dir, s.run_dir)], overwrite=overwrite)
    check_same_base(named)
    module_ranks = check_blendable(named, method)

    libs.quiet_libraries()
    import torch

    internal = [f"source{i}" for i in range(len(named))]  # the user's names may clash with peft's "default"
    log.info(f"blend: loading the base {named[0][1].base} and {len(named)} adapters")
    # On the CPU: the factors are small, and dare_linear's seed then gives the same blend on every machine.
    model, tokenizer = models.load_adapted(named[0][1], quantized=False, device="cpu", adapter_name=internal[0])
    for key, (name, source) in zip(internal[1:], named[1:]):
        models.load_beside(model, source, key, where=f"--adapter {name}")
    torch.manual_seed(seed)  # dare_linear's random drops
    # "default": peft saves the adapter of that name at the top of the directory, not in a subfolder.
    model.add_weighted_adapter(internal, weights, adapter_name="default", combination_type=method, density=density)
    config = model.peft_config["default"]

    record = {
        "method": method, "density": density, "seed": seed if method == "dare_linear" else None,
        "weights": weights, "r": config.r, "base": named[0][1].base, "task": named[0][1].task.name,
        "sources": [{"name": name, "dir": str(source.adapter_dir), "weight": w, "r": max(module_ranks[i].values()),
                     "alpha": source.config.get("lora_alpha"), "target_modules": _sorted(source.config.get("target_modules")),
                     "modules": len(module_ranks[i])}
                    for i, ((name, source), w) in enumerate(zip(named, weights))],
        # The first source's recipe: the prompt format generate and evaluate render prompts in.
        "recipe": named[0][1].recipe,
    }
    with atomic_dir(output) as tmp:  # renamed into place once written and checked
        model.save_pretrained(str(tmp), selected_adapters=["default"], safe_serialization=True,
                              save_embedding_layers=False)
        tokenizer.save_pretrained(str(tmp))
        (tmp / BLEND_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(build_blend_card(record, name=output.name), encoding="utf-8")
        lora_modules = check_written(tmp, module_ranks)
    files = sorted(p.name for p in output.iterdir() if p.is_file())
    return {**{k: v for k, v in record.items() if k != "recipe"}, "output": str(output), "lora_modules": lora_modules,
            "files": files, "bytes": sum((output / f).stat().st_size for f in files)}


def parse_weights(weights: str | list[float], count: int) -> list[float]:
    """--weights 0.7,0.3 → [0.7, 0.3], one per --adapter."""
    if isinstance(weights, str):
        try:
            weights = [float(w) for w in weights.split(",")]
        except ValueError:
            raise LorafitError(f"'{weights}' is not a comma-separated list of numbers", where="--weights",
                               fix="write e.g. --weights 0.7,0.3 (negative weights subtract an adapter)") from None
    if len(weights) != count:
        raise LorafitError(f"{len(weights)} weights for {count} adapters", where="--weights",
                           fix="give one weight per --adapter, in the same order")
    if not any(weights):
        raise LorafitError("every weight is 0: the blend would change nothing", where="--weights",
                           fix="give at least one adapter a weight")
    return list(weights)


def check_method(method: str, density: float | None, count: int) -> None:
    if method not in METHODS:
        raise LorafitError(f"unknown method '{method}'", where="--method", fix=f"use one of {', '.join(METHODS)}")
    if count == 1 and method != "linear":
        raise LorafitError(f"{method} combines several adapters; one adapter can only be scaled", where="--method",
                           fix="use --method linear to scale one adapter, or give two or more --adapter")
    if method in NEEDS_DENSITY and density is None:
        raise LorafitError(f"{method} needs --density", where="--density",
                           fix="give the fraction of each update to keep, e.g. --density 0.5")
    if method not in NEEDS_DENSITY and density is not None:
        raise LorafitError(f"{method} does not prune, so --density means nothing to it", where="--density",
                           fix=f"drop --density, or use --method {' or '.join(NEEDS_DENSITY)}")
    if density is not None and not 0 < density <= 1:
        raise LorafitError(f"{density:g} is outside (0, 1]", where="--density",
                           fix="give the fraction of values kept, e.g. 0.5")


def check_blendable(named: list[tuple[str, AdapterSource]], method: str) -> list[dict[str, int]]:
    """peft's own rules for add_weighted_adapter, and the ones it leaves to chance, checked on the configs
    and weight headers: [{module: rank}] per source."""
    for name, source in named:
        c, where = source.config, f"--adapter {name}"
        if c.get("use_dora"):
            raise ModelError("a DoRA adapter: add_weighted_adapter combines LoRA factors but not DoRA's magnitude "
                             "vectors, so the blend would be wrong", where=where, fix="blend plain LoRA adapters")
        if c.get("target_parameters"):
            raise ModelError("the adapter targets parameters (target_parameters), which peft cannot blend",
                             where=where, fix="blend adapters that target modules")
        if c.get("modules_to_save"):
            raise ModelError(f"the adapter trains {', '.join(c['modules_to_save'])} in full (modules_to_save); "
                             "blending combines LoRA factors only, not whole trained layers", where=where,
                             fix="blend adapters without fully trained heads (causal LM adapters have none)")
    kinds = {name: isinstance(s.config.get("target_modules"), str) for name, s in named}
    if len(set(kinds.values())) > 1:
        regex = next(n for n, k in kinds.items() if k)
        listed = next(n for n, k in kinds.items() if not k)
        raise ModelError(f"adapter '{regex}' names its target modules by a regular expression, '{listed}' by a list; "
                         "peft cannot combine the two", where=f"--adapter {regex}",
                         fix="blend adapters whose target_modules are both lists")
    ranks = [adapter_ranks(s.adapter_dir) for _, s in named]
    if method in FACTORWISE:
        first_name, first = named[0][0], ranks[0]
        for (name, _), own in zip(named[1:], ranks[1:]):
            if set(own) != set(first):
                only = sorted(set(own) ^ set(first))
                raise ModelError(f"{method} adds the A and B factors module by module, and adapters '{first_name}' and "
                                 f"'{name}' adapt different modules ({len(only)} differ, e.g. {only[0]})",
                                 where=f"--adapter {name}",
                                 fix="use --method cat or svd, which combine adapters of different target modules")
        if len(set().union(*(r.values() for r in ranks))) > 1:
            odd = next(n for (n, _), r in zip(named, ranks) if set(r.values()) != set(first.values()))
            shown = "; ".join(f"'{n}' r={'/'.join(map(str, sorted(set(r.values()))))}" for (n, _), r in zip(named, ranks))
            raise ModelError(f"{method} needs every adapter at one rank, in every module: {shown}",
                             where=f"--adapter {odd if odd != first_name else named[-1][0]}",
                             fix="use --method cat or svd, which combine adapters of different ranks")
    return ranks


def check_written(directory: Path, module_ranks: list[dict[str, int]]) -> int:
    """The saved blend adapts every module a source adapted: the number of LoRA modules written."""
    written = adapter_ranks(directory)
    expected = set().union(*module_ranks)
    missing = sorted(expected - set(written))
    if missing:  # ours, not the user's
        raise RuntimeError(f"the blended adapter lacks {len(missing)} modules the sources adapt, e.g. {missing[0]}")
    return len(written)


def _sorted(targets):
    return sorted(targets) if isinstance(targets, list) else targets
