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
from lorafit.core.prompts import IGNORE, user_turn
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
    rows: Any | None = None         # the eval rows as read (stages.data.Rows), aligned with dataset: previews
    train_rows: Any | None = None   # the train rows as read: few-shot examples (evaluation.baselines)
    planning: bool = False          # True: say what the evaluation will cost ({"plan": [...]}), measure nothing

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


def preview(ctx: EvalContext, i: int, ids: list[int] | None = None) -> str:
    """Eval row *i* as the user wrote it (core.prompts.user_turn: the last user message, the instruction and
    input, ...), never the template's boilerplate or a default system prompt; without the rows as read (or
    where the row gives nothing), *ids* (else the row's input_ids) decoded."""
    if ctx.rows is not None and i < len(ctx.rows):
        text = user_turn(ctx.rows[i], ctx.recipe.data)
        if text:
            return text
    return ctx.tokenizer.decode(ids if ids is not None else ctx.dataset[i]["input_ids"], skip_special_tokens=True)


def passes(ctx: EvalContext) -> tuple[str, ...]:
    return ("base", "adapter") if ctx.spec.compare_base else ("adapter",)


def split_row(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) of a trained row: the reference is its last trained span (the response,
    or the last assistant turn of a chat, with its closing token), the prompt everything before it, token
    for token as training built it. None when nothing is trained."""
    trained = [i for i, x in enumerate(labels) if x != IGNORE]
    if not trained:
        return None
    end = start = trained[-1]
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return list(input_ids[:start]), list(input_ids[start:end + 1])


def held_out_loss(trainer, dataset, prefix: str) -> float:
    """The Trainer's mean loss over *dataset* (*prefix*: eval for the adapter's held-out loss, base with the
    adapter disabled, retain...); an out-of-memory halves the eval batch and starts the pass again
    (core.oom.halving); the recipe's batch size is put back after."""
    from lorafit.core.oom import halving

    batch = trainer.args.per_device_eval_batch_size
    logged = len(trainer.state.log_history)

    def run(size: int) -> float:
        trainer.args.per_device_eval_batch_size = size
        return trainer.evaluate(eval_dataset=dataset, metric_key_prefix=prefix)[f"{prefix}_loss"]

    try:
        return halving(run, batch, what=f"the {'adapter' if prefix == 'eval' else prefix + ' rows'}' loss")
    finally:
        trainer.args.per_device_eval_batch_size = batch
        if prefix != "eval":  # only the adapter's held-out loss belongs in training's eval loss history
            del trainer.state.log_history[logged:]


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
    evaluation.generate_samples rows (and the few-shot baseline's, evaluation.baselines); and evaluation.prompts.
    *split* turns a row (input_ids, labels) into (prompt ids, reference ids), token for token as training built
    it, or None to skip the row; *split* None: the metrics do not apply (*note* says why). Generation runs on
    rank 0 alone, and not at all when the weights are sharded (a note says so). ctx.planning: what it will cost.
    "records": each generated row's outcome, for eval_predictions.jsonl and the failures."""
    from lorafit.stages.baselines import few_shot_k, few_shot_prompts

    spec, data, tok = ctx.spec, ctx.recipe.data, ctx.tokenizer
    pairs, index = [], []
    if spec.metrics and ctx.dataset is not None and split is not None:
        n = len(ctx.dataset) if spec.generate_samples is None else min(len(ctx.dataset), spec.generate_samples)
        for i, row in enumerate(ctx.dataset.select(range(n)) if n else []):
            found = split(row)
            if found and found[0]:
                pairs.append(found)
                index.append(i)
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
    model = ctx.trainer.model
    context = policies.context_limit(getattr(model, "config", None), tok)
    max_new, capped = new_tokens(spec, [len(r) for _, r in pairs], [len(p) for p in prompts], context)
    if capped:
        note = f"{note}; {capped}" if note else capped
    k = few_shot_k(spec) if pairs and spec.compare_base else None
    shots, shot_note = few_shot_prompts(ctx, index, k, max_new, context) if k else (None, None)
    if ctx.planning:
        plan = [generation_cost(len(pairs), len(asked), max_new, passes(ctx), ctx.batch_size)]
        if shots:
            plan.append(f"few-shot baseline (the base, k={k}): {len(shots)} rows, generated tokens at most "
                        f"{len(shots) * max_new:,}, prompts of up to {max(len(x) for x in shots):,} tokens")
        return {"plan": plan}

    model.eval()

    def run(which: str, asking: list[list[int]] = prompts) -> list[str]:
        with ctx.trainer.autocast_smart_context_manager():
            return generate_greedy(model, tok, asking, max_new_tokens=max_new, stop=stop,
                                   batch_size=ctx.batch_size, desc=f"generate ({which})")

    texts = base_and_adapter(ctx, run)
    if shots:
        with model.disable_adapter():
            texts["few_shot"] = run("base, few-shot", shots)
    out: dict = {"note": note} if note else {}
    if shot_note:
        out["note"] = f"{out['note']}; {shot_note}" if out.get("note") else shot_note
    if pairs:
        refs = [_decode(tok, r, stop) for _, r in pairs]
        out["metrics"] = by_metric({w: M.generation_scores(t[:len(pairs)], refs) for w, t in texts.items()})
        out["rows"] = len(pairs)
        if shots:
            out["few_shot_k"] = k
        shown = [preview(ctx, i, p) for i, (p, _) in zip(index, pairs)]
        out["samples"] = [{"prompt": shown[j], "reference": refs[j], **{w: t[j] for w, t in texts.items()}}
                          for j in range(min(len(pairs), spec.report_samples))]
        out["records"] = {i: {"prompt": shown[j], "measured": "generated", "reference": refs[j],
                              **{w: t[j] for w, t in texts.items()},
                              "correct": M.exact_match(texts["adapter"][j], refs[j]),
                              "contains": M.contains(texts["adapter"][j], refs[j]),
                              **({"base_correct": M.exact_match(texts["base"][j], refs[j])} if "base" in texts else {})}
                          for j, i in enumerate(index)}
    if asked:
        out["prompts"] = [{"prompt": text, **{w: t[len(pairs) + i] for w, t in texts.items() if w != "few_shot"}}
                          for i, text in enumerate(spec.prompts)]
    return out


def row_losses(ctx: EvalContext, rows: list[int]) -> list[float | None]:
    """The adapter's mean loss on each of the eval rows *rows* (its trained tokens, as training's loss: shifted
    for a decoder-only model), one forward pass in batches (halved on an out-of-memory)."""
    import torch

    from lorafit.core.oom import in_batches

    model = ctx.trainer.model.eval()
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))

    def run_batch(chunk: list[int]) -> list[float | None]:
        batch = ctx.trainer.data_collator([ctx.dataset[i] for i in chunk])
        labels = batch.pop("labels")
        inputs = {k: v.to(model.device) for k, v in batch.items()}
        if encoder_decoder:
            inputs["labels"] = labels.to(model.device)
        logits = model(**inputs).logits.float()
        labels = labels.to(logits.device)
        if not encoder_decoder:
            logits, labels = logits[:, :-1], labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = labels != IGNORE
        totals, counts = (losses * mask).sum(-1), mask.sum(-1)
        return [round(t.item() / c.item(), 6) if c.item() else None for t, c in zip(totals, counts)]

    with log.Progress("loss per row", total=len(rows), unit="row") as progress, torch.no_grad(), \
            ctx.trainer.autocast_smart_context_manager():
        return in_batches(rows, ctx.batch_size, run_batch, what="the per-row loss", progress=progress)
