"""Advice: the known LoRA mistakes, as rules over the recipe, the data and the model (docs/advice.md).

Each rule has a stable code, one threshold and a section in docs/advice.md (its reasoning, a source, the fix).
``advise`` runs them all on a recipe and the ``Facts`` of its run, with no model and no machine: the data
stage's stats, the model's layout (targets.layout, from its meta model), the tokenizer's size, the device.
stages/advise.py gathers those facts for `validate` and `train` alike, so the two never disagree.
This module imports nothing that imports the recipe: recipe.py takes its codes (``CODES``) for advice.ignore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lorafit.core import tasks


@dataclass(frozen=True)
class Rule:
    code: str
    check: str       # validate's table line it belongs to: model, data, lengths, rows, targets, training
    threshold: float  # its one threshold (per training method once there is more than one: today supervised LoRA)
    title: str       # what it catches, in a few words


# Data sizes the rules share: "small" data (rank-high, no-dropout, many-epochs), and the size above which a high
# learning rate is advised against (lr-high), both counted in training rows.
SMALL_DATA = 5_000
LR_HIGH_ROWS = 1_000
# The rank that usually fits a data size (rank-high's fix): (rows below, ranks).
RANK_BANDS = ((10_000, "4–16"), (100_000, "16–32"), (math.inf, "32–64"))

RULES: dict[str, Rule] = {r.code: r for r in (
    Rule("rank-high", "targets", 64, f"lora.r ≥ 64 on fewer than {SMALL_DATA:,} training rows"),
    Rule("alpha-ratio", "targets", 2, "lora.alpha / lora.r more than 2× away from the usual 1–2"),
    Rule("lr-low", "training", 5e-5, "training.learning_rate below 5e-5"),
    Rule("lr-high", "training", 1e-3, f"training.learning_rate above 1e-3 on more than {LR_HIGH_ROWS:,} training rows"),
    Rule("attention-only", "targets", 0, "only attention modules adapted, on a model with MLP projections"),
    Rule("no-dropout", "targets", 0, f"lora.dropout 0 on fewer than {SMALL_DATA:,} training rows"),
    Rule("no-eval", "data", 0, "no held-out rows"),
    Rule("eval-leak", "rows", 0, "held-out rows that also occur in training"),
    Rule("duplicates", "rows", 0.01, "more than 1 % of data.train's rows repeat an earlier row"),
    Rule("empty-fields", "rows", 0, "rows with an empty required field"),
    Rule("rows-dropped", "rows", 0, "rows dropped: nothing left to train within data.max_length"),
    Rule("truncation", "lengths", 0.05, "more than 5 % of rows longer than data.max_length"),
    Rule("eos-cut", "lengths", 0.01, "more than 1 % of rows lose their trained EOS to truncation"),
    Rule("few-steps", "training", 50, "fewer than 50 optimizer steps"),
    Rule("many-epochs", "training", 3, f"more than 3 epochs on fewer than {SMALL_DATA:,} training rows"),
    Rule("qlora-no-gc", "training", 0, "a quantized base on a GPU without gradient checkpointing"),
    Rule("new-tokens", "model", 0, "tokens added to the tokenizer that the model's embedding lacks"),
)}
CODES = tuple(RULES)


@dataclass(frozen=True)
class Advice:
    code: str
    check: str      # validate's table line (Rule.check)
    where: str      # the recipe path to change (or data file)
    message: str    # what was found, with its figures
    fix: str


@dataclass(frozen=True)
class Facts:
    """What the rules look at besides the recipe. ``data``: the data stage's stats (train_rows, eval_rows,
    truncated, eos_cut, dropped_fully_masked, duplicates, eval_in_train, empty_fields, token_lengths, files,
    first_rows, packed_blocks); ``layout``: targets.layout of the model (adapted and existing blocks, the input
    embedding's path and rows, the output embedding's path)."""

    data: dict
    layout: dict = field(default_factory=dict)
    tokenizer_size: int | None = None
    context: int | None = None        # the model's context in tokens, when known (policies.context_limit)
    device: str = "cpu"               # where training runs: cuda | cpu
    gradient_checkpointing: bool = False  # as policies.gradient_checkpointing decides it for the recipe
    world_size: int = 1               # training processes (validate: 1)


def advise(recipe, facts: Facts) -> list[Advice]:
    """Every advice *recipe* (a lorafit.recipe.Recipe) earns on *facts*, in RULES order; advice.ignore is not
    applied here (stages/advise.py does, so that a silenced advice is still recorded)."""
    found = []
    for code, rule in RULES.items():
        hit = _CHECKS[code](recipe, facts, rule.threshold)
        if hit is not None:
            where, message, fix = hit
            found.append(Advice(code, rule.check, where, message, fix))
    return found


def optimizer_steps(recipe, examples: int, world_size: int = 1, *, epochs: float | None = None) -> int:
    """Optimizer steps of the run, as transformers' Trainer counts them: training.max_steps, else the epochs (or
    *epochs*) over *examples* rows (packed blocks with data.packing) split over *world_size* processes, grad_accum
    batches a step."""
    tr = recipe.training
    if tr.max_steps and epochs is None:
        return tr.max_steps
    batches = math.ceil(math.ceil(examples / world_size) / tr.batch_size)
    return math.ceil((epochs or tr.epochs) * max(1, math.ceil(batches / tr.grad_accum)))


def epochs(recipe, examples: int, world_size: int = 1) -> float:
    """Passes over the training rows the run makes (training.max_steps turned into epochs)."""
    tr = recipe.training
    if not tr.max_steps or not examples:
        return float(tr.epochs)
    return tr.max_steps * tr.batch_size * tr.grad_accum * world_size / examples


def examples(data: dict) -> int:
    """What an epoch goes over, from the data stage's stats: the packed blocks (data.packing), else the train rows."""
    return int(data.get("packed_blocks") or data.get("train_rows", 0))


