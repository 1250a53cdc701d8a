"""report.md and loss.png beside metrics.json: what the run did and whether the adapter helped, readable
without tools. Written from the recipe and metrics.json alone, so `lorafit evaluate` can write it again."""

from __future__ import annotations

import re
from pathlib import Path

from lorafit import log
from lorafit.core import rundir, tasks
from lorafit.core.files import atomic_write, atomic_write_text
from lorafit.render import change, comparison_rows, few_shot, number, printable
from lorafit.recipe import Recipe


def eval_loss_history(log_history: list[dict]) -> list[dict]:
    """[{step, eval_loss}] of the evaluations during training (the Trainer's log_history), one per step: the
    evaluate stage's own pass after the last step logs that step again."""
    by_step = {e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e}
    return [{"step": step, "eval_loss": loss} for step, loss in sorted(by_step.items())]


def write_report(run_dir: Path, recipe: Recipe, metrics: dict, *, evaluated_by: str | None = None) -> Path | None:
    """Write run_dir/report.md (and loss.png when there is a loss history). Returns the report's path, or None
    when it could not be written (a read-only run dir, a full disk): the report is a summary of files already
    saved, so neither it nor a failed plot (matplotlib missing, a bad value) fails a run or an evaluation."""
    run_dir = Path(run_dir)
    path = run_dir / rundir.REPORT
    try:
        plot = run_dir / rundir.LOSS_PLOT
        has_plot = plot_losses(metrics, plot)
        matrix = run_dir / rundir.CONFUSION_PLOT
        has_matrix = plot_confusion((metrics.get("eval") or {}).get("confusion"), matrix)
        text = report_markdown(recipe, metrics, plot.name if has_plot else None, evaluated_by=evaluated_by,
                               confusion=matrix.name if has_matrix else None)
        atomic_write_text(path, text)
        return path
    except Exception as e:  # the adapter and metrics.json are saved: a missing summary is a warning
        log.warn(f"{path} not written ({type(e).__name__}: {e}); the run's other files are complete")
        return None


def plot_losses(metrics: dict, path: Path) -> bool:
    """Train loss (line) and eval loss (points) by step, headless (Agg canvas, no pyplot state)."""
    train = (metrics.get("train") or {}).get("loss_history") or []
    evals = (metrics.get("eval") or {}).get("loss_history") or []
    if not train and not evals:
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if train:
            ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", linewidth=1.2)
        if evals:
            ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
        base = (metrics.get("eval") or {}).get("base_eval_loss")
        if base is not None:
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        return True
    except Exception as e:  # the report matters more than the picture
        log.warn(f"loss.png not written ({type(e).__name__}: {e}); report.md is written without it")
        return False


