"""Text for people: every command returns data, and only this module turns it into lines.

The CLI prints what these functions return; ``--json`` prints the data itself instead.
"""

from __future__ import annotations

from lorafit.core import rundir

GiB = 1024 ** 3
MiB = 1024 ** 2


# ----------------------------------------------------------------------------------------------
# train, validate, evaluate


def train_lines(result) -> list[str]:
    """The closing summary of ``lorafit train`` (a pipeline.TrainResult)."""
    m = result.metrics
    lines = [f"run: {result.run_dir}", f"adapter: {result.run_dir / rundir.ADAPTER}",
             f"trainable params: {m['trainable_params']:,} ({m['trainable_percent']:.4f} %)",
             f"train loss: {m['train']['first_loss']:.4f} → {m['train']['final_loss']:.4f} "
             f"({m['train']['steps']} steps, {m['train']['train_tokens_per_second'] or 0:,.0f} tokens/s processed)"]
    ev = m.get("eval") or {}
    if "eval_loss" in ev:
        base = f"base {ev['base_eval_loss']:.4f} → " if "base_eval_loss" in ev else ""
        lines.append(f"eval loss: {base}adapter {ev['eval_loss']:.4f} on {ev['eval_rows']} held-out rows")
    for name, values in (ev.get("metrics") or {}).items():
        base = f"base {number(values.get('base'))} → " if values.get("base") is not None else ""
        shots = (f" (base given {ev.get('few_shot_k')} examples: {number(values['few_shot'])})"
                 if values.get("few_shot") is not None else "")
        lines.append(f"{name}: {base}adapter {number(values.get('adapter'))} on {ev.get('metric_rows')} rows{shots}")
    if ev.get("outcome_rows"):
        lines.append(f"wrong: {ev.get('wrong_rows', 0)} of {ev['outcome_rows']} rows"
                     + (f" (listed in report.md; every row in {ev['predictions']})" if ev.get("predictions") else ""))
    retain = ev.get("retain") or {}
    if retain.get("metrics"):
        score = next((k for k in ("contains", "exact_match", "loss") if k in retain["metrics"]), None)
        values = retain["metrics"][score]
        flagged = "; FORGETTING: " + "; ".join(retain["flagged"]) if retain.get("flagged") else "; no drop flagged"
        lines.append(f"retain ({retain['rows']} rows of {retain['source']}): {score} base "
                     f"{number(values.get('base'))} → adapter {number(values.get('adapter'))}{flagged}")
    if ev.get("overfitting"):
        o = ev["overfitting"]
        lines.append(f"overfitting: eval loss lowest at step {o['best_step']} ({o['best_eval_loss']:.4f}), "
                     f"{o['last_eval_loss']:.4f} at step {o['last_step']} while train loss kept falling")
    if (result.run_dir / rundir.REPORT).is_file():
        lines.append(f"report: {result.run_dir / rundir.REPORT}")
    return lines


def interrupted_training(e) -> str:
    """What a Ctrl-C / SIGTERM during training left (an errors.TrainingInterrupted), truthfully: a second signal
    during a checkpoint's save means that checkpoint was not written."""
    from pathlib import Path

    last = f"the last complete checkpoint is {e.checkpoint}" if e.checkpoint else "no checkpoint was written yet"
    if e.checkpoint:
        step = Path(e.checkpoint).name.rsplit("-", 1)[-1]
        last += f" (step {step})" if step.isdigit() else ""
    if e.immediate and e.saving and not (e.checkpoint and Path(e.checkpoint).name == e.saving):
        return (f"stopped at once while writing {e.saving}, which was not written (its partial copy is removed at "
                f"the next start); {last}")
    how = "stopped at once, during" if e.immediate else "stopped after"
    return f"{how} step {e.step}/{e.max_steps}; {last}"


def interrupted_evaluation(run_dir) -> str:
    """What a Ctrl-C / SIGTERM during train's final evaluation left: the adapter, and how to evaluate it."""
    import shlex

    return (f"the adapter is saved in {run_dir}/{rundir.ADAPTER} and metrics.json holds the training figures; "
            f"evaluate it with: lorafit evaluate {shlex.quote(str(run_dir))}")