def rank_band(rows: int) -> str:
    return next(ranks for below, ranks in RANK_BANDS if rows < below)


# ----------------------------------------------------------------------------------------------
# The rules: each returns (where, message, fix) or None.


def _rows(facts: Facts) -> int:
    return int(facts.data.get("train_rows", 0))


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f} %" if total else "0 %"


def _rank_high(recipe, facts, threshold):
    r, rows = recipe.lora.r, _rows(facts)
    if r >= threshold and rows < SMALL_DATA:
        return ("lora.r", f"r={r} on {rows:,} training rows: a high rank on little data memorises it rather than "
                          "generalising (rank barely matters once every linear layer is adapted)",
                f"start from r {rank_band(rows)} at this size (< 10k rows: 4–16; 10k–100k: 16–32; more: 32–64)")
    return None


def _alpha_ratio(recipe, facts, threshold):
    lora = recipe.lora
    if lora.use_rslora:  # alpha/√r: another scale, chosen on purpose
        return None
    ratio = lora.alpha / lora.r
    if ratio < 1 / threshold or ratio > 2 * threshold:
        rs = " or, at this rank, lora.use_rslora: true (scale alpha/√r)" if lora.r >= 64 else ""
        return ("lora.alpha", f"alpha/r = {ratio:.3g} (alpha {lora.alpha:g}, r {lora.r}): the update is scaled by "
                              "alpha/r, so this acts roughly as a learning "
                              f"rate {ratio / 2:.2g}× the one alpha = 2·r gives",
                f"set lora.alpha: {2 * lora.r}{rs}")
    return None


def _lr_low(recipe, facts, threshold):
    lr = recipe.training.learning_rate
    if lr < threshold:
        return ("training.learning_rate", f"learning rate {lr:g} is below {threshold:g}: LoRA's B starts at zero, and "
                                          "at a full fine-tuning rate the adapter barely moves",
                "LoRA trains at about 10× full fine-tuning's rate: 2e-4 is a good start (1e-4 to 5e-4)")
    return None


def _lr_high(recipe, facts, threshold):
    lr, rows = recipe.training.learning_rate, _rows(facts)
    if lr > threshold and rows > LR_HIGH_ROWS:
        return ("training.learning_rate", f"learning rate {lr:g} is above {threshold:g} on {rows:,} training rows: "
                                          "the loss tends to spike or diverge over a long run",
                "lower it to 1e-4–5e-4 (2e-4 is a good start)")
    return None


