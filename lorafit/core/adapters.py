"""An adapter on disk: its directory, the lorafit run around it (when there is one), its config; and
several adapters by name (--adapter NAME=DIR) that must share one base.

merge, push, evaluate and generate all accept an adapter directory or a run directory; this is the one
place that tells them apart.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from lorafit.core import rundir, tasks
from lorafit.errors import LorafitError, ModelError
from lorafit.recipe import Recipe, apply_override, load_recipe, resolve_paths, validate_recipe

# Written by `lorafit blend` beside the adapter: its sources, weights, method, and the first source's recipe.
BLEND_FILE = "lorafit-blend.json"


@dataclass
class AdapterSource:
    """An adapter directory, the run directory around it (when lorafit made it), and its config."""

    adapter_dir: Path
    run_dir: Path | None
    config: dict
    base: str

    @property
    def recipe_file(self) -> Path | None:
        if self.run_dir is None or not (self.run_dir / rundir.RECIPE).is_file():
            return None
        return self.run_dir / rundir.RECIPE

    @property
    def recipe(self) -> dict | None:
        """The run's recipe.yaml as written (for the model card: what was recorded, untouched)."""
        f = self.recipe_file
        return (yaml.safe_load(f.read_text(encoding="utf-8")) or {}) if f else None

    def run_recipe(self, overrides: list[str] | None = None) -> Recipe | None:
        """The run's recipe, validated (None for an adapter outside a lorafit run). A blend (`lorafit
        blend`) answers with the recipe its first source was trained with: its prompt format and base."""
        f = self.recipe_file
        if f:
            return load_recipe(f, overrides)
        record = self.blend
        recorded = record.get("recipe")
        if not recorded:
            return None
        raw = copy.deepcopy(recorded)
        for item in overrides or []:  # e.g. evaluate's --data: the blend's rows, not the source's training data
            apply_override(raw, item)
        sources = record.get("sources") or [{}]
        first = Path(sources[0].get("dir") or self.adapter_dir).parent  # the first source's run dir: its relative paths
        return resolve_paths(validate_recipe(raw, source=str(self.adapter_dir / BLEND_FILE)), first)

    def recipe_or_none(self, overrides: list[str] | None = None) -> Recipe | None:
        """run_recipe, or None when the adapter is in no run or the run's recipe no longer validates (said on
        stderr: the caller goes on without it)."""
        try:
            return self.run_recipe(overrides)
        except LorafitError as e:
            from lorafit import log

            log.warn(f"the run's recipe cannot be read ({str(e).splitlines()[0][:200]}); going on without it")
            return None

    @property
    def blend(self) -> dict:
        """What `lorafit blend` recorded about this adapter (sources, weights, method), or {}."""
        try:
            return json.loads((self.adapter_dir / BLEND_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    @property
    def task(self) -> tasks.Task:
        return tasks.from_peft_type(self.config.get("task_type"))


def holds_adapter(path: str | Path) -> bool:
    """An adapter directory, or a run directory with adapter/ inside."""
    p = Path(path)
    return (p / "adapter_config.json").is_file() or (p / rundir.ADAPTER / "adapter_config.json").is_file()


def find_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """An adapter dir or a run dir (its adapter/) → AdapterSource. Raises ModelError."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        adapter_dir = path
        run_dir = path.parent if (path.parent / rundir.RECIPE).is_file() else None
    elif (path / rundir.ADAPTER / "adapter_config.json").is_file():
        adapter_dir, run_dir = path / rundir.ADAPTER, path
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
# Several adapters by name (--adapter NAME=DIR): generate, blend and serve


ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")  # usable as a peft adapter name ("base" is the model without one)


def parse_adapters(items: list[str]) -> list[tuple[str, Path]]:
    """--adapter NAME=DIR options → [(name, dir)], names unique, usable as peft adapter names."""
    pairs: list[tuple[str, Path]] = []
    for item in items:
        name, sep, directory = item.partition("=")
        name = name.strip()
        if not sep or not directory:
            raise LorafitError(f"'{item}' is not NAME=DIR", where="--adapter",
                               fix="name each adapter: --adapter math=runs/math --adapter chat=runs/chat")
        if not ADAPTER_NAME.fullmatch(name) or name == "base":
            raise LorafitError(f"'{name}' cannot name an adapter", where="--adapter",
                               fix="use letters, digits, '_' or '-' ('base' stands for the model without adapter)")
        if name in dict(pairs):
            raise LorafitError(f"the name '{name}' is given twice", where="--adapter", fix="give each adapter its own name")
        pairs.append((name, Path(directory)))
    return pairs


def same_base(a: str, b: str) -> bool:
    """Two recorded bases name one model: the same hub id, or the same local directory."""
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def find_named(pairs: list[tuple[str, Path]], option: str = "--adapter") -> list[tuple[str, AdapterSource]]:
    """NAME=DIR pairs → (name, AdapterSource); a bad DIR names the option it came from."""
    named = []
    for name, directory in pairs:
        try:
            named.append((name, find_adapter(directory)))
        except ModelError as e:
            raise ModelError(e.message, where=f"{option} {name}={directory}", fix=e.fix) from None
    return named


def check_same_base(named: list[tuple[str, AdapterSource]], option: str = "--adapter") -> None:
    """Adapters served (or blended) on one base must have been trained on that base, for the same task."""
    first_name, first = named[0]
    for name, source in named[1:]:
        if not same_base(source.base, first.base):
            raise ModelError(f"adapter '{name}' was trained on {source.base}, adapter '{first_name}' on {first.base}: "
                             "they cannot share one base model", where=f"{option} {name}",
                             fix="give adapters of the same base model")
        if source.task.name != first.task.name:
            raise ModelError(f"adapter '{name}' is a {source.task.name} adapter, '{first_name}' a {first.task.name} one",
                             where=f"{option} {name}", fix="give adapters of the same task")