def validate_lines(report) -> list[str]:
    """``lorafit validate`` (a pipeline.ValidationReport): one line per check, `ok`, or `warn` when advice
    (docs/advice.md) or a warning concerns it, each advice on a line of its own under its check; the other
    warnings; then the count."""
    m, s, plan = report.model, report.data, report.plan
    t = plan["trainable"]
    advice = report.advice or {}
    given, run = advice.get("given", []), advice.get("run")
    checks = [("recipe", f"{report.recipe}: schema ok"),
              ("model", f"{m['name']} ({m['model_type']}, task {m['task']}, precision {m['precision']})"),
              ("data", f"{s['train_rows']} train / {s['eval_rows']} eval rows, {s['train_tokens']:,} train tokens "
                       f"({s['trainable_tokens']:,} trained), {s['truncated']} truncated, "
                       f"{s['dropped_fully_masked']} dropped"),
              *data_checks(s),
              ("targets", f"{', '.join(t['target_modules'])} → {t['adapted_modules']} modules, "
                          f"{t['lora_params'] + t['dora_params']:,} LoRA params at r={t['r']}")]
    if run:
        rows = f"{run['rows_per_step']} row{'' if run['rows_per_step'] == 1 else 's'}"
        checks.append(("training", f"{run['optimizer_steps']:,} optimizer steps of {rows} "
                                   f"({run['epochs']:.1f} epochs), learning rate {run['learning_rate']:g}"))
    head = estimate_headline(plan)
    checks += [("estimate", line) for line in head[:2]]
    warnings = head[2:] + report.warnings
    lines, said = [], set()
    for what, detail in checks:
        mine = [a for a in given if a["check"] == what] if what not in said else []
        warned = mine or (what == "estimate" and detail.startswith("memory plan") and head[2:])
        lines.append(f"{'warn' if warned else 'ok':<4} {what:<10} {detail}")
        lines += [f"{'warn':<4} {what:<10} {advice_line(a)}" for a in mine]
        said.add(what)
    lines += [f"{'warn':<4} {a['check']:<10} {advice_line(a)}" for a in given if a["check"] not in said]
    lines += [f"warning: {w}" for w in warnings]
    return lines + [validate_count(given, len(warnings), advice.get("silenced", []))]


def advice_line(a: dict) -> str:
    """One advice: [code] recipe path: what was found; the fix."""
    return f"[{a['code']}] {a['where']}: {a['message']}; {a['fix']}"


def advice_lines(given) -> list[str]:
    """The advice `train` says before any weight loads (stages.advise.Findings.given), one warning each."""
    return [advice_line(a if isinstance(a, dict) else vars(a)) for a in given]


def validate_count(given: list[dict], others: int, silenced: list[str]) -> str:
    """validate's last line: how many warnings, which advice codes."""
    n = len(given) + others
    codes = f": advice {', '.join(a['code'] for a in given)} (docs/advice.md; --strict makes advice exit 2)" \
        if given else ""
    quiet = f"; silenced by advice.ignore: {', '.join(silenced)}" if silenced else ""
    return f"{n} warning{'' if n == 1 else 's'}{codes}{quiet}"


def data_checks(s: dict) -> list[tuple[str, str]]:
    """The data doctor's findings (the data stage's stats): token lengths, then the rows worth a look."""
    if "token_lengths" not in s:  # stats written before the data doctor
        return []
    n = s["token_lengths"]
    eval_dupes = f", {s['eval_in_train']} eval rows also in train" if s.get("eval_in_train") else ""
    return [("lengths", f"tokens per row p50 {n['p50']:,}, p95 {n['p95']:,}, max {n['max']:,} "
                        f"(data.max_length {s['max_length']:,})"),
            ("rows", f"{s['truncated']} truncated ({s['eos_cut']} lost their EOS), {s['dropped_fully_masked']} with "
                     f"nothing to train, {s['duplicates']} duplicates{eval_dupes}, {s['empty_fields']} with an empty "
                     "field")]


def data_summary(s: dict) -> str:
    """One line for the start of ``lorafit train``."""
    n = s["token_lengths"]
    return (f"{s['train_rows']} train / {s['eval_rows']} eval rows; tokens per row p50 {n['p50']:,}, "
            f"p95 {n['p95']:,}, max {n['max']:,} (max_length {s['max_length']:,}); {s['truncated']} truncated "
            f"({s['eos_cut']} lost their EOS), {s['dropped_fully_masked']} dropped, {s['duplicates']} duplicates, "
            f"{s['empty_fields']} with an empty field")


_GREEN, _RESET = "\x1b[1;32m", "\x1b[0m"


def example_lines(example: dict, *, color: bool) -> list[str]:
    """``lorafit validate --show-example N``: the row's text, trained spans in [[...]] (or green on a terminal)."""
    how = "trained tokens in green" if color else "trained tokens in [[...]]"
    label = f", class {example['label']}" if "label" in example else ""
    head = (f"train row {example['row']} of {example['rows']} (the train split's order) as the model sees it: "
            f"{example['tokens']} tokens, {example['trained_tokens']} trained{label}; {how}")
    text = ""
    for piece, trained in example["segments"]:
        if not trained:
            text += piece
        elif color:  # per line: a colour left open across a newline bleeds into the terminal
            text += "\n".join(f"{_GREEN}{part}{_RESET}" if part else "" for part in piece.split("\n"))
        else:
            text += f"[[{piece}]]"
    return [head, "", *text.split("\n")]


def comparison_rows(ev: dict) -> list[tuple[str, float | None, float | None, str]]:
    """metrics.json["eval"] → (measure, base, adapter, which way is better) rows: loss and perplexity, then
    each task metric. One table for `lorafit evaluate`, `train`'s report.md and anyone else."""
    rows = []
    if "eval_loss" in ev:
        rows.append(("eval loss", ev.get("base_eval_loss"), ev["eval_loss"], "lower"))
    if "eval_perplexity" in ev:  # a classifier has none: exp(loss) over its classes means nothing
        rows.append(("perplexity", ev.get("base_eval_perplexity"), ev.get("eval_perplexity"), "lower"))
    for name, values in (ev.get("metrics") or {}).items():
        rows.append((name, values.get("base"), values.get("adapter"), "higher"))
    return rows


