"""The advice said before training (docs/advice.md): the facts of this run gathered, the rules of core/advice.py
run on them, advice.ignore applied, advice.strict (or --strict, or data.strict, its former name) enforced.

``check`` is the one function `validate` and `train` call, so they never disagree; under torchrun every rank
computes the same advice (the data was agreed on), and rank 0 alone says it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from lorafit import log
from lorafit.core import distributed, policies
from lorafit.core.advice import Advice, Facts, advise, epochs, examples, optimizer_steps, resize_fix
from lorafit.errors import AdviceError, DataError
from lorafit.recipe import Recipe


@dataclass
class Findings:
    given: list[Advice]                               # what applies and is not silenced, in RULES order
    silenced: list[str] = field(default_factory=list)  # codes that applied, silenced by advice.ignore
    ignore: list[str] = field(default_factory=list)    # advice.ignore as the recipe says it
    run: dict = field(default_factory=dict)            # what the rules counted: optimizer steps, epochs, rows a step

    def record(self) -> dict:
        """metrics.json's and `validate --json`'s "advice"."""
        return {"given": [asdict(a) for a in self.given], "silenced": self.silenced, "ignore": self.ignore,
                "run": self.run}


def facts(recipe: Recipe, stats: dict, tokenizer, config, layout: dict) -> Facts:
    """This run's facts: the data stage's *stats*, the model's *layout* (targets.layout), the tokenizer, the
    model's context, this machine and the process count."""
    context = policies.context_limit(config, tokenizer) if config is not None else None
    return Facts(data=stats, layout=layout or {}, tokenizer_size=len(tokenizer) if tokenizer is not None else None,
                 context=context[0] if context else None, device=policies.this_device(),
                 gradient_checkpointing=policies.gradient_checkpointing(recipe),
                 world_size=distributed.world_size())


def check_vocabulary(stats: dict, tokenizer, layout: dict) -> None:
    """A row holding a token id the model's input embedding lacks (a token added to the tokenizer, not to the
    model) would stop training with an IndexError: an error (exit 2) naming the row, before any weight loads."""
    rows, top = (layout or {}).get("embedding_rows"), stats.get("top_token")
    if not rows or not top or top["id"] < rows:
        return
    token = tokenizer.convert_ids_to_tokens(top["id"]) if tokenizer is not None else None
    raise DataError(f"token id {top['id']:,}{f' ({token!r})' if token else ''} has no row in the model's input "
                    f"embedding ({rows:,} rows): the tokenizer holds tokens that were added to it, not to the model",
                    where=top["where"], fix=resize_fix(layout) + "; or keep such tokens out of the data")


def check(recipe: Recipe, stats: dict, tokenizer, config, layout: dict) -> Findings:
    """Every advice of this run, advice.ignore applied. Raises AdviceError when advice.strict (or data.strict)
    is on and any applies; otherwise returns them, for the caller to say (validate's table, train's warnings).
    A token id past the model's embedding is an error first (check_vocabulary)."""
    check_vocabulary(stats, tokenizer, layout)
    known = facts(recipe, stats, tokenizer, config, layout)
    found = advise(recipe, known)
    ignore = list(recipe.advice.ignore)
    given = [a for a in found if a.code not in ignore]
    n, tr = examples(stats), recipe.training
    run = {"optimizer_steps": optimizer_steps(recipe, n, known.world_size),
           "epochs": round(epochs(recipe, n, known.world_size), 2),
           "rows_per_step": tr.batch_size * tr.grad_accum * known.world_size, "learning_rate": tr.learning_rate}
    findings = Findings(given, [a.code for a in found if a.code in ignore], ignore, run)
    if recipe.data.strict and not recipe.advice.strict:
        log.info("data.strict: the former name of advice.strict (the data checks are advice now, docs/advice.md): "
                 "every advice is an error")
    if given and (recipe.advice.strict or recipe.data.strict):
        where = "advice.strict" if recipe.advice.strict else "data.strict"
        also = " (--strict)" if recipe.advice.strict else ""
        raise AdviceError(f"{len(given)} advice {'is an error' if len(given) == 1 else 'are errors'} under {where}"
                          f"{also}: " + "; ".join(f"[{a.code}] {a.where}: {a.message}" for a in given),
                          where=where,
                          fix=f"follow it (docs/advice.md), or silence a code on purpose: advice.ignore: "
                              f"[{', '.join(a.code for a in given)}]")
    return findings
