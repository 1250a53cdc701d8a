"""The sweep's results: one record per point from its own metrics.json (so every figure equals that file's),
the base model's figures from the point that measured them, the Pareto front (metric against trainable
params), the recommendation, and the files: sweep.json, sweep.csv, sweep.md, sweep.png; `--apply` writes the
recommended recipe beside the original (after those files: a failure there loses no result)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from lorafit import log, render
from lorafit.errors import LorafitError, RecipeError
from lorafit.sweep import runner
from lorafit.sweep.plan import Metric, Plan
from lorafit.sweep.space import Point

FILES = ("sweep.md", "sweep.csv", "sweep.png", "sweep.json")


def _dotted(doc: dict, key: str):
    for part in key.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(part)
    return doc


def point_values(plan: Plan, point: Point) -> dict:
    """{key: value} as the point's recipe holds it (2e-4 → 0.0002; [q_proj,v_proj] → a list)."""
    try:
        doc = plan.recipe_of(point).model_dump(mode="json")
    except Exception:  # checked before training; a recipe edited since shows the text
        return {k: t for k, t in point.values}
    return {k: _dotted(doc, k) for k, _ in point.values}


def record(plan: Plan, point: Point, status: str, *, action: str = "-", error: str | None = None,
           outcome: runner.Outcome | None = None, previous: dict | None = None) -> dict:
    """One point of the table. A finished point's figures come from its metrics.json and adapter."""
    run_dir = plan.run_dir(point)
    rec = {"name": point.name, "values": point_values(plan, point), "texts": dict(point.values),
           "run_dir": str(run_dir), "status": status,
           "action": action, "error": error, "trainable_params": None, "adapter_bytes": None, "eval_loss": None,
           "metrics": {}, "metric": None, "tokens_per_second": None, "peak_memory_mb": None, "memory": None,
           "train_seconds": None, "wall_seconds": outcome.wall_seconds if outcome else (previous or {}).get(
               "wall_seconds"), "steps": None, "resumed_at_step": None, "base_measured": False}
    if outcome is not None and outcome.status == "pruned":
        rec.update(pruned_at_step=outcome.pruned_at, last_eval_loss=outcome.last_eval)
    m = runner.read_metrics(run_dir) if status == "finished" else None
    if m is None:
        return rec
    ev, train, memory = m.get("eval") or {}, m.get("train") or {}, m.get("memory") or {}
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    rec.update(trainable_params=m.get("trainable_params"),
               adapter_bytes=weights.stat().st_size if weights.is_file() else None,
               eval_loss=ev.get("eval_loss"),
               metrics={k: v.get("adapter") for k, v in (ev.get("metrics") or {}).items()},
               metric=plan.metric.of(ev),
               tokens_per_second=train.get("train_tokens_per_second"),
               peak_memory_mb=memory.get("gpu_peak_allocated_mb", memory.get("cpu_peak_rss_mb")),
               memory=memory, train_seconds=train.get("train_seconds"), steps=train.get("steps"),
               resumed_at_step=train.get("resumed_at_step"),
               base_measured="base_eval_loss" in ev)
    return rec


def grid_records(plan: Plan, done: dict, previous: dict) -> list[dict]:
    out = []
    for point in plan.points:
        d = done.get(point.name)
        state = runner.run_state(plan.run_dir(point))
        prev = previous.get(point.name)
        if d is not None and d.outcome is not None and d.outcome.status != "finished":
            rec = record(plan, point, d.outcome.status, action=d.action, error=d.outcome.error, outcome=d.outcome)
        elif state == "finished" and not (plan.overwrite and d is None):
            rec = record(plan, point, "finished", action=d.action if d else "reused",
                         outcome=d.outcome if d else None, previous=prev)
        elif state == "interrupted" and not plan.overwrite:
            rec = record(plan, point, "interrupted", error="a re-run of the sweep resumes it")
        else:
            rec = record(plan, point, "pending")
        out.append(rec)
    return out


