"""Writes the demo task's data: date normalisation, "Normalise the date: 3rd of March 2021" → "2021-03-03".

Deterministic (fixed seeds); rerun to regenerate ``dates-train.jsonl`` and ``dates-eval.jsonl`` beside it:
``python recipes/data/make_demo_data.py``. The held-out rows are dates the training rows never show.
Why this task: the answer is short and has one right spelling, so exact match measures it; the base
SmolLM2-135M-Instruct mostly answers in prose or echoes the input's format, and a small LoRA learns it.
"""

from __future__ import annotations

import calendar
import json
import random
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "Normalise the date to YYYY-MM-DD: {}"
MONTHS = list(calendar.month_name)[1:]


def ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# The ways a date is written in the prompts; the answer is always ISO 8601.
STYLES = [
    lambda d: f"{ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {ordinal(d.day)} {d.year}",
    lambda d: f"the {ordinal(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{d.year}, {MONTHS[d.month - 1]} {d.day}",
]


def random_date(rng: random.Random) -> date:
    year, month = rng.randint(1975, 2035), rng.randint(1, 12)
    return date(year, month, rng.randint(1, calendar.monthrange(year, month)[1]))


def rows(n: int, rng: random.Random, avoid: set[date]) -> list[dict]:
    out = []
    while len(out) < n:
        d = random_date(rng)
        if d in avoid:
            continue
        avoid.add(d)
        text = rng.choice(STYLES)(d)
        out.append({"messages": [{"role": "user", "content": PROMPT.format(text)},
                                 {"role": "assistant", "content": d.isoformat()}]})
    return out


def write(path: Path, data: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")


def main(train_rows: int = 400, eval_rows: int = 50) -> None:
    seen: set[date] = set()
    held_out = rows(eval_rows, random.Random(2024), seen)  # drawn first: train never shows these dates
    write(HERE / "dates-eval.jsonl", held_out)
    write(HERE / "dates-train.jsonl", rows(train_rows, random.Random(7), seen))


if __name__ == "__main__":
    main()
