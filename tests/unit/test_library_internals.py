"""Every private library internal lorafit relies on (core.libs.INTERNALS) still exists in the installed versions,
with the parameters lorafit calls it with. A release that removes or renames one fails here, naming it and
the lorafit code that needs it, instead of deep inside a training run."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re

import pytest

from lorafit.core.libs import INTERNALS

SPEC = re.compile(r"^(?P<module>[\w.]+)(?::(?P<path>[\w.]+))?(?:\((?P<params>[\w, ]*)\))?$")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def _resolve(module_name: str, path: str):
    """The object at *path* in the module; an attribute set at runtime counts while the code that sets it (the
    class, else the module) still names it. Raises AssertionError naming what is gone."""
    module = importlib.import_module(module_name)
    obj = module
    for i, name in enumerate(path.split(".")):
        if hasattr(obj, name):
            obj = getattr(obj, name)
            continue
        last = i == len(path.split(".")) - 1
        if last and (f".{name}" in _source(obj) or f".{name}" in _source(module)):
            return None  # assigned at runtime (self.name = ..., state.name = ...)
        raise AssertionError(f"{module_name}:{path}: {name} is gone from {type(obj).__name__} {getattr(obj, '__name__', obj)}")
    return obj


@pytest.mark.parametrize("internal", sorted(INTERNALS))
def test_the_internal_is_still_there(internal):
    m = SPEC.match(internal)
    assert m, f"INTERNALS key {internal!r} is not module[:object.attribute][(params)]"
    module = m["module"]
    if not _installed(module):
        pytest.skip(f"{module.split('.')[0]} is not installed (an optional extra)")
    used_by = INTERNALS[internal]
    if not m["path"]:
        assert importlib.util.find_spec(module) is not None, f"{module} is gone; used by {used_by}"
        return
    try:
        obj = _resolve(module, m["path"])
    except (ImportError, AssertionError) as e:
        raise AssertionError(f"library internal gone: {e}; used by {used_by}") from None
    if m["params"]:
        want = [p.strip() for p in m["params"].split(",") if p.strip()]
        have = [p for p in inspect.signature(obj).parameters if p != "self"]
        assert have[:len(want)] == want, (f"library internal changed: {module}:{m['path']} takes {have}, lorafit "
                                          f"calls it with {want}; used by {used_by}")


def test_the_list_names_the_internals_lorafit_overrides():
    """The Trainer methods stages/train.py overrides are all listed: a new override must be added to INTERNALS."""
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "lorafit" / "stages" / "train.py").read_text(encoding="utf-8")
    overridden = set(re.findall(r"super\(\)\.(_\w+)\(", source))
    listed = {re.match(r"transformers:Trainer\.(_\w+)", k)[1] for k in INTERNALS if k.startswith("transformers:Trainer.")}
    assert overridden and overridden <= listed, overridden - listed
