"""What the evaluate stage's task metric functions share: the EvalContext they are given, base vs adapter on
the same weights, the in-order forward pass of the classifying tasks (seq_cls, token_cls) and the greedy
generation metrics of the generating ones (causal_lm, seq2seq_lm).

Its own module so that stages.evaluate and the task modules (stages.token_eval, stages.seq2seq_eval) all
import it without an import cycle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from lorafit import log
from lorafit.core import metrics as M
from lorafit.core import distributed, policies
from lorafit.core.generation import generate_greedy, prompt_ids, stop_ids
from lorafit.recipe import EvaluationSpec, Recipe


@dataclass
class EvalContext:
    """What a task's metric function is given."""

    trainer: Any                    # transformers Trainer; trainer.model is the PeftModel (base + adapter)
    dataset: Any | None             # datasets.Dataset of the eval rows as trained (input_ids, labels, ...),
                                    # evaluation.max_samples applied; None when there are no eval rows
    tokenizer: Any
    recipe: Recipe                  # .evaluation (this section), .data (format, columns), .model, .training
    label_names: list[str] | None   # class names of a labelled task (None: integer labels or no labels)
    main_process: bool              # False on the other ranks under torchrun: only rank 0 writes the results

    @property
    def spec(self) -> EvaluationSpec:
        return self.recipe.evaluation

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size or self.recipe.training.batch_size

    @property
    def sharded(self) -> str | None:
        """Why every forward pass needs every rank, or None (core.distributed.sharded_weights). Under plain DDP
        trainer.model is the unwrapped module (only FSDP makes it the wrapped one): a forward on rank 0 alone
        runs no collective."""
        return distributed.sharded_weights(self.recipe.training.distributed)


def base_and_adapter(ctx: EvalContext, measure: Callable[[str], Any]) -> dict:
    """{"adapter": measure("adapter"), "base": measure("base") with the adapter disabled}; "base" only
    under evaluation.compare_base."""
    adapter = measure("adapter")
    if not ctx.spec.compare_base:
        return {"adapter": adapter}
    with ctx.trainer.model.disable_adapter():
        return {"base": measure("base"), "adapter": adapter}


def by_metric(scores: dict) -> dict:
    """{"adapter": {m: x}, "base": {m: y}} → {m: {"adapter": x, "base": y}}."""
    table: dict = {}
    for which, values in scores.items():
        for name, value in values.items():
            table.setdefault(name, {})[which] = value
    return table


def predict_in_order(ctx: EvalContext, desc: str) -> dict | None:
    """{"adapter": (predictions, labels), "base": ...}: argmax of the logits and the labels, one entry per eval
    row in dataset order (a class for seq_cls, a list per token for token_cls, labels padded with IGNORE).

    Its own pass, not Trainer.predict: with training.group_by_length the Trainer's eval sampler is a
    LengthGroupedSampler that reorders rows, and samples must pair each text with its own predictions. A batch
    that runs out of memory is halved and the rest go on at that size (core.oom.in_batches).
    Runs on rank 0 alone, or on every rank when the weights are sharded (each rank the same batches, so
    every forward's collectives match); None on the ranks that do not report."""
    import torch

    from lorafit.core.oom import in_batches

    if not (ctx.main_process or ctx.sharded):
        return None
    model = ctx.trainer.model.eval()

    def predict(which: str) -> tuple[list, list]:
        def run_batch(rows: list[int]) -> list[tuple]:
            batch = ctx.trainer.data_collator([ctx.dataset[i] for i in rows])
            labels = batch.pop("labels").tolist()
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
            return list(zip(logits.argmax(-1).tolist(), labels))

        what = f"{desc} ({which})"
        with log.Progress(what, total=len(ctx.dataset), unit="row") as progress, torch.no_grad(), \
                ctx.trainer.autocast_smart_context_manager():
            found = in_batches(list(range(len(ctx.dataset))), ctx.batch_size, run_batch, what=what, progress=progress)
        return [p for p, _ in found], [y for _, y in found]

    found = base_and_adapter(ctx, predict)
    return found if ctx.main_process else None


# Unless evaluation.max_new_tokens says otherwise, no generation runs longer than this: a reference of thousands
# of tokens would otherwise make every row's greedy answer that long, base and adapter.
GENERATION_CAP = 256


