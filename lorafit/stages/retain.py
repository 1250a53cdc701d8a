"""What the adapter cost: forgetting, measured on rows the base already handles (evaluation.retain).

A retain file (any format lorafit reads) is measured as it is: base vs adapter loss, and exact_match and
contains of greedy answers where its rows have references. Without one, a chat-format run uses GENERAL below,
a few dozen plain questions with short answers written for lorafit, kept at the run's start to those the base
answers right (its answer contains the reference): the adapter should still answer them. Fewer than
MIN_GENERAL kept (a tiny random model answers none) and the check is skipped, and said. report.md flags a drop
beyond evaluation.retain_tolerance (relative to the base) in its own section.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from lorafit import log
from lorafit.core import metrics as M
from lorafit.core import policies
from lorafit.core.generation import generate_greedy, stop_ids
from lorafit.core.prompts import infer_format
from lorafit.recipe import ColumnsSpec, Recipe

# Plain questions with one short answer any small instruction-tuned model should know; a row counts as answered
# when the answer's words appear in the reply (contains).
GENERAL: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Spain?", "Madrid"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Greece?", "Athens"),
    ("In which country is the Eiffel Tower?", "France"),
    ("What is 2 + 2?", "4"),
    ("What is 3 + 5?", "8"),
    ("What is 10 - 3?", "7"),
    ("What is 6 times 7?", "42"),
    ("What is 9 + 1?", "10"),
    ("How many days are there in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("How many continents are there?", "7"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What colour is grass?", "green"),
    ("What colour is snow?", "white"),
    ("What colour are ripe bananas?", "yellow"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the closest star to the Earth?", "Sun"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("What gas do plants take in from the air?", "carbon dioxide"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("What is the longest river in Africa?", "Nile"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What animal is known as the king of the jungle?", "lion"),
    ("What is the chemical symbol for water?", "H2O"),
    ("How many hours are there in a day?", "24"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
)
MIN_GENERAL = 10
BUILTIN = "lorafit's built-in general questions"


@dataclass
class RetainSet:
    """The retain rows, tokenized as the run would ask them, and what is known of the base already."""

    name: str                       # the file, or BUILTIN
    spec: Any                       # the DataSpec its rows are rendered with
    rows: list[dict]
    dataset: Any                    # datasets.Dataset: input_ids, labels (the data stage's, one per row)
    builtin: bool = False
    kept_of: int | None = None      # the built-in set: rows before the base's filter
    base_answers: list[str] | None = None  # the built-in set: the base's answers, measured at the run's start
    skipped: str | None = None      # why forgetting is not measured (the built-in set: too few rows left)

    def cost(self, base: bool) -> str:
        who = "adapter" if self.base_answers is not None or not base else "base and adapter"
        return (f"retain: {len(self.rows)} rows of {self.name} (loss {'base and adapter' if base else 'adapter'}, "
                f"greedy answers {who})")


def retain_rows(recipe: Recipe) -> tuple[list[dict], Any, str, bool] | None:
    """(rows, their DataSpec, name, built-in?) of the run's retain set, or None (off, or not for this run)."""
    from lorafit.core import tasks
    from lorafit.stages.data import read_rows

    spec = recipe.evaluation
    if spec.retain == "none" or not tasks.task(recipe.model.task).causal:
        return None
    data = recipe.data
    if spec.retain is None:
        if data.format != "chat":  # the built-in questions are asked as a conversation
            return None
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in GENERAL]
        return rows, data.model_copy(update={"columns": ColumnsSpec(), "train_on_inputs": False}), BUILTIN, True
    rows = read_rows(spec.retain, where="evaluation.retain")
    fmt = infer_format(rows[0]) if rows else None
    if fmt not in ("text", "alpaca", "completion", "chat"):
        from lorafit.errors import DataError

        raise DataError(f"cannot read {spec.retain} as rows of a language model (columns: "
                        f"{', '.join(rows[0]) if rows else 'none'})", where="evaluation.retain",
                        fix="use the columns of a lorafit format: text; instruction/input/output; messages; "
                            "prompt/completion")
    same = fmt == data.format
    row_spec = data.model_copy(update={"format": fmt, "columns": data.columns if same else ColumnsSpec(),
                                       "train": spec.retain, "eval": None, "train_on_inputs": False,
                                       "packing": False})
    return rows, row_spec, spec.retain, False


