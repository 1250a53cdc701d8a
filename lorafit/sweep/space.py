"""What a sweep varies: `--grid` and `--range` parsed into axes, axes into points, a point into the `--set`
overrides of its run and the name of its run directory. Torch-free, Optuna-free.

A value is kept as the text the user typed (``2e-4``, ``[q_proj,v_proj]``) and handed to the point's
``lorafit train`` as ``--set KEY=TEXT``: it is parsed exactly as ``--set`` parses it, by the same code.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field

from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import apply_override

# Keys the sweep sets itself, per point or for every point.
_RESERVED = {"output.dir": "each point trains in OUTPUT/sweep/<point>/, set by the sweep",
             "output.overwrite": "pass --overwrite to the sweep to train every point again"}
_OPENERS, _CLOSERS = "[{(", "]})"
NAME_LIMIT = 120  # characters of a point's directory name before it is shortened with a digest


@dataclass(frozen=True)
class Axis:
    """One dimension of the sweep: grid choices of one key, or of keys that vary together; or a numeric range."""

    keys: tuple[str, ...]
    choices: tuple[tuple[str, ...], ...] = ()  # grid: per choice, one value text per key
    low: float | None = None                   # range
    high: float | None = None
    log: bool = False
    integer: bool = False

    @property
    def label(self) -> str:
        return ",".join(self.keys)

    @property
    def is_range(self) -> bool:
        return self.low is not None

    def choice_label(self, choice: tuple[str, ...]) -> str:
        return ",".join(choice)

    def describe(self) -> dict:
        if self.is_range:
            return {"keys": list(self.keys), "low": self.low, "high": self.high, "log": self.log, "int": self.integer}
        return {"keys": list(self.keys), "values": [list(c) for c in self.choices]}


@dataclass(frozen=True)
class Point:
    """One run of the sweep: (key, value text) pairs, in the order of the axes."""

    values: tuple[tuple[str, str], ...]
    name: str = field(default="", compare=False)

    @property
    def sets(self) -> list[str]:
        """The point's `--set` overrides."""
        return [f"{key}={text}" for key, text in self.values]

    @property
    def label(self) -> str:
        return ", ".join(f"{short_key(k)}={t}" for k, t in self.values)


def short_key(key: str) -> str:
    """lora.r → r; training.learning_rate → learning_rate."""
    return key.rsplit(".", 1)[-1]


