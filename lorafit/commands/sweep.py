"""`lorafit sweep`: which r, which targets, which learning rate, answered by a ranked table of short runs.

The steps, each in lorafit.sweep: the space (space), the checks before any training (plan), the points in
their own processes (loop, runner; study for random / TPE through Optuna), the table and its files (results).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.sweep import loop, plan as P, results, runner, space


def sweep(recipe_path: Path, overrides: list[str], grids: list[str], ranges: list[str], *, search: str = "grid",
          trials: int | None = None, max_steps: int | None = None, metric: str | None = None,
          tolerance: float = 0.01, apply: bool = False, parallel: int = 1, overwrite: bool = False) -> dict:
    """Train every point (or --trials of them), rank them, write OUTPUT/sweep/sweep.{md,csv,png,json}. Returns the
    sweep.json document; its "interrupted" names the signal that stopped it (the table so far)."""
    axes = [space.parse_grid(g) for g in grids] + [space.parse_range(r) for r in ranges]
    space.check_axes(axes, max_steps=max_steps)
    check_parallel(parallel)
    plan = P.make_plan(recipe_path, overrides, axes, search=search, trials=trials, max_steps=max_steps,
                       metric=metric, tolerance=tolerance, parallel=parallel, overwrite=overwrite)
    if apply:
        results.check_apply_target(plan.recipe_path, overwrite=overwrite)
    journal = plan.sweep_dir / "optuna.journal"
    if search == "grid":
        will_train = overwrite or any(runner.run_state(plan.run_dir(p)) != "finished" for p in plan.points)
    else:
        from lorafit.sweep import study as S

        existing, running = (0, 0) if overwrite else S.check_existing(plan.sweep_dir, plan.signature())
        will_train = overwrite or existing < trials or running > 0
    P.check_plan(plan, will_train=will_train)  # exit 2 here leaves nothing written

    previous = _previous(plan.sweep_dir)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    study = None
    if search == "grid":
        source = loop.GridSource(plan)
    else:
        if overwrite:
            journal.unlink(missing_ok=True)
        study = S.open_study(plan.sweep_dir, search=search, maximize=plan.metric.maximize,
                             seed=plan.base.training.seed, trials=trials, signature=plan.signature())
        for t in study.get_trials(deepcopy=False):  # earlier trials' points: for the base and the table
            point = S.point_of(t.params, plan.axes)
            if point not in plan.points:
                plan.points.append(point)
        source = loop.StudySource(plan, study)
    done, signum = loop.run(plan, source)

    records = results.grid_records(plan, done, previous) if study is None else \
        results.study_records(plan, study, done, previous)
    doc = {**plan.describe(), "points": records, "base": results.bases(plan, records),
           "pareto": results.pareto(plan.metric, records),
           "recommended": results.recommend(plan.metric, plan.tolerance, records),
           "interrupted": _signal_name(signum), "notes": list(plan.notes), "applied": None}
    for r in records:
        r["pareto"] = r["name"] in doc["pareto"]
        r["recommended"] = bool(doc["recommended"]) and r["name"] == doc["recommended"]["name"]
    applying = apply and doc["recommended"] and signum is None
    if apply and not applying:
        doc["notes"].append("--apply: nothing written " + ("(the sweep was interrupted)" if signum else
                                                          "(no point finished with the metric)"))
    results.write_outputs(plan, doc)  # first: a failing --apply loses none of the sweep's results
    if applying:
        doc["applied"] = str(results.apply_recommendation(plan, doc["recommended"], overwrite=overwrite))
        results.write_outputs(plan, doc)  # sweep.json and sweep.md say what was applied
    return doc


def check_parallel(parallel: int) -> None:
    """--parallel N trains N points at once, one per GPU; on CPU the points run one after another."""
    if parallel <= 1:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < parallel:
        where = f"this machine has {gpus} CUDA GPU{'s' if gpus != 1 else ''}"
        raise LorafitError(f"--parallel {parallel} trains one point per GPU and {where}", where="--parallel",
                           fix=f"use --parallel {gpus}" if gpus > 1 else
                           "drop --parallel: on one GPU or a CPU the points run one after another")


def _previous(sweep_dir: Path) -> dict:
    """The previous sweep.json's records by point name (a reused point keeps the wall time it was trained in)."""
    try:
        doc = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
        return {r["name"]: r for r in doc.get("points", [])}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _signal_name(signum: int | None) -> str | None:
    import signal

    return signal.Signals(signum).name if signum else None


def exit_code(doc: dict) -> int:
    """0 when a point finished (failures are in the table); 128 + signal when interrupted; else 1."""
    import signal

    if doc.get("interrupted"):
        return 128 + signal.Signals[doc["interrupted"]].value
    if any(r["status"] == "finished" for r in doc["points"]):
        return 0
    return 1