def _attention_only(recipe, facts, threshold):
    layout = facts.layout
    targeted, present = set(layout.get("targeted_blocks", ())), set(layout.get("model_blocks", ()))
    if not tasks.task(recipe.model.task).generates:  # a classifier: LoRA's GLUE results adapt attention only
        return None
    if targeted and targeted <= {"attention"} and "mlp" in present:
        names = recipe.lora.target_modules
        shown = names if isinstance(names, str) else ", ".join(names)
        return ("lora.target_modules", f"LoRA adapts attention only ({shown}) on a model with MLP projections: "
                                       "far less than adapting every linear layer learns",
                "set lora.target_modules: all-linear (or add the MLP projections: `lorafit find-targets` lists them)")
    return None


def _no_dropout(recipe, facts, threshold):
    rows = _rows(facts)
    if recipe.lora.dropout <= threshold and rows < SMALL_DATA:
        return ("lora.dropout", f"0 on {rows:,} training rows: nothing regularises the adapter on small data",
                "set lora.dropout: 0.05 (0.1 on a few hundred rows)")
    return None


def _no_eval(recipe, facts, threshold):
    if int(facts.data.get("eval_rows", 0)) <= threshold:
        return ("data.eval_fraction", "no held-out rows: the adapter cannot be compared with the base model, and "
                                      "overfitting goes unseen",
                "set data.eval_fraction: 0.1, or data.eval: a file of held-out rows")
    return None


def _first(facts: Facts, key: str) -> str:
    loc = (facts.data.get("first_rows") or {}).get(key)
    return f", first at {loc}" if loc else ""


def _eval_leak(recipe, facts, threshold):
    n = int(facts.data.get("eval_in_train", 0))
    if n <= threshold:
        return None
    if recipe.data.eval:
        return ("data.eval", f"{n} rows of data.eval also occur in data.train{_first(facts, 'eval_in_train')}: the "
                             "eval loss then measures memory, not learning",
                "remove them from one of the files")
    return ("data.train", f"{n} of the {facts.data.get('eval_rows', 0)} held-out rows (data.eval_fraction) also "
                          "occur in the training split: duplicates of data.train landed on both sides, so the eval "
                          "loss measures memory, not learning",
            "remove the duplicates from data.train")


def _train_file_rows(facts: Facts) -> int:
    files = facts.data.get("files") or []
    if files and files[0].get("rows") is not None:
        return int(files[0]["rows"])
    return int(facts.data.get("rows_read", 0))


def _duplicates(recipe, facts, threshold):
    n, total = int(facts.data.get("duplicates", 0)), _train_file_rows(facts)
    if total and n / total > threshold:
        return ("data.train", f"{n} of the {total:,} rows of data.train ({_pct(n, total)}) repeat an earlier row"
                              f"{_first(facts, 'duplicates')}: they weigh more in training, and copies can land in "
                              "the held-out split", "remove the duplicates")
    return None


def _empty_fields(recipe, facts, threshold):
    n = int(facts.data.get("empty_fields", 0))
    if n > threshold:
        return ("data.train", f"{n} rows have an empty field{_first(facts, 'empty_fields')}: an empty response trains "
                              "only \"stop now\", an empty prompt nothing useful", "fill or remove them")
    return None


def _rows_dropped(recipe, facts, threshold):
    n = int(facts.data.get("dropped_fully_masked", 0))
    if n > threshold:
        return ("data.max_length", f"{n} rows are dropped: their prompt fills data.max_length="
                                   f"{recipe.data.max_length}, leaving no response token to train"
                                   f"{_first(facts, 'dropped')}", _length_fix(recipe, facts, "or shorten the prompts"))
    return None


def _length_fix(recipe, facts: Facts, otherwise: str) -> str:
    """data.max_length that keeps 99 % of the rows whole (the model's context when that is less)."""
    p99 = int((facts.data.get("token_lengths") or {}).get("p99", 0))
    if p99 <= recipe.data.max_length:
        return otherwise
    if facts.context is not None and p99 > facts.context:
        return f"set data.max_length: {facts.context} (the model's context; 99 % of rows fit in {p99:,}), {otherwise}"
    return f"set data.max_length: {p99} (keeps 99 % of rows whole), {otherwise}"


def _truncation(recipe, facts, threshold):
    n, total = int(facts.data.get("truncated", 0)), int(facts.data.get("rows_read", 0))
    if total and n / total > threshold:
        return ("data.max_length", f"{n} of {total:,} rows ({_pct(n, total)}) are longer than data.max_length="
                                   f"{recipe.data.max_length} and are cut (the start is kept)",
                _length_fix(recipe, facts, "or shorten the rows"))
    return None