def few_shot(ev: dict, name: str) -> float | None:
    """The few-shot baseline's value of task metric *name* (evaluation.baselines), or None."""
    return ((ev.get("metrics") or {}).get(name) or {}).get("few_shot")


def failure_lines(ev: dict) -> list[str]:
    """The rows the adapter gets wrong (metrics.json["eval"]["failures"]), as `lorafit evaluate` lists them."""
    failures = ev.get("failures") or []
    if not ev.get("outcome_rows"):
        return []
    head = (f"wrong: {ev.get('wrong_rows', len(failures))} of {ev['outcome_rows']} rows"
            + (f" (the first {len(failures)} below; every row in {ev['predictions']})" if ev.get("predictions")
               and failures else ""))
    lines = ["", head]
    for f in failures:
        lines += [f"  row {f['row']}: {clip(f['prompt'])}", f"    reference: {clip(str(f.get('reference', '')))}"]
        lines += [f"    {w + ':':<10} {clip(str(f[w]))}" for w in ("adapter", "base", "few_shot") if w in f]
    return lines


def retain_lines(retain: dict | None) -> list[str]:
    """Forgetting on the retain rows (metrics.json["eval"]["retain"]), base vs adapter, and what it flags."""
    if not retain or "metrics" not in retain:
        return ["", f"retain: {retain['note']}"] if retain and retain.get("note") else []
    lines = ["", f"retain: {retain['rows']} rows of {retain['source']}"]
    for name, values in retain["metrics"].items():
        lines.append(f"  {name:<12}{number(values.get('base')):>10}{number(values.get('adapter')):>10}"
                     f"{change(values.get('base'), values.get('adapter')):>10}")
    flagged = retain.get("flagged") or []
    lines.append(f"  FORGETTING beyond {retain['tolerance']:.0%}: {'; '.join(flagged)}" if flagged
                 else f"  no drop beyond {retain['tolerance']:.0%} of the base")
    return lines + ([f"  note: {retain['note']}"] if retain.get("note") else [])