def prepare_retain(recipe: Recipe, model, tokenizer) -> RetainSet | None:
    """The run's retain set, tokenized; the built-in one kept to the rows the base answers right (measured now,
    with the adapter off, so it is the base's answer whatever training does), or *skipped* (and said) when too
    few are left. None when off or not for this run."""
    found = retain_rows(recipe)
    if found is None:
        return None
    rows, spec, name, builtin = found
    retain = RetainSet(name, spec, rows, _tokenize(rows, spec, tokenizer, name), builtin=builtin)
    if not builtin:
        return retain
    answers = _answers(model, tokenizer, retain, recipe.evaluation.batch_size or recipe.training.batch_size,
                       "retain (base)", adapter=False)
    kept = [i for i, (a, (_, ref)) in enumerate(zip(answers, _pairs(retain, tokenizer))) if ref and M.contains(a, ref)]
    if len(kept) < MIN_GENERAL:
        why = (f"the base answers {len(kept)} of the {len(rows)} built-in general questions right, fewer than "
               f"{MIN_GENERAL}: forgetting is not measured (evaluation.retain: FILE measures your own rows)")
        log.info(f"retain: {why}")
        return RetainSet(name, spec, [], None, builtin=True, kept_of=len(rows), skipped=why)
    log.info(f"retain: the base answers {len(kept)} of the {len(rows)} built-in general questions right; the adapter "
             "will be asked them after training")
    return RetainSet(name, spec, [rows[i] for i in kept], retain.dataset.select(kept), builtin=True,
                     kept_of=len(rows), base_answers=[answers[i] for i in kept])


def _tokenize(rows: list[dict], spec, tokenizer, name: str):
    from lorafit.stages.data import text
    from lorafit.stages.data.read import Source

    digest = hashlib.sha256(repr(rows).encode()).digest()
    source = Source(rows, [f"{name} row {i + 1}" for i in range(len(rows))], digest, name)
    ds = text.tokenize([source], spec, tokenizer).parts[0]
    return ds.remove_columns("row") if "row" in ds.column_names else ds


def _pairs(retain: RetainSet, tokenizer) -> list[tuple[list[int], str]]:
    """(prompt ids, reference text) of each retain row, token for token as training builds a row; the whole row
    and no reference ("") where it has none (format text)."""
    from lorafit.stages.eval_common import split_row

    stop = stop_ids(tokenizer, retain.spec)
    out = []
    for row in retain.dataset:
        found = split_row(row["input_ids"], row["labels"]) if retain.spec.format != "text" else None
        if found and found[0]:
            ids = found[1]
            end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            out.append((found[0], tokenizer.decode(ids[:end], skip_special_tokens=True).strip()))
        else:
            out.append((list(row["input_ids"]), ""))
    return out


def _answers(model, tokenizer, retain: RetainSet, batch_size: int, desc: str, *, adapter: bool) -> list[str]:
    import contextlib

    pairs = _pairs(retain, tokenizer)
    prompts = [p for p, _ in pairs]
    refs = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for _, r in pairs]
    max_new = min(max(refs, default=0) + 24, 64)  # room for a sentence around a short answer
    context = policies.context_limit(getattr(model, "config", None), tokenizer)
    if context:
        max_new = max(1, min(max_new, context[0] - max(len(p) for p in prompts)))
    was_training = getattr(model, "training", False)
    off = model.disable_adapter() if not adapter and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    try:
        model.eval()
        with off:
            return generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new, stop=stop_ids(tokenizer, retain.spec),
                                   batch_size=batch_size, desc=desc)
    finally:
        model.train(was_training)