def _eos_cut(recipe, facts, threshold):
    n, total = int(facts.data.get("eos_cut", 0)), int(facts.data.get("rows_read", 0))
    if total and n / total > threshold:
        return ("data.max_length", f"{n} of {total:,} rows ({_pct(n, total)}) lose their trained EOS to truncation"
                                   f"{_first(facts, 'eos_cut')}: the model learns to run on instead of stopping",
                _length_fix(recipe, facts, "or shorten the responses"))
    return None


def _examples(facts: Facts) -> int:
    return examples(facts.data)


def _few_steps(recipe, facts, threshold):
    steps = optimizer_steps(recipe, _examples(facts), facts.world_size)
    if steps < threshold:
        tr = recipe.training
        per_step = tr.batch_size * tr.grad_accum * facts.world_size
        where = "training.max_steps" if tr.max_steps else "training.epochs"
        return (where, f"{steps} optimizer steps ({per_step} row{'' if per_step == 1 else 's'} each): too few for LoRA's B, which starts at "
                       "zero, to move far; warmup and Adam's first, noisy steps are much of so short a run",
                f"train for {int(threshold)} steps or more (training.max_steps, or more training.epochs), or take "
                "smaller steps (training.batch_size × grad_accum)")
    return None


def _many_epochs(recipe, facts, threshold):
    rows, examples = _rows(facts), _examples(facts)
    passes = epochs(recipe, examples, facts.world_size)
    if passes > threshold and rows < SMALL_DATA:
        tr = recipe.training
        where = "training.max_steps" if tr.max_steps else "training.epochs"
        return (where, f"{passes:.1f} passes over {rows:,} training rows: beyond {threshold:g} epochs on small data "
                       "the adapter memorises the rows",
                f"train {threshold:g} epochs or fewer (training.max_steps ≤ "
                f"{optimizer_steps(recipe, examples, facts.world_size, epochs=threshold)}), or add data")
    return None


def _qlora_no_gc(recipe, facts, threshold):
    bits = recipe.quantization.bits
    if bits is not None and facts.device == "cuda" and not facts.gradient_checkpointing:
        return ("training.gradient_checkpointing", f"a {bits}-bit base trains on this GPU without gradient "
                                                   "checkpointing: the activations, not the quantized weights, then "
                                                   "fill the GPU (`lorafit estimate` shows both)",
                "set training.gradient_checkpointing: true (or leave it unset: on for a quantized base)")
    return None


def _new_tokens(recipe, facts, threshold):
    rows, size = facts.layout.get("embedding_rows"), facts.tokenizer_size
    if rows is None or size is None or size - rows <= threshold:
        return None
    names = embedding_names(facts.layout)
    return ("model.name", f"the tokenizer holds {size:,} tokens and the model's input embedding "
                          f"({names[0] if names else 'embedding'}) {rows:,} rows: {size - rows} of its tokens were added "
                          f"to the tokenizer, not to the model (ids ≥ {rows:,} have no embedding, and LoRA trains none)",
            resize_fix(facts.layout))


def embedding_names(layout: dict) -> list[str]:
    """The model's own names of its input embedding and output head (targets.layout), e.g. embed_tokens, lm_head."""
    return [n.rsplit(".", 1)[-1] for n in (layout.get("embedding"), layout.get("output_embedding")) if n]


def resize_fix(layout: dict) -> str:
    """The fix for tokens the model's embedding lacks: the new-tokens advice's, and the error when a row uses one
    (stages/advise.check_vocabulary)."""
    return ("resize the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)), saved "
            f"with the model) and train them: lora.modules_to_save: [{', '.join(embedding_names(layout))}]")


_CHECKS = {"rank-high": _rank_high, "alpha-ratio": _alpha_ratio, "lr-low": _lr_low, "lr-high": _lr_high,
           "attention-only": _attention_only, "no-dropout": _no_dropout, "no-eval": _no_eval,
           "eval-leak": _eval_leak, "duplicates": _duplicates, "empty-fields": _empty_fields,
           "rows-dropped": _rows_dropped, "truncation": _truncation, "eos-cut": _eos_cut, "few-steps": _few_steps,
           "many-epochs": _many_epochs, "qlora-no-gc": _qlora_no_gc, "new-tokens": _new_tokens}
