"""The data doctor: what the data stage reports beyond hard errors (docs/data.md). Every count above 0 is
a warning, said once (an error under data.strict): truncated rows and the ones that lost their trained EOS,
rows dropped with nothing left to train, duplicates, eval rows also in train, empty fields."""

from __future__ import annotations

import hashlib
import json

from lorafit import log
from lorafit.errors import DataError
from lorafit.recipe import DataSpec
from lorafit.stages.data.read import Source, Tokenized


def examine(stats: dict, sources: list[Source], spec: DataSpec, found: Tokenized) -> None:
    """Add the doctor's figures to the data stage's *stats* (token_lengths, eos_cut, duplicates, eval_in_train,
    empty_fields, warnings); under data.strict a warning is a DataError, else each is said once."""
    stats["token_lengths"] = _percentiles(found.lengths)
    stats["eos_cut"] = len(found.eos_cut)
    checks = _row_checks(sources, spec)
    stats.update({k: len(v) for k, v in checks.items()})
    stats["warnings"] = _doctor_warnings(stats, spec, found.dropped, found.eos_cut, checks)
    if spec.strict and stats["warnings"]:
        raise DataError(f"{len(stats['warnings'])} data warning(s) are errors under data.strict: "
                        + "; ".join(w.removeprefix("data: ") for w in stats["warnings"]), where="data.strict",
                        fix="fix the data, or set data.strict: false to train despite the warnings")
    for warning in stats["warnings"]:
        log.warn(warning)


# The columns of each format that must not be blank; the ones two rows must share to be duplicates.
_REQUIRED = {"text": ("text",), "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
             "chat": ("messages",), "classification": ("text", "label"), "tokens": ("tokens", "tags"),
             "seq2seq": ("source", "target")}
_COMPARED = {**_REQUIRED, "alpaca": ("instruction", "input", "output")}


def _percentiles(lengths: list[int]) -> dict:
    """Tokens per row before truncation: p50 / p95 (nearest rank) and max."""
    if not lengths:
        return {"p50": 0, "p95": 0, "max": 0}
    xs = sorted(lengths)

    def rank(q: int) -> int:
        return int(xs[max(0, -(-len(xs) * q // 100) - 1)])  # ceil(n·q/100), 1-based

    return {"p50": rank(50), "p95": rank(95), "max": int(xs[-1])}


def _empty_field(row: dict, spec: DataSpec) -> str | None:
    """The first required column of this row that is present but blank (a chat message without content)."""
    for key in _REQUIRED[spec.format]:
        name = getattr(spec.columns, key)
        value = row.get(name)
        if isinstance(value, str) and not value.strip():
            return name
        if key == "messages" and isinstance(value, list):
            for i, m in enumerate(value):
                if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip():
                    return f"{name}[{i}].content"
    return None


def _row_checks(sources: list[Source], spec: DataSpec) -> dict[str, list[str]]:
    """Duplicates (within data.train; data.eval rows also in data.train) and blank fields, as the rows' locations."""
    names = [getattr(spec.columns, key) for key in _COMPARED[spec.format]]
    seen: dict[bytes, str] = {}
    found: dict[str, list[str]] = {"duplicates": [], "eval_in_train": [], "empty_fields": []}
    for n, src in enumerate(sources):
        rows = src.rows
        if not isinstance(rows, list):  # a hub dataset: only the compared columns, streamed from Arrow
            rows = rows.select_columns([c for c in names if c in rows.column_names])
        for row, loc in zip(rows, src.locs):
            key = hashlib.sha256(json.dumps([row.get(c) for c in names], sort_keys=True, default=str).encode()).digest()
            if key in seen:
                found["duplicates" if n == 0 else "eval_in_train"].append(f"{loc} (same as {seen[key]})")
            elif n == 0:
                seen[key] = loc
            blank = _empty_field(row, spec)
            if blank:
                found["empty_fields"].append(f"{loc} ('{blank}')")
    return found


def _doctor_warnings(stats: dict, spec: DataSpec, dropped: list[str], eos_cut: list[str],
                     checks: dict[str, list[str]]) -> list[str]:
    warnings = []
    if stats["truncated"] or dropped:
        lost = f", {len(eos_cut)} of them losing their trained EOS (first at {eos_cut[0]})" if eos_cut else ""
        where = f", first at {dropped[0]}" if dropped else ""
        warnings.append(f"data: {stats['truncated']} rows longer than data.max_length={spec.max_length} truncated"
                        f"{lost}; {len(dropped)} rows dropped with no response tokens left{where}; raise "
                        f"data.max_length (rows have p95 {stats['token_lengths']['p95']}, max "
                        f"{stats['token_lengths']['max']} tokens) or shorten the prompts")
    if checks["duplicates"]:
        warnings.append(f"data: {len(checks['duplicates'])} rows repeat an earlier row, first at "
                        f"{checks['duplicates'][0]}: they weigh more in training and can land in the eval split; "
                        "remove the duplicates")
    if checks["eval_in_train"]:
        warnings.append(f"data: {len(checks['eval_in_train'])} rows of data.eval also occur in data.train, first "
                        f"at {checks['eval_in_train'][0]}: the eval loss overstates what the adapter learnt; "
                        "remove them from one of the files")
    if checks["empty_fields"]:
        warnings.append(f"data: {len(checks['empty_fields'])} rows have an empty field, first at "
                        f"{checks['empty_fields'][0]}; fill or remove them")
    return warnings