def number(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def change(base: float | None, adapter: float | None) -> str:
    return number(adapter - base, signed=True) if base is not None and adapter is not None else "-"


def printable(text: str) -> str:
    """Model output made safe to show: control characters (a raw ESC could drive the terminal) become �."""
    import unicodedata

    return "".join(c if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cf") else "\ufffd" for c in text)


def clip(text: str, width: int = 70) -> str:
    """One printable line of at most *width* characters, newlines shown as ⏎."""
    text = printable(text).replace("\n", "⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def evaluate_lines(report: dict) -> list[str]:
    """``lorafit evaluate``: base vs adapter, a few generations, and where report.md went."""
    lines = [f"adapter: {report['adapter']}", f"data: {report['data']}"]
    rows = comparison_rows(report)
    if rows:
        scope = f"{report['eval_rows']} rows" if "eval_rows" in report else ""
        if report.get("metric_rows") is not None and report.get("metric_rows") != report.get("eval_rows"):
            scope += f"; task metrics on {report['metric_rows']} rows"
        shots = report.get("few_shot_k")
        extra = f"{f'{shots}-shot':>10}" if shots else ""
        lines += ["", f"{'':<14}{'base':>10}{extra}{'adapter':>10}{'change':>10}   ({scope}; {_better(rows)})"]
        lines += [f"{name:<14}{number(b):>10}" + (f"{number(few_shot(report, name)):>10}" if shots else "")
                  + f"{number(a):>10}{change(b, a):>10}" for name, b, a, _ in rows]
    if report.get("metrics_note"):
        lines.append(f"note: {report['metrics_note']}")
    lines += failure_lines(report)
    for name, per in (("class", report.get("per_class")), ("entity type", report.get("per_entity"))):
        if per and per.get("adapter"):
            lines += ["", f"{name:<14}{'support':>9}{'precision':>11}{'recall':>9}{'F1':>9}{'base F1':>9}"]
            lines += [f"{clip(k, 14):<14}{v['support']:>9}{v['precision']:>11.4f}{v['recall']:>9.4f}{v['f1']:>9.4f}"
                      f"{number(((per.get('base') or {}).get(k) or {}).get('f1')):>9}" for k, v in per["adapter"].items()]
    lines += retain_lines(report.get("retain"))
    for task, values in (report.get("lm_eval") or {}).get("results", {}).items():
        lines += ["", f"lm-eval {task}:"] + [f"  {m:<20}{number(v.get('base')):>10}{number(v.get('adapter')):>10}"
                                             f"{change(v.get('base'), v.get('adapter')):>10}" for m, v in values.items()]
    for i, s in enumerate(report.get("samples") or [], 1):
        lines += ["", f"row {i}: {clip(s['prompt'])}", f"  reference: {clip(s['reference'])}"]
        lines += [f"  {w + ':':<10} {clip(s[w])}" for w in ("base", "few_shot", "adapter") if w in s]
    for p in report.get("prompts") or []:
        lines += ["", f"prompt: {clip(p['prompt'])}"]
        lines += [f"  {w + ':':<10} {clip(p[w])}" for w in ("base", "adapter") if w in p]
    if report.get("report"):
        lines += ["", f"report: {report['report']} (rewritten with these results)"]
    return lines


def _better(rows) -> str:
    ways = {way for *_, way in rows}
    return "loss, perplexity: lower is better" + (", task metrics: higher" if "higher" in ways else "")


# ----------------------------------------------------------------------------------------------
# estimate


def predict_lines(report: dict) -> list[str]:
    """``lorafit predict``: where the predictions went."""
    return [f"predicted {report['rows']} rows ({report['task']}, data format {report['format']}) → {report['output']}",
            f"adapter: {report['adapter']}"]


def gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.1 * GiB else f"{n / MiB:.1f} MiB"


def estimate_headline(report: dict) -> list[str]:
    """Two or three short lines for ``lorafit validate``."""
    t, dev = report["trainable"], report["device"]
    p = report["plans"][dev["plan"]]
    lines = [f"{t['trainable_params']:,} trainable params ({t['percent']:.4f} % of {t['all_params']:,}), "
             f"{t['adapted_modules']} adapted modules",
             f"memory plan on {dev['kind']}: {gb(p['total_bytes'])} "
             f"(weights {gb(p['components']['base_weights'])}, activations {gb(p['components']['activations'])}) "
             f"of {gb(dev['memory_bytes'])} on this machine"]
    if not dev["fits"]:
        lines.append(f"the plan exceeds this {dev['kind']}'s memory by {gb(p['total_bytes'] - dev['memory_bytes'])}: "
                     "lower training.batch_size or data.max_length, turn on training.gradient_checkpointing, "
                     "or quantize (quantization.bits: 4)")
    return lines


def estimate_table(report: dict):
    """Rich renderable for the human output."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m, t = report["model"], report["trainable"]
    head = Text.assemble((m["name"], "bold"), f"  {m['architecture']}, task {m['task']}, {m['total_params']:,} params")
    params = Text(f"trainable: {t['trainable_params']:,} ({t['percent']:.4f} %) = LoRA {t['lora_params']:,}"
                  + (f" + DoRA {t['dora_params']:,}" if t["dora_params"] else "")
                  + (f" + biases {t['bias_params']:,}" if t["bias_params"] else "")
                  + (f" + modules_to_save {t['modules_to_save_params']:,} ({', '.join(t['modules_to_save'])})"
                     if t["modules_to_save_params"] else "")
                  + f"; {t['adapted_modules']} modules: {', '.join(t['target_modules'])}")
    plans = report["plans"]
    table = Table(title="Memory plan per device (one training process)", title_justify="left")
    table.add_column("")
    for dev, p in plans.items():
        mark = " (this machine)" if dev == report["device"]["plan"] else ""
        table.add_column(f"{dev}{mark}\n{p['precision']}, {p['weights']}, {p['optimizer']}", justify="right")
    for comp in next(iter(plans.values()))["components"]:
        table.add_row(comp.replace("_", " "), *[gb(p["components"][comp]) for p in plans.values()])
    table.add_row("total", *[gb(p["total_bytes"]) for p in plans.values()], style="bold")
    dev = report["device"]
    mine = plans[dev["plan"]]
    fit = Text(f"this machine: {dev['kind']} with {gb(dev['memory_bytes'])}: "
               + ("fits" if dev["fits"] else f"does NOT fit (short by {gb(mine['total_bytes'] - dev['memory_bytes'])})"),
               style="green" if dev["fits"] else "bold red")
    rot = report["rule_of_thumb"]
    notes = Text("assumptions (" + dev["plan"] + "):\n" + "\n".join(f"  - {a}" for a in mine["assumptions"])
                 + f"\nrule of thumb ({rot['kind']}, scaled to this model): {gb(rot['bytes'])}; see docs/estimate.md")
    parts = [head, params, table, fit, notes]
    disk = report.get("disk")
    if disk:
        every = disk["checkpoint_every"]
        when = " or ".join(x for x in (f"{every['steps']} steps" if every["steps"] else "",
                                       f"{every['minutes']:g} min" if every["minutes"] else "") if x) or "the end"
        parts.append(Text(f"disk: {gb(disk['total_bytes'])} = adapter {gb(disk['adapter_bytes'])} + checkpoints of "
                          f"{gb(disk['checkpoint_bytes'])} each ({disk['checkpoints_kept']} kept + 1 being written; "
                          f"one every {when})"))
    return Group(*parts)


# ----------------------------------------------------------------------------------------------
# find-targets


def find_targets_table(report: dict):
    """Rich renderable for the human output."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    r = report["r"]
    head = Text.assemble((f"{report['model']}", "bold"),
                         f"  {report['architecture']} ({report['model_type']}), task {report['task']}, "
                         f"{report['total_params']:,} params; LoRA counts at r={r}")
    mods = Table(title="Modules that can take LoRA", title_justify="left", show_lines=False)
    for col, kw in (("block", {}), ("module (layer index = *)", {"overflow": "fold"}),
                    ("target key", {"style": "cyan"}),
                    ("count", {"justify": "right"}), ("in", {"justify": "right"}), ("out", {"justify": "right"}),
                    (f"LoRA params r={r}", {"justify": "right"})):
        mods.add_column(col, **kw)
    last = None
    for g in report["modules"]:
        key = g["key"] + (" (fused)" if g["kind"] == "fused" else "")
        if g["also_matches"]:
            key += f" (+{g['also_matches']} other)"
        mods.add_row(g["block"] if g["block"] != last else "", g["name"], key, str(g["count"]),
                     f"{g['in_features']:,}", f"{g['out_features']:,}", f"{g['lora_params']:,}",
                     end_section=False)
        last = g["block"]

    save = Table(title="modules_to_save candidates (trained in full, never by a preset)", title_justify="left")
    for col in ("module", "kind", "params", "tied"):
        save.add_column(col, justify="right" if col == "params" else "left")
    for c in report["modules_to_save_candidates"]:
        save.add_row(c["name"], c["kind"], f"{c['params']:,}", "yes" if c["tied"] else "")

    pre = Table(title=f"Presets at r={r}", title_justify="left")
    for col, kw in (("preset", {"style": "bold"}), ("target_modules", {"style": "cyan"}),
                    ("modules", {"justify": "right"}), ("trainable params", {"justify": "right"}),
                    ("% of model", {"justify": "right"})):
        pre.add_column(col, **kw)
    for name, p in report["presets"].items():
        if p is None:
            pre.add_row(name, "(selects nothing in this model)", "", "", "")
        else:
            pre.add_row(name, ", ".join(p["target_modules"]), str(p["modules"]), f"{p['trainable_params']:,}",
                        f"{p['percent']:.4f} %")
    parts = [head, mods, save, pre]
    if report["task_heads"]:
        parts.append(Text(f"task {report['task']}: peft trains {', '.join(report['task_heads'])} in full "
                          "(included in the preset counts)."))
    best = report["presets"].get("all-linear")
    if best:
        parts += [Text("Recipe snippet (all-linear):", style="bold"), Text(best["yaml"].rstrip())]
    return Group(*parts)


# ----------------------------------------------------------------------------------------------
# merge, push


def merge_lines(report: dict) -> list[str]:
    """What the CLI prints after a merge."""
    mb = report["bytes"] / 1e6
    lines = [f"merged {report['lora_modules']} LoRA modules of {report['adapter']} into {report['base']}",
             f"wrote {report['output']} ({report['dtype']}, {len(report['files'])} files, {mb:.1f} MB, "
             f"{report['mode'].replace('_', ' ')} mode)"]
    v = report.get("verify")
    if v:
        lines.append(f"verify on {v['prompts']} prompts ({v['prompt_source']}, {v['tokens']} tokens):")
        lines.append(f"  max |logit diff| merged vs base+adapter: {v['max_abs_logit_diff']:.3g} "
                     f"(tolerance {v['tolerance']:.3g})")
        if "adapter_effect" in v:  # reports written before the effect was measured lack it
            effect = f"  adapter effect: max |logit diff| base+adapter vs base {v['adapter_effect']:.3g}"
            if v["merge_error_ratio"] is None:
                lines.append(f"{effect}, within rounding: the adapter changes nothing measurable, so the merge "
                             f"error is not compared with it")
            else:
                lines.append(f"{effect}; merge error is {v['merge_error_ratio']:.1%} of it "
                             f"(limit {v['max_merge_error_ratio']:.0%})")
        if v.get("perplexity_adapter") is not None:
            base_ppl = f"base {v['perplexity_base']:.4f}, " if v.get("perplexity_base") is not None else ""
            on = f" on {v['scored_tokens']:,} {v['perplexity_on']}" if v.get("perplexity_on") else ""
            lines.append(f"  perplexity{on}: {base_ppl}base+adapter {v['perplexity_adapter']:.4f}, "
                         f"merged {v['perplexity_merged']:.4f}")
        q = v.get("quantized")
        if q:
            lines.append(f"  gap to the {q['bits']}-bit model it was trained on: max |logit diff| "
                         f"{q['max_abs_logit_diff']:.3g}, perplexity {q['perplexity_quantized']:.4f} (quantized) "
                         f"vs {v['perplexity_merged']:.4f} (merged)")
        failed = "FAILED: " + "; ".join(v.get("failures") or ["merged model differs from base+adapter"])
        lines.append(f"  {'passed' if v['passed'] else failed}; details in merge_report.json")
    return lines


def push_lines(result: dict) -> list[str]:
    """``lorafit push``: what was (or, with --dry-run, would be) uploaded (commands.push's result)."""
    what = {"adapter": "adapter", "merged": "merged model"}[result["kind"]]
    if not result["dry_run"]:
        at = f"@{result['revision']}" if result["revision"] else ""
        return [f"pushed {result['files']} files ({result['kind']}) to {result['repo_id']}{at}", result["url"]]
    files = result["files"]
    card_bytes = len(result["card"].encode())
    total = sum(f["bytes"] for f in files) + card_bytes
    note = f" ({result['note']})" if result["note"] else ""
    lines = [f"dry run: nothing uploaded{note}",
             f"would create {'private' if result['private'] else 'public'} repo {result['repo_id']} (if missing) and "
             f"commit {len(files) + 1} files ({total / 1e6:.2f} MB) of the {what} to {result['revision'] or 'main'}:"]
    for f in files:
        lines.append(f"  {f['path']}  ({f['bytes']:,} bytes{', local paths removed' if f['scrubbed'] else ''})")
    lines.append(f"  README.md  ({card_bytes:,} bytes, generated model card)")
    lines.append("token: " + ("found" if result["token_found"]
                              else "none found; set HF_TOKEN or run `hf auth login` before pushing"))
    return lines + ["", "--- README.md ---", *result["card"].rstrip("\n").split("\n")]


# ----------------------------------------------------------------------------------------------
# generate, blend


def generate_lines(result: dict) -> list[str]:
    """``lorafit generate``: the answer alone; with several (--compare) each under its adapter's name."""
    answers = result["answers"]
    if len(answers) == 1:  # a model's output, shown as evaluate shows it: no control sequence reaches the terminal
        return printable(result["text"]).split("\n")
    lines: list[str] = []
    for a in answers:
        cut = "" if a["stopped"] == "end" else f", cut at {a['new_tokens']} tokens (--max-new-tokens)"
        name = f"[{a['adapter']}]" if a["adapter"] is not None else f"[base] (asked as {a['prompt_as']} was trained)"
        lines += ([""] if lines else []) + [f"{name}{cut}", *printable(a["text"]).split("\n")]
    return lines


def blend_lines(result: dict) -> list[str]:
    """``lorafit blend``: what was combined, how, and where it went."""
    density = f", density {result['density']:g}" if result.get("density") is not None else ""
    sources = ", ".join(f"{s['name']} × {s['weight']:g} (r={s['r']})" for s in result["sources"])
    return [f"blended {sources} with {result['method']}{density}: rank {result['r']}, "
            f"{result['lora_modules']} LoRA modules",
            f"wrote {result['output']} ({len(result['files'])} files, {result['bytes'] / 1e6:.2f} MB); load it with "
            f"peft.PeftModel.from_pretrained(base, DIR) or `lorafit generate {result['output']}`"]


# ----------------------------------------------------------------------------------------------
# sweep


def sweep_label(texts: dict) -> str:
    """A point in short: r=8, learning_rate=1e-3 (the values as typed)."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in texts.items())


def _sweep_columns(doc: dict) -> list[str]:
    keys = [k for axis in doc["axes"] for k in axis["keys"]]
    short = [k.rsplit(".", 1)[-1] for k in keys]
    return [s if short.count(s) == 1 else k for k, s in zip(keys, short)]


def _sweep_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the sweep table: a row per base model, then one per point."""
    keys = [k for axis in doc["axes"] for k in axis["keys"]]
    metric = doc["metric"]["name"]
    show_metric = metric not in ("eval_loss",)
    head = ["#", *_sweep_columns(doc), "status", "params", "adapter", "eval loss",
            *([metric] if show_metric else []), "tok/s", "peak MB", "time s", "note"]
    rows = []
    for b in doc.get("base") or []:
        if b.get("eval_loss") is None and b.get("metric") is None:
            continue
        rows.append(["base", *["-"] * len(keys), "adapter off", "-", "-", number(b.get("eval_loss")),
                     *([number(b.get("metric"))] if show_metric else []), "-", "-", "-",
                     f"measured by {b['from']}" if len(doc.get("base") or []) > 1 else ""])
    recommended = (doc.get("recommended") or {}).get("name")
    for i, r in enumerate(doc["points"], 1):
        note = []
        if r["name"] == recommended:
            note.append("recommended")
        if r["name"] in doc.get("pareto", []):
            note.append("pareto")
        if r.get("pruned_at_step") is not None:
            last = r.get("last_eval_loss")
            note.append(f"pruned at step {r['pruned_at_step']}" + (f" (eval loss {last:.4f})" if last is not None else ""))
        if r.get("error"):
            note.append(clip(r["error"], 90))
        if r.get("resumed_at_step"):
            note.append(f"resumed at step {r['resumed_at_step']}")
        seconds = r.get("wall_seconds") if r.get("wall_seconds") is not None else r.get("train_seconds")
        rows.append([str(i), *[str(r["texts"].get(k, r["values"].get(k))) for k in keys], r["status"],
                     f"{r['trainable_params']:,}" if r["trainable_params"] is not None else "-",
                     f"{r['adapter_bytes'] / MiB:.2f} MiB" if r["adapter_bytes"] is not None else "-",
                     number(r["eval_loss"]), *([number(r["metric"])] if show_metric else []),
                     f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] is not None else "-",
                     f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-",
                     f"{seconds:,.0f}" if seconds is not None else "-", "; ".join(note)])
    return head, rows


def sweep_why(rec: dict) -> str:
    """Why the recommended point: within the tolerance of the best, with fewer trainable params."""
    name, best, tol = rec["metric_name"], rec["best"], f"{rec['tolerance'] * 100:g} %"
    value = f"{name} {rec['metric']:.4f}"
    if rec["name"] == best["name"]:
        others = len(rec["within"]) - 1
        return (f"{value}, the best of the sweep" + (f"; no point within {tol} of it is smaller" if others else
                                                    f"; no other point came within {tol} of it"))
    ratio = best["trainable_params"] / rec["trainable_params"] if rec["trainable_params"] else None
    smaller = (f"{ratio:.1f}× fewer trainable params ({rec['trainable_params']:,} vs {best['trainable_params']:,})"
               if ratio and ratio > 1 else "as few trainable params and a smaller adapter")
    if rec["trainable_params"] == best["trainable_params"]:
        smaller = "the same trainable params"
    return (f"{value}, within {tol} of the best ({best['metric']:.4f}, {best['name']}) with {smaller}: "
            "the smallest point that is as good")


def _sweep_budget(budget: dict) -> str:
    if budget["max_steps"]:
        return f"{budget['max_steps']} step{'s' if budget['max_steps'] != 1 else ''}"
    return f"{budget['epochs']:g} epoch{'s' if budget['epochs'] != 1 else ''}"


def sweep_lines(doc: dict) -> list[str]:
    """``lorafit sweep``: the table, the recommendation, the files."""
    counts = {}
    for r in doc["points"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    budget = doc["budget"]
    steps = _sweep_budget(budget)
    lines = [f"sweep of {doc['recipe']}: {doc['search']} search, {len(doc['points'])} points "
             f"({', '.join(f'{n} {s}' for s, n in counts.items())}), {steps} each, seed {budget['seed']}; "
             f"ranked by {doc['metric']['name']} ({doc['metric']['goal']} is better)", ""]
    head, rows = _sweep_rows(doc)
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    for row in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    lines.append("")
    lines += [f"note: {n}" for n in doc.get("notes", [])]
    rec = doc.get("recommended")
    if rec:
        lines.append(f"recommended: {sweep_label(rec['texts'])}: {sweep_why(rec)}")
    elif not doc.get("interrupted"):
        lines.append(f"no recommendation: no point finished with a {doc['metric']['name']}")
    if doc.get("applied"):
        lines.append(f"applied: {doc['applied']} (train it with `lorafit train {doc['applied']}`)")
    if doc.get("interrupted"):
        lines.append(f"interrupted ({doc['interrupted']}): the table so far; run the same command again to resume")
    if doc.get("files"):
        lines.append(f"written: {', '.join(doc['files'].values())}")
    return lines


def sweep_markdown(doc: dict) -> list[str]:
    """sweep.md: the same table as markdown, the recommendation and why, the plot, the failures."""
    budget = doc["budget"]
    steps = _sweep_budget(budget)
    lines = [f"# Sweep of `{doc['recipe']}`", "",
             f"{doc['search']} search over {', '.join('`' + ','.join(a['keys']) + '`' for a in doc['axes'])}; every "
             f"point trained {steps} on the same split (data seed {budget['data_seed']}) and seed ({budget['seed']}); "
             f"ranked by **{doc['metric']['name']}** ({doc['metric']['goal']} is better) on the held-out rows.", ""]
    if doc.get("set"):
        lines += ["Recipe overrides for every point: " + ", ".join(f"`{s}`" for s in doc["set"]), ""]
    head, rows = _sweep_rows(doc)
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    lines.append("")
    rec = doc.get("recommended")
    if rec:
        lines += [f"**Recommended**: {sweep_label(rec['texts'])} (`{rec['name']}`): {sweep_why(rec)}.", ""]
    if doc.get("applied"):
        lines += [f"Applied: `{doc['applied']}`.", ""]
    if doc.get("files", {}).get("sweep.png"):
        lines += ["![metric against trainable parameters, Pareto front](sweep.png)", ""]
    lines += [f"Note: {n}" for n in doc.get("notes", [])]
    if doc.get("interrupted"):
        lines += [f"Interrupted ({doc['interrupted']}): the table so far.", ""]
    lines += ["Each figure is the point's own `metrics.json` (eval loss and metric on the held-out rows, tokens/s, "
              "peak memory, train seconds) and adapter file; time is the point's wall time in the sweep. The base "
              "model is evaluated once, by the first point trained, with the adapter disabled."]
    return lines


def sweep_apply_header(recipe_path, rec: dict) -> str:
    return (f"# Written by `lorafit sweep --apply` from {recipe_path}: the recommended point\n"
            f"# {sweep_label(rec['texts'])}: {sweep_why(rec)}.\n")





def serve_banner(info: dict) -> list[str]:
    """`lorafit serve`'s start: where it listens, what it serves, a request to paste."""
    import json
    import shlex

    adapters = ", ".join(info["adapters"]) or "none"
    lines = [f"serving on {info['url']}/v1 (OpenAI-compatible; Ctrl-C or SIGTERM stops after requests in flight)",
             f"  base      {info['base']} (also 'base'), context {info['context'] or 'unknown'} tokens",
             f"  adapters  {adapters} (at most {info['max_loaded']} loaded at once)",
             f"  batches   up to {info['max_batch']} requests decoded together, adapters mixed"]
    if info["runtime_adapters"]:
        lines.append(f"  runtime   POST /v1/load_lora_adapter from under {info['runtime_adapters']}")
    lines.append(f"  api key   {'required (Authorization: Bearer ...)' if info['api_key'] else 'none'}")
    model = info["adapters"][0] if info["adapters"] else info["base"]
    if info["classifies"]:
        path, body = "classify", {"model": model, "input": "Text to classify"}
    else:
        path, body = "chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hello"}]}
    key = ' -H "Authorization: Bearer $LORAFIT_API_KEY"' if info["api_key"] else ""
    lines.append(f"try: curl {info['url']}/v1/{path} -H 'Content-Type: application/json'{key} "
                 f"-d {shlex.quote(json.dumps(body))}")
    return lines