def measure_retain(ctx, retain: RetainSet) -> dict:
    """Base vs adapter on the retain rows: loss, exact_match and contains (where the rows have references); what
    dropped beyond evaluation.retain_tolerance (relative to the base), and the rows the adapter no longer answers."""
    from lorafit.stages.eval_common import held_out_loss

    if not ctx.main_process or ctx.sharded:
        return {"source": retain.name, "note": "measured by `lorafit evaluate RUN_DIR` (one process)"} \
            if ctx.main_process else {}
    if retain.skipped:
        return {"source": retain.name, "note": retain.skipped}
    trainer, spec, tok = ctx.trainer, ctx.spec, ctx.tokenizer
    out: dict = {"source": retain.name, "rows": len(retain.rows), "tolerance": spec.retain_tolerance}
    if retain.kept_of is not None:
        out["source"] = f"{retain.name} ({len(retain.rows)} of {retain.kept_of} the base answers right)"
    metrics: dict = {"loss": {"adapter": held_out_loss(trainer, retain.dataset, "retain")}}
    if spec.compare_base:
        with trainer.model.disable_adapter():
            metrics["loss"]["base"] = held_out_loss(trainer, retain.dataset, "retain_base")
    pairs = _pairs(retain, tok)
    refs = [r for _, r in pairs]
    referenced = [i for i, r in enumerate(refs) if r]
    answers: dict = {}
    if referenced:
        answers["adapter"] = _answers(trainer.model, tok, retain, ctx.batch_size, "retain (adapter)", adapter=True)
        if spec.compare_base:
            answers["base"] = retain.base_answers or _answers(trainer.model, tok, retain, ctx.batch_size,
                                                              "retain (base)", adapter=False)
        for who, texts in answers.items():
            scores = M.generation_scores([texts[i] for i in referenced], [refs[i] for i in referenced])
            for name, value in scores.items():
                metrics.setdefault(name, {})[who] = value
    out["metrics"] = metrics
    out["flagged"] = _drops(metrics, spec.retain_tolerance, referenced=bool(referenced))
    if referenced and "base" in answers and not any(metrics[k].get("base") for k in ("exact_match", "contains")):
        out["note"] = ("the base answers none of these rows right, so no drop can show in exact_match or contains: "
                       "give rows the base already handles")
    if referenced and "base" in answers:
        lost = [i for i in referenced if M.contains(answers["base"][i], refs[i])
                and not M.contains(answers["adapter"][i], refs[i])]
        out["lost_rows"] = len(lost)
        from lorafit.core.prompts import user_turn

        out["samples"] = [{"prompt": user_turn(retain.rows[i], retain.spec), "reference": refs[i],
                           "base": answers["base"][i], "adapter": answers["adapter"][i]} for i in lost[:5]]
    return out


def _drops(metrics: dict, tolerance: float, *, referenced: bool) -> list[str]:
    """What dropped beyond the tolerance, relative to the base: a score (where rows have references), else the
    loss rising."""
    flagged = []
    for name in ("exact_match", "contains") if referenced else ():
        base, adapter = (metrics.get(name) or {}).get("base"), (metrics.get(name) or {}).get("adapter")
        if base and adapter is not None and (base - adapter) / base > tolerance:
            flagged.append(f"{name} {base:.4f} → {adapter:.4f} ({(adapter - base) / base:+.0%})")
    loss = metrics.get("loss") or {}
    if not referenced and loss.get("base") and loss.get("adapter") is not None \
            and (loss["adapter"] - loss["base"]) / loss["base"] > tolerance:
        flagged.append(f"loss {loss['base']:.4f} → {loss['adapter']:.4f} "
                       f"({(loss['adapter'] - loss['base']) / loss['base']:+.0%})")
    return flagged