def plot_confusion(confusion: dict | None, path: Path) -> bool:
    """The adapter's confusion matrix (rows: the true class, columns: the predicted one), counts in the cells."""
    if not confusion or not confusion.get("adapter"):
        return False
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        matrix, labels = confusion["adapter"], [str(x) for x in confusion["labels"]]
        size = min(12, 2 + 0.6 * len(labels))
        fig = Figure(figsize=(size + 1, size), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title("adapter: confusion matrix (held-out rows)")
        top = max((max(row) for row in matrix), default=0)
        for y, row in enumerate(matrix):
            for x, count in enumerate(row):
                ax.text(x, y, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        return True
    except Exception as e:  # the report matters more than the picture
        log.warn(f"{path.name} not written ({type(e).__name__}: {e}); report.md has the table")
        return False


def _failures(ev: dict, recipe: Recipe) -> list[str]:
    """Where the adapter fails: the first evaluation.report_failures rows it gets wrong, as the user wrote them."""
    if not ev.get("outcome_rows"):
        return []
    wrong, rows, failures = ev.get("wrong_rows", 0), ev["outcome_rows"], ev.get("failures") or []
    what = {"generated": "not an exact match", "classified": "a wrong class", "tagged": "any wrong tag"}
    task = tasks.task(recipe.model.task)
    kind = what["tagged" if task.per_word else "classified" if task.labelled else "generated"]
    out = ["## Where the adapter fails", ""]
    if not wrong:
        return out + [f"None: the adapter gets all {rows} measured rows right.", ""]
    out += [f"{wrong} of {rows} measured rows wrong ({kind})" + (f"; the first {len(failures)}" if failures else "")
            + (f"; every row's outcome in `{ev['predictions']}`." if ev.get("predictions") else "."), ""]
    for f in failures:
        out += [f"### Eval row {f['row']}", "", "Prompt:", "", _fence(f["prompt"]), "",
                "| | |", "|---|---|", f"| reference | {_cell(f.get('reference', ''))} |"]
        out += [f"| {w.replace('_', '-')} | {_cell(f[w])} |" for w in ("adapter", "base", "few_shot") if w in f]
        out.append("")
    return out


def _classes(ev: dict, confusion: str | None) -> list[str]:
    """A classifier's confusion matrix and per-class scores; a tagger's per-entity-type scores."""
    out = []
    matrix = ev.get("confusion") or {}
    if matrix.get("adapter"):
        labels = [_cell(x) for x in matrix["labels"]]
        out += ["## Classes", "", "Confusion matrix of the adapter: rows are the true class, columns the predicted one.",
                "", "| true \\ predicted | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        out += [f"| {labels[y]} | " + " | ".join(str(c) for c in row) + " |" for y, row in enumerate(matrix["adapter"])]
        out.append("")
        if confusion:
            out += [f"![confusion matrix]({confusion})", ""]
    for title, per in (("Per class", ev.get("per_class")), ("Per entity type", ev.get("per_entity"))):
        if not per or not per.get("adapter"):
            continue
        base = per.get("base") or {}
        out += [f"## {title}", "", "| | support | precision | recall | F1 | base F1 |", "|---|---:|---:|---:|---:|---:|"]
        out += [f"| {_cell(k)} | {v['support']} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | "
                f"{number((base.get(k) or {}).get('f1'))} |" for k, v in per["adapter"].items()]
        out.append("")
    return out


def _retain(retain: dict | None) -> list[str]:
    """What it cost: base vs adapter on rows the base already handles, and the drop flagged."""
    if not retain:
        return []
    out = ["## What it cost: forgetting (evaluation.retain)", ""]
    if "metrics" not in retain:
        return out + [f"Not measured: {retain.get('note', '')}.", ""]
    out += [f"On {retain['rows']} rows of {retain['source']}: the base already handles them; the adapter should "
            "too.", "", "| measure | base | adapter | change |", "|---|---:|---:|---:|"]
    out += [f"| {name} | {number(v.get('base'))} | {number(v.get('adapter'))} | {change(v.get('base'), v.get('adapter'))} |"
            for name, v in retain["metrics"].items()]
    out.append("")
    if retain.get("note"):
        out += [f"Note: {retain['note']}.", ""]
    if retain.get("flagged"):
        out += [f"**Forgetting flagged** (a drop beyond {retain['tolerance']:.0%} of the base, "
                f"evaluation.retain_tolerance): {'; '.join(retain['flagged'])}.", ""]
    else:
        out += [f"No drop beyond {retain['tolerance']:.0%} of the base (evaluation.retain_tolerance).", ""]
    for s in retain.get("samples") or []:
        out += ["Answered by the base, no longer by the adapter:", "", _fence(s["prompt"]), "",
                "| | |", "|---|---|", f"| reference | {_cell(s['reference'])} |", f"| base | {_cell(s['base'])} |",
                f"| adapter | {_cell(s['adapter'])} |", ""]
    return out


def _lm_eval(found: dict | None) -> list[str]:
    """EleutherAI's lm-evaluation-harness on base and adapter, side by side (`lorafit evaluate --lm-eval`)."""
    if not found or not found.get("results"):
        return []
    out = ["## lm-evaluation-harness", "", f"lm-eval {found.get('version', '')}, tasks {', '.join(found['results'])}"
           + (f" ({found['note']})" if found.get("note") else "") + ".", "",
           "| task | metric | base | adapter | change |", "|---|---|---:|---:|---:|"]
    for task, metrics in found["results"].items():
        out += [f"| {task} | {m} | {number(v.get('base'))} | {number(v.get('adapter'))} | "
                f"{change(v.get('base'), v.get('adapter'))} |" for m, v in metrics.items()]
    return out + [""]


def _overfitting(overfit: dict | None, best: dict | None) -> list[str]:
    out = []
    if overfit:
        out += [f"**Overfitting**: eval loss was lowest at step {overfit['best_step']} "
                f"({overfit['best_eval_loss']:.4f}) and rose to {overfit['last_eval_loss']:.4f} by step "
                f"{overfit['last_step']}, while the train loss kept falling ({overfit['train_loss_at_best']:.4f} → "
                f"{overfit['train_loss_at_last']:.4f})."
                + ("" if best else " `training.keep_best: true` keeps the best step's adapter."), ""]
    if best and best.get("kept"):
        out += [f"Kept: the adapter of step {best['step']} (eval loss {best['eval_loss']:.4f}, training.keep_best), "
                "not the last step's.", ""]
    return out


def _fence(text: str) -> str:
    """A fenced block that no run of backticks inside *text* can close."""
    text = printable(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def _cell(x) -> str:
    text = printable(str(x)).replace("|", "\\|").replace("\n", " ")
    return text if text.strip() else "*(empty)*"


def report_markdown(recipe: Recipe, metrics: dict, plot: str | None, *, evaluated_by: str | None = None,
                    confusion: str | None = None) -> str:
    m, t, d, ev = recipe.model, metrics.get("train") or {}, metrics.get("data") or {}, metrics.get("eval") or {}
    lora, tr = recipe.lora, recipe.training
    targets = metrics.get("target_modules") or lora.target_modules
    quant = f"{recipe.quantization.bits}-bit" if recipe.quantization.bits else "none"
    out = [f"# lorafit run: {recipe.output.run_name or Path(recipe.output.dir).name}", "",
           "## Recipe", "",
           f"- model: `{m.name}` (task {m.task}), quantization {quant}, precision {metrics.get('precision', '-')}",
           f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets "
           f"{', '.join(targets) if isinstance(targets, list) else targets}"
           + (f"; {metrics['trainable_params']:,} trainable params ({metrics['trainable_percent']:.4f} %)"
              if "trainable_params" in metrics else ""),
           f"- data: `{recipe.data.train}` (format {recipe.data.format}"
           + (f", eval `{recipe.data.eval}`" if recipe.data.eval else f", eval_fraction {recipe.data.eval_fraction}")
           + f", max_length {recipe.data.max_length})",
           f"- training: {t.get('steps', '-')} steps ({t.get('epochs', '-')} epochs), batch {tr.batch_size} x "
           f"grad_accum {tr.grad_accum}, learning rate {tr.learning_rate:g}, seed {tr.seed}", ""]
    if d:
        n = d.get("token_lengths") or {}
        out += ["## Data", "",
                "| train rows | eval rows | train tokens | trained tokens | tokens/row p50 | p95 | max | truncated "
                "| dropped | duplicates |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                f"| {d.get('train_rows', '-')} | {d.get('eval_rows', '-')} | {d.get('train_tokens', 0):,} | "
                f"{d.get('trainable_tokens', 0):,} | {n.get('p50', '-')} | {n.get('p95', '-')} | {n.get('max', '-')} | "
                f"{d.get('truncated', '-')} | {d.get('dropped_fully_masked', '-')} | {d.get('duplicates', '-')} |", ""]
        out += [f"- `{f['path']}` sha256 `{f['sha256'][:16]}…`" for f in d.get("files") or []]
        out += [""] if d.get("files") else []
    out += ["## Base vs adapter", ""]
    if evaluated_by:
        out += [f"Measured by {evaluated_by} (metrics.json keeps the figures of training).", ""]
    rows = comparison_rows(ev)
    if rows:
        scope = f"{ev['eval_rows']} held-out rows" if "eval_rows" in ev else "held-out rows"
        if ev.get("metric_rows") is not None and ev.get("metric_rows") != ev.get("eval_rows"):
            scope += f"; task metrics on the first {ev['metric_rows']} (evaluation.generate_samples)"
        k = ev.get("few_shot_k")
        out += [f"On {scope}. Loss{' and perplexity' if 'eval_perplexity' in ev else ''}: lower is better; task "
                "metrics: higher is better."
                + (f" Base {k}-shot: the base given {k} training rows as examples before each prompt "
                   "(evaluation.baselines: few_shot)." if k else ""), "",
                f"| measure | base |{f' base {k}-shot |' if k else ''} adapter | change |",
                f"|---|---:|{'---:|' if k else ''}---:|---:|"]
        out += [f"| {name} | {number(b)} |{f' {number(few_shot(ev, name))} |' if k else ''} {number(a)} | "
                f"{change(b, a)} |" for name, b, a, _ in rows]
        out.append("")
    elif ev.get("not_measured"):
        out += [f"Not measured: {ev['not_measured']}.", ""]
    else:
        out += ["No held-out rows were evaluated (data.eval_fraction 0 and no data.eval).", ""]
    if ev.get("metrics_note"):
        out += [f"Note: {ev['metrics_note']}", ""]
    out += _failures(ev, recipe)
    out += _classes(ev, confusion)
    out += _retain(ev.get("retain"))
    out += _lm_eval(ev.get("lm_eval"))
    if t.get("loss_history"):
        out += ["## Training", "",
                f"Train loss {number(t.get('first_loss'))} → {number(t.get('final_loss'))} over {t.get('steps')} steps"
                f", {t.get('tokens_processed', t.get('tokens_seen', 0)):,} tokens processed"
                + (f", {t['trained_tokens']:,} trained (with a loss)" if t.get("trained_tokens") is not None else "")
                + (f" ({t['train_tokens_per_second']:,.0f} tokens/s processed)" if t.get("train_tokens_per_second")
                   else "") + ".", ""]
        if t.get("diverged_at_step"):
            out += [f"Warning: the loss climbed far above its start at step {t['diverged_at_step']}.", ""]
        out += _overfitting(ev.get("overfitting"), t.get("best"))
        if plot:
            out += [f"![train and eval loss by step]({plot})", ""]
    samples = ev.get("samples") or []
    if samples:
        # Classifiers predict a class (seq_cls) or a tag per word (token_cls); the others generate text.
        out += ["## Sample predictions" if tasks.task(recipe.model.task).labelled else "## Sample generations", ""]
        for i, s in enumerate(samples, 1):
            out += [f"### Eval row {i}", "", "Prompt:", "", _fence(s["prompt"]), "",
                    "| | |", "|---|---|", f"| reference | {_cell(s['reference'])} |"]
            out += [f"| {w.replace('_', '-')} | {_cell(s[w])} |" for w in ("base", "few_shot", "adapter") if w in s]
            out.append("")
    prompts = ev.get("prompts") or []
    if prompts:
        out += ["## Prompts (evaluation.prompts)", ""]
        for p in prompts:
            out += ["Prompt:", "", _fence(p["prompt"]), ""]
            out += [f"{w.capitalize()}:\n\n{_fence(p[w])}\n" for w in ("base", "adapter") if w in p]
    return "\n".join(out).rstrip() + "\n"