def study_records(plan: Plan, study, done: dict, previous: dict) -> list[dict]:
    """One record per point of the study's trials (a point sampled twice is trained once), in trial order."""
    import optuna

    from lorafit.sweep.study import point_of

    state = optuna.trial.TrialState
    by_name: dict[str, dict] = {}
    for trial in study.get_trials(deepcopy=False):
        point = point_of(trial.params, plan.axes)
        if point.name in by_name:
            by_name[point.name]["trials"].append(trial.number)
            continue
        d = done.get(point.name)
        outcome = d.outcome if d else None
        action = d.action if d else "reused"
        if trial.state == state.COMPLETE:
            rec = record(plan, point, "finished", action=action, outcome=outcome, previous=previous.get(point.name))
        elif trial.state == state.PRUNED:
            rec = record(plan, point, "pruned", action=action, outcome=outcome)
            if outcome is None and (trial.intermediate_values or {}):
                step = max(trial.intermediate_values)
                rec.update(pruned_at_step=step, last_eval_loss=abs(trial.intermediate_values[step]))
        elif trial.state == state.FAIL:
            rec = record(plan, point, "failed", action=action, error=trial.user_attrs.get("error"), outcome=outcome)
        else:  # RUNNING: interrupted, or killed; a re-run resumes it
            status = outcome.status if outcome else "interrupted"
            error = outcome.error if outcome else trial.user_attrs.get("error")
            rec = record(plan, point, status, action=action, error=error, outcome=outcome)
        rec["trials"] = [trial.number]
        by_name[point.name] = rec
    return list(by_name.values())


def bases(plan: Plan, records: list[dict]) -> list[dict]:
    """The base model's figures per base group, from the point that measured them."""
    groups: dict[str, dict] = {}
    points = {p.name: p for p in plan.points}
    for rec in records:
        point = points.get(rec["name"])
        if point is None:
            continue
        group = groups.setdefault(plan.base_group(point), {"from": None, "eval_loss": None, "metric": None,
                                                           "points": []})
        group["points"].append(rec["name"])
        if rec["base_measured"] and group["from"] is None:
            ev = (runner.read_metrics(Path(rec["run_dir"])) or {}).get("eval") or {}
            group.update({"from": rec["name"], "eval_loss": ev.get("base_eval_loss"),
                          "metric": plan.metric.of(ev, "base")})
    return list(groups.values())


def _better(metric: Metric, a: float, b: float) -> bool:
    return a > b if metric.maximize else a < b


def pareto(metric: Metric, records: list[dict]) -> list[str]:
    """Finished points that no other point beats on both: fewer-or-equal trainable params and a metric as good,
    one of the two strictly."""
    ranked = [r for r in records if r["status"] == "finished" and r["metric"] is not None
              and r["trainable_params"] is not None]
    front = []
    for r in ranked:
        dominated = any(o is not r and o["trainable_params"] <= r["trainable_params"]
                        and not _better(metric, r["metric"], o["metric"])
                        and (o["trainable_params"] < r["trainable_params"] or _better(metric, o["metric"], r["metric"]))
                        for o in ranked)
        if not dominated:
            front.append(r["name"])
    return front


def recommend(metric: Metric, tolerance: float, records: list[dict]) -> dict | None:
    """The smallest point (fewest trainable params, then smallest adapter file, then best metric, then lowest
    eval loss) whose metric is within *tolerance* (a fraction) of the best."""
    ranked = [r for r in records if r["status"] == "finished" and r["metric"] is not None]
    if not ranked:
        return None
    sign = 1 if metric.maximize else -1

    def size(r):
        return (r["trainable_params"] if r["trainable_params"] is not None else float("inf"),
                r["adapter_bytes"] or 0, -sign * r["metric"], r["eval_loss"] if r["eval_loss"] is not None else 0)

    # The best: the best metric; among equal metrics the smallest (then lowest eval loss), as below.
    best = min(ranked, key=lambda r: (-sign * r["metric"], *size(r)))
    margin = tolerance * abs(best["metric"])
    within = [r for r in ranked if sign * (best["metric"] - r["metric"]) <= margin + 1e-12]
    pick = min(within, key=size)
    return {"name": pick["name"], "values": pick["values"], "texts": pick["texts"], "metric": pick["metric"],
            "trainable_params": pick["trainable_params"], "adapter_bytes": pick["adapter_bytes"],
            "best": {"name": best["name"], "metric": best["metric"], "trainable_params": best["trainable_params"]},
            "within": [r["name"] for r in within], "tolerance": tolerance, "metric_name": metric.name,
            "goal": metric.goal}


def write_outputs(plan: Plan, doc: dict) -> None:
    """sweep.json, sweep.csv, sweep.md and sweep.png in the sweep dir, each written whole (rename into place).
    The plot is a picture of the table: failing to draw it warns and leaves the others."""
    from lorafit.core.files import atomic_write_text

    out = plan.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    try:
        drawn = plot(doc, out / "sweep.png")
    except Exception as e:  # matplotlib missing or a figure it cannot draw: the table is what matters
        log.warn(f"{out / 'sweep.png'} not drawn ({type(e).__name__}: {e})")
        drawn = False
    doc["files"] = {name: str(out / name) for name in FILES if name != "sweep.png" or drawn}
    atomic_write_text(out / "sweep.csv", to_csv(doc))
    atomic_write_text(out / "sweep.md", "\n".join(render.sweep_markdown(doc)) + "\n")
    atomic_write_text(out / "sweep.json", json.dumps(doc, indent=2, default=str) + "\n")