def split_outside_brackets(text: str, sep: str) -> list[str]:
    """*text* split at *sep* where it stands outside brackets and quotes: '[q,v],all-linear' → ['[q,v]', 'all-linear']."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _OPENERS:
            depth += 1
        elif ch in _CLOSERS:
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def parse_grid(spec: str) -> Axis:
    """`KEY=V1,V2,...` or `KEY1,KEY2=A1,A2;B1,B2` (keys that vary together, one tuple per choice)."""
    keys_text, sep, values = spec.partition("=")
    example = "--grid lora.r=8,16,32 or --grid lora.r,lora.alpha=8,16;16,32"
    if not sep or not keys_text.strip():
        raise LorafitError(f"{spec!r}: expected KEY=V1,V2,...", where="--grid", fix=f"e.g. {example}")
    keys = tuple(k.strip() for k in keys_text.split(","))
    where = f"--grid {keys_text.strip()}"
    if any(not k for k in keys):
        raise LorafitError("an empty key", where=where, fix=f"e.g. {example}")
    if len(set(keys)) < len(keys):
        raise LorafitError("a key is named twice", where=where, fix="name each key once")
    if len(keys) == 1:
        choices = [(v,) for v in split_outside_brackets(values, ",")]
    else:
        choices = []
        for group in split_outside_brackets(values, ";"):
            items = tuple(split_outside_brackets(group, ","))
            if len(items) != len(keys):
                raise LorafitError(f"{group!r} has {len(items)} value(s) for {len(keys)} keys", where=where,
                                   fix=f"give one value per key in each ';'-separated group, e.g. {example}")
            choices.append(items)
    if any(not v for c in choices for v in c):
        raise LorafitError(f"an empty value in {values!r}", where=where,
                           fix="separate values by single commas (quote a value that is an empty string: '')")
    seen = set()
    for c in choices:
        if c in seen:
            raise LorafitError(f"{','.join(c)!r} is given twice", where=where, fix="list each value once")
        seen.add(c)
    return Axis(keys=keys, choices=tuple(choices))


def parse_range(spec: str) -> Axis:
    """`KEY=LO:HI`, `KEY=LO:HI:log`, `KEY=LO:HI:int` (or `:int:log`): a numeric interval for random / TPE search."""
    key, sep, body = spec.partition("=")
    key = key.strip()
    where = f"--range {key}" if key else "--range"
    fix = "e.g. --range training.learning_rate=1e-5:1e-3:log or --range lora.r=4:64:int"
    if not sep or not key or "," in key:
        raise LorafitError(f"{spec!r}: expected KEY=LO:HI[:log|int]", where="--range", fix=fix)
    parts = [p.strip() for p in body.split(":")]
    if len(parts) < 2:
        raise LorafitError(f"{body!r}: expected LO:HI", where=where, fix=fix)
    options = set(parts[2:])
    unknown = options - {"log", "int"}
    if unknown:
        raise LorafitError(f"unknown option {sorted(unknown)[0]!r}", where=where, fix="options are log and int: " + fix)
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise LorafitError(f"{parts[0]!r}:{parts[1]!r} are not numbers", where=where, fix=fix) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise LorafitError(f"LO {parts[0]} must be below HI {parts[1]}", where=where, fix=fix)
    if "log" in options and low <= 0:
        raise LorafitError("a log range needs LO > 0", where=where, fix=fix)
    if "int" in options and not (low.is_integer() and high.is_integer()):
        raise LorafitError("an int range needs whole numbers", where=where, fix=fix)
    return Axis(keys=(key,), low=low, high=high, log="log" in options, integer="int" in options)


def check_axes(axes: list[Axis], *, max_steps: int | None) -> None:
    """Every key is a recipe key (did-you-mean otherwise, by --set's own code), varies once, and is not one the
    sweep sets itself. Each value text must at least be readable as --set reads it."""
    seen: dict[str, str] = {}
    for axis in axes:
        flag = "--range" if axis.is_range else "--grid"
        for i, key in enumerate(axis.keys):
            where = f"{flag} {key}"
            if key in seen:
                raise LorafitError(f"{key} varies twice ({seen[key]} and {flag})", where=where,
                                   fix="give each key one --grid or --range")
            seen[key] = flag
            if key in _RESERVED:
                raise LorafitError("cannot vary", where=where, fix=_RESERVED[key])
            if key == "training.max_steps" and max_steps is not None:
                raise LorafitError("varies while --max-steps fixes it", where=where,
                                   fix="drop --max-steps, or vary another key")
            texts = [c[i] for c in axis.choices] or [format_number(axis.low, axis.integer)]
            for text in texts:
                try:
                    apply_override({}, f"{key}={text}")
                except RecipeError as e:
                    raise RecipeError(e.message, where=(e.where or "").replace("--set", flag, 1) or where,
                                      fix=e.fix) from None


def format_number(x: float, integer: bool) -> str:
    """A sampled number as the text its --set (and its directory name) carries: 3 significant digits."""
    if integer:
        return str(int(round(x)))
    text = f"{x:.3g}"
    return text if ("." in text or "e" in text) else f"{text}.0"


def grid_points(axes: list[Axis]) -> list[Point]:
    """Every combination, the first axis varying slowest."""
    combos = itertools.product(*[axis.choices for axis in axes])
    return name_points([tuple(pair for axis, choice in zip(axes, combo) for pair in zip(axis.keys, choice))
                        for combo in combos])


def name_points(values_list: list[tuple[tuple[str, str], ...]]) -> list[Point]:
    """Points with their directory names: `key=value,...` made of safe characters; names that would collide or
    run long get a digest of the point's own --set values."""
    names = [_safe_name(values) for values in values_list]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    out = []
    for values, name in zip(values_list, names):
        if counts[name] > 1 or len(name) > NAME_LIMIT:
            digest = hashlib.sha256("\n".join(f"{k}={t}" for k, t in values).encode()).hexdigest()[:8]
            name = f"{name[:NAME_LIMIT - 9]}-{digest}"
        out.append(Point(values=values, name=name))
    return out


def point_for(values: tuple[tuple[str, str], ...]) -> Point:
    return name_points([values])[0]


def _safe_value(text: str) -> str:
    text = text.strip().strip("'\"")
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        text = "+".join(p.strip().strip("'\"") for p in split_outside_brackets(text[1:-1], ","))
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text) or "_"


def _safe_name(values: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{key}={_safe_value(text)}" for key, text in values) or "default"