def new_tokens(spec: EvaluationSpec, references: list[int], prompts: list[int],
               context: tuple[int, str] | None) -> tuple[int, str | None]:
    """(max_new_tokens, a note or None): evaluation.max_new_tokens when set, else the longest reference plus 8
    (an answer that runs past it is wrong anyway; 64 without references) capped at GENERATION_CAP; never past
    the model's context (*context*: policies.context_limit) after the longest prompt."""
    note = None
    if spec.max_new_tokens:
        max_new = spec.max_new_tokens
    else:
        max_new = max(references) + 8 if references else 64
        if max_new > GENERATION_CAP:
            longer = sum(1 for n in references if n > GENERATION_CAP)
            note = (f"generation capped at {GENERATION_CAP} new tokens (evaluation.max_new_tokens unset): "
                    f"{longer} reference{'s' if longer != 1 else ''} longer than that cannot match exactly; set "
                    "evaluation.max_new_tokens to generate longer answers")
            max_new = GENERATION_CAP
    if context and prompts:
        max_new = max(1, min(max_new, context[0] - max(prompts)))
    return max_new, note


def generation_cost(rows: int, prompts: int, max_new: int, passes: tuple[str, ...], batch_size: int) -> str:
    """What a generation pass will cost, said before it starts: the rows and prompts, who answers them, and the
    most tokens it can generate (every answer running to max_new_tokens) in how many batches."""
    n = rows + prompts
    batches = -(-n // max(1, batch_size))
    return (f"greedy generation of {rows} eval rows and {prompts} prompts ({' and '.join(passes)}), max_new_tokens "
            f"{max_new}: generated tokens at most {n * max_new * len(passes):,}, in {batches} batches of up to "
            f"{batch_size} per pass, each up to {max_new} decoding steps")


def _decode(tokenizer, ids: list[int], stop: list[int]) -> str:
    end = next((k for k, t in enumerate(ids) if t in stop), len(ids))
    return tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def generation_metrics(ctx: EvalContext, split: Callable[[dict], tuple[list[int], list[int]] | None] | None,
                       note: str | None = None) -> dict:
    """exact_match and contains of greedy generations against each eval row's reference, on the first
    evaluation.generate_samples rows; and evaluation.prompts. *split* turns a row (input_ids, labels) into
    (prompt ids, reference ids), token for token as training built it, or None to skip the row; *split* None:
    the metrics do not apply (*note* says why). Generation runs on rank 0 alone, and not at all when the
    weights are sharded (a note says so)."""
    spec, data, tok = ctx.spec, ctx.recipe.data, ctx.tokenizer
    pairs = []
    if spec.metrics and ctx.dataset is not None and split is not None:
        n = len(ctx.dataset) if spec.generate_samples is None else min(len(ctx.dataset), spec.generate_samples)
        rows = ctx.dataset.select(range(n)) if n else []
        pairs = [p for p in (split(r) for r in rows) if p and p[0]]
    if not (pairs or spec.prompts):
        return {"note": note} if note else {}
    if ctx.sharded:
        why = (f"exact_match/contains and evaluation.prompts skipped: {ctx.sharded}, and generation on one of "
               "them would wait for the others; run `lorafit evaluate RUN_DIR` (one process) after training")
        return {"note": f"{note}; {why}" if note else why}
    if not ctx.main_process:  # generation runs on rank 0 alone; the others have nothing to report
        return {}
    asked = [prompt_ids(p, tok, data) for p in spec.prompts]
    stop = stop_ids(tok, data)
    prompts = [p for p, _ in pairs] + asked
    model = ctx.trainer.model.eval()
    context = policies.context_limit(getattr(model, "config", None), tok)
    max_new, capped = new_tokens(spec, [len(r) for _, r in pairs], [len(p) for p in prompts], context)
    if capped:
        note = f"{note}; {capped}" if note else capped

    def run(which: str) -> list[str]:
        with ctx.trainer.autocast_smart_context_manager():
            return generate_greedy(model, tok, prompts, max_new_tokens=max_new, stop=stop,
                                   batch_size=ctx.batch_size, desc=f"generate ({which})")

    log.info("evaluate: " + generation_cost(len(pairs), len(asked), max_new,
                                           ("base", "adapter") if spec.compare_base else ("adapter",), ctx.batch_size))
    texts = base_and_adapter(ctx, run)
    out: dict = {"note": note} if note else {}
    if pairs:
        refs = [_decode(tok, r, stop) for _, r in pairs]
        out["metrics"] = by_metric({w: M.generation_scores(t[:len(pairs)], refs) for w, t in texts.items()})
        out["rows"] = len(pairs)
        out["samples"] = [{"prompt": tok.decode(p, skip_special_tokens=True), "reference": ref,
                           **{w: t[i] for w, t in texts.items()}}
                          for i, ((p, _), ref) in enumerate(zip(pairs[:spec.report_samples], refs))]
    if asked:
        out["prompts"] = [{"prompt": text, **{w: t[len(pairs) + i] for w, t in texts.items()}}
                          for i, text in enumerate(spec.prompts)]
    return out
