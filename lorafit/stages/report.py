"""report.md and loss.png beside metrics.json: what the run did and whether the adapter helped, readable
without tools. Written from the recipe and metrics.json alone, so `lorafit evaluate` can write it again."""

from __future__ import annotations

import re
from pathlib import Path

from lorafit import log
from lorafit.core import rundir, tasks
from lorafit.core.files import atomic_write, atomic_write_text
from lorafit.render import change, comparison_rows, number, printable
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
        text = report_markdown(recipe, metrics, plot.name if has_plot else None, evaluated_by=evaluated_by)
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


def _fence(text: str) -> str:
    """A fenced block that no run of backticks inside *text* can close."""
    text = printable(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def _cell(x) -> str:
    text = printable(str(x)).replace("|", "\\|").replace("\n", " ")
    return text if text.strip() else "*(empty)*"


def report_markdown(recipe: Recipe, metrics: dict, plot: str | None, *, evaluated_by: str | None = None) -> str:
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
        out += [f"On {scope}. Loss and perplexity: lower is better; task metrics: higher is better.", "",
                "| measure | base | adapter | change |", "|---|---:|---:|---:|"]
        out += [f"| {name} | {number(b)} | {number(a)} | {change(b, a)} |" for name, b, a, _ in rows]
        out.append("")
    elif ev.get("not_measured"):
        out += [f"Not measured: {ev['not_measured']}.", ""]
    else:
        out += ["No held-out rows were evaluated (data.eval_fraction 0 and no data.eval).", ""]
    if ev.get("metrics_note"):
        out += [f"Note: {ev['metrics_note']}", ""]
    if t.get("loss_history"):
        out += ["## Training", "",
                f"Train loss {number(t.get('first_loss'))} → {number(t.get('final_loss'))} over {t.get('steps')} steps"
                f", {t.get('tokens_processed', t.get('tokens_seen', 0)):,} tokens processed"
                + (f", {t['trained_tokens']:,} trained (with a loss)" if t.get("trained_tokens") is not None else "")
                + (f" ({t['train_tokens_per_second']:,.0f} tokens/s processed)" if t.get("train_tokens_per_second")
                   else "") + ".", ""]
        if t.get("diverged_at_step"):
            out += [f"Warning: the loss climbed far above its start at step {t['diverged_at_step']}.", ""]
        if plot:
            out += [f"![train and eval loss by step]({plot})", ""]
    samples = ev.get("samples") or []
    if samples:
        # Classifiers predict a class (seq_cls) or a tag per word (token_cls); the others generate text.
        out += ["## Sample predictions" if tasks.task(recipe.model.task).labelled else "## Sample generations", ""]
        for i, s in enumerate(samples, 1):
            out += [f"### Eval row {i}", "", "Prompt:", "", _fence(s["prompt"]), "",
                    "| | |", "|---|---|", f"| reference | {_cell(s['reference'])} |"]
            out += [f"| {w} | {_cell(s[w])} |" for w in ("base", "adapter") if w in s]
            out.append("")
    prompts = ev.get("prompts") or []
    if prompts:
        out += ["## Prompts (evaluation.prompts)", ""]
        for p in prompts:
            out += ["Prompt:", "", _fence(p["prompt"]), ""]
            out += [f"{w.capitalize()}:\n\n{_fence(p[w])}\n" for w in ("base", "adapter") if w in p]
    return "\n".join(out).rstrip() + "\n"
