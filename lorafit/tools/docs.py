"""Generate docs/recipe.md from the recipe schema: fields are documented once, in recipe.py.

``python -m lorafit.tools.docs docs/recipe.md`` rewrites it; a test fails when it is stale.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel

from lorafit.recipe import Recipe

HEADER = """# Recipe reference

Generated from `lorafit/recipe.py` by `make docs`; do not edit by hand. `lorafit schema` prints the
same as JSON Schema for editors. Unknown keys are errors. Every field can be overridden on the command
line with `--set section.key=value` (the value is read as YAML: `--set lora.target_modules=[q_proj,v_proj]`).
Relative paths (`model.name`, `data.train`, `data.eval`) are looked up in the working directory first,
then next to the recipe; the run's `recipe.yaml` records them resolved.
"""


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if a is not None else "`null`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join("`null`" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, str) and "\n" in value:
        return "(Alpaca template)"
    return f"`{'null' if value is None else value}`"


def section_table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    nested = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        lines.append(f"| `{prefix}{name}` | {_type_name(ann)} | {_default(field)} | {(field.description or '').replace('|', chr(92) + '|')} |")
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((name, ann))
    for name, sub in nested:
        lines += ["", f"#### `{prefix}{name}`", ""] + section_table(sub, f"{prefix}{name}.")
    return lines


def render() -> str:
    out = [HEADER]
    for name, field in Recipe.model_fields.items():
        sub = field.annotation
        required = " (required)" if field.is_required() else ""
        out += [f"## `{name}`{required}", "", (sub.__doc__ or "").strip(), ""]
        out += section_table(sub, f"{name}.") + [""]
    return "\n".join(line for line in out) + "\n"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/recipe.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(), encoding="utf-8")
    print(target)


if __name__ == "__main__":
    main()