def serve_lines(result: dict) -> list[str]:
    how = f" ({result['signal']})" if result.get("signal") else ""
    n = result["requests"]
    return [f"stopped{how}: {n} generation request{'' if n == 1 else 's'} answered"]


# ----------------------------------------------------------------------------------------------
# export


def export_lines(report: dict) -> list[str]:
    """``lorafit export``: what was checked and written, and the exact command that serves it."""
    if report["to"] == "vllm":
        lines = [f"checked for vLLM: {report['architecture'] or 'architecture unknown'}, LoRA on "
                 f"{', '.join(report['target_modules'])}, rank {report['r']} → --max-lora-rank {report['max_lora_rank']}",
                 f"wrote {report['output']} ({len(report['files'])} files)"]
        if report["chat_template"]:
            lines.append(f"chat template the adapter was trained with (not the base's): {report['chat_template']}")
        lines += [f"note: {n}" for n in report["notes"]]
        lines += ["", "serve:", f"  {report['command']}",
                  f"ask with \"model\": \"{report['request_model']}\"; the same adapter as JSON:",
                  f"  {report['lora_modules_json']}"]
        return lines
    return gguf_export_lines(report)


def gguf_export_lines(report: dict) -> list[str]:
    """``lorafit export --to gguf|ollama``: the files, the check in llama.cpp (--verify), the commands."""
    lines = [f"wrote {report['output']} ({report['quant']}):"]
    for what, path in report["files"].items():
        size = report["bytes"].get(what)
        shown = "" if size is None else f"  ({size / 1e6:.1f} MB)" if size >= 1e5 else f"  ({size / 1e3:.0f} kB)"
        lines.append(f"  {what:<9} {path}{shown}")
    if report.get("system_prompt"):
        lines.append(f"system prompt (every training conversation's): {clip(printable(report['system_prompt']))}")
    m = report.get("modelfile")
    if m:
        template = f"{m['family']} template" if m["template"] else "the GGUF's embedded template"
        lines.append(f"Modelfile: {template}, stop {', '.join(m['stops'])}" + (", SYSTEM" if m["system"] else ""))
    lines += [f"note: {n}" for n in report["notes"]] + ([f"note: {m['note']}"] if m and m.get("note") else [])
    v = report.get("verify")
    if v:
        lines.append(f"verify on {v['prompts']} held-out prompts (greedy, up to {v['max_new_tokens']} new tokens):")
        names = {"merged_vs_lorafit": "float32 merge vs lorafit (base + adapter)",
                 "gguf_vs_lorafit": f"llama.cpp {v['quant']} vs lorafit",
                 "gguf_vs_merged": f"llama.cpp {v['quant']} vs the float32 merge",
                 "gguf_lora_vs_gguf": "llama.cpp base + GGUF LoRA vs merged GGUF",
                 "transformers_gguf_vs_lorafit": "transformers' GGUF reader vs lorafit"}
        for key, a in v["agreement"].items():
            lines.append(f"  {names.get(key, key)}: {a['identical']}/{a['prompts']} identical answers"
                         + (f" (differ: prompts {', '.join(str(d['prompt']) for d in a['differing'])})"
                            if a["differing"] else ""))
        if v["exact_match"]:
            lines.append("  exact match with the references: " + ", ".join(
                f"{k} {x:.0%}" for k, x in v["exact_match"].items()))
        c = v.get("checks") or {}
        if c:
            lines.append(f"  prompt ids identical on {c['prompt_ids_identical']}/{v['prompts']}; chat template "
                         f"{'identical' if c['chat_template_identical'] else 'DIFFERENT'}; stop ids lorafit "
                         f"{c['stop_ids']['lorafit']} ⊆ GGUF {c['stop_ids']['gguf']}")
        goal = "" if v["goal_met"] or v["quant"] == "f16" else f" (goal: {v['goal']:.0%} identical answers, not met)"
        lines.append(f"  {'passed' if v['passed'] else 'FAILED: ' + '; '.join(v['failures'])}{goal}; "
                     f"details in lorafit-export.json")
    lines += ["", "run:"] + [f"  {cmd}" for cmd in report["commands"].values()]
    return lines