CSV_FIELDS = ("name", "status", "trainable_params", "adapter_bytes", "eval_loss", "metric", "tokens_per_second",
              "peak_memory_mb", "train_seconds", "wall_seconds", "steps", "pareto", "recommended", "run_dir", "error")


def to_csv(doc: dict) -> str:
    keys = [k for axis in doc["axes"] for k in axis["keys"]]
    metric_names = sorted({n for r in doc["points"] for n in r["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, *CSV_FIELDS, *metric_names])
    for r in doc["points"]:
        values = [json.dumps(r["values"].get(k)) if isinstance(r["values"].get(k), list) else r["values"].get(k)
                  for k in keys]
        w.writerow([*values, *(r.get(f) for f in CSV_FIELDS), *(r["metrics"].get(n) for n in metric_names)])
    return buf.getvalue()


def plot(doc: dict, path: Path) -> bool:
    """The metric against trainable params (log scale), every finished point labelled, the Pareto front as a
    line, the recommended point ringed, the base model as a dashed line. Headless (Agg canvas, no pyplot)."""
    points = [r for r in doc["points"] if r["status"] == "finished" and r["metric"] is not None
              and r["trainable_params"]]
    if not points:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric = doc["metric"]["name"]
    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([r["trainable_params"] for r in points], [r["metric"] for r in points], color="tab:blue", zorder=3,
               label="points")
    labels: dict[tuple, list[str]] = {}  # points at one spot share one label
    for r in points:
        labels.setdefault((r["trainable_params"], r["metric"]), []).append(render.sweep_label(r["texts"]))
    for (x, y), names in labels.items():
        ax.annotate("\n".join(names), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in points if r["name"] in doc["pareto"]), key=lambda r: r["trainable_params"])
    if front:
        ax.plot([r["trainable_params"] for r in front], [r["metric"] for r in front], color="tab:orange",
                drawstyle="steps-post", zorder=2, label="Pareto front")
    rec = next((r for r in points if doc.get("recommended") and r["name"] == doc["recommended"]["name"]), None)
    if rec is not None:
        ax.scatter([rec["trainable_params"]], [rec["metric"]], s=220, facecolors="none", edgecolors="tab:green",
                   linewidths=2, zorder=4, label="recommended")
    base = next((b["metric"] for b in doc.get("base") or [] if b.get("metric") is not None), None)
    if base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="base model")
    if max(r["trainable_params"] for r in points) > 4 * min(r["trainable_params"] for r in points):
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{metric} ({doc['metric']['goal']} is better)")
    ax.set_title(f"lorafit sweep: {Path(doc['recipe']).name}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from lorafit.core.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return True


def recommended_path(recipe_path: Path) -> Path:
    """Where --apply writes: NAME.recommended.yaml beside the recipe."""
    return recipe_path.with_name(f"{recipe_path.stem}.recommended{recipe_path.suffix or '.yaml'}")


def check_apply_target(recipe_path: Path, *, overwrite: bool) -> None:
    """--apply never replaces a recipe without --overwrite: checked before any training."""
    target = recommended_path(recipe_path)
    if target.exists() and not overwrite:
        raise LorafitError(f"{target} exists", where="--apply",
                           fix="move or delete it, or add --overwrite (which also trains every point again)")


def apply_recommendation(plan: Plan, rec: dict, *, overwrite: bool = False) -> Path:
    """The original recipe, its mapping as written plus the user's --set and the recommended point's values
    (not the sweep's step budget: the recipe is for the full run), beside the original as NAME.recommended.yaml:
    validated first, then written whole; an existing file is replaced only with *overwrite*."""
    import copy

    import yaml

    from lorafit.core.files import atomic_write_text
    from lorafit.recipe import apply_override, validate_recipe

    point = next(p for p in plan.points if p.name == rec["name"])
    raw = yaml.safe_load(plan.recipe_path.read_text(encoding="utf-8")) or {}
    for item in [*plan.overrides, *point.sets]:
        apply_override(raw, item)
    target = recommended_path(plan.recipe_path)
    try:
        validate_recipe(copy.deepcopy(raw), source=str(target))
    except RecipeError as e:
        raise RecipeError(f"the recommended recipe was not written, it does not validate: {e.problems[0]}",
                          where="--apply", fix=f"the sweep's table is in {plan.sweep_dir / 'sweep.md'}") from None
    check_apply_target(plan.recipe_path, overwrite=overwrite)
    head = render.sweep_apply_header(plan.recipe_path, rec)
    atomic_write_text(target, head + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=100))
    return target
