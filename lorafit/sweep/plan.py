"""The sweep before anything trains: the points (or, for random / TPE, the corners of the space), what every
point shares (the recipe, the user's --set, the step budget), the metric that ranks them, and every check
that can fail without training: each point's recipe through the schema, the first through `lorafit
validate`'s checks, the model checks of each distinct model, run dirs left by another recipe. A mistake
is exit 2 with nothing written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import log
from lorafit.errors import LorafitError, RecipeError
from lorafit.recipe import Recipe, load_recipe
from lorafit.sweep.runner import run_state
from lorafit.sweep.space import Axis, Point, format_number, grid_points, point_for

SEARCHES = ("grid", "random", "tpe")
LOSSES = ("eval_loss", "eval_perplexity")  # lower is better; every task metric is higher-is-better
PRUNE_EVALS = 4  # periodic evaluations of a point when the sweep prunes and the recipe sets no eval_steps
# Keys that cannot change the base model's evaluation (the adapter's shape and its training): points that
# differ only in these share one base evaluation. batch_size is the eval batch size's default; precision
# changes the base's numbers.
ADAPTER_ONLY = ("lora.", "training.")
BASE_SHAPING_TRAINING = ("training.batch_size", "training.precision")


@dataclass(frozen=True)
class Metric:
    name: str
    maximize: bool

    @property
    def goal(self) -> str:
        return "higher" if self.maximize else "lower"

    def of(self, ev: dict, which: str = "adapter") -> float | None:
        """The metric in a metrics.json "eval" section, for the adapter or the base."""
        if self.name in LOSSES:
            return ev.get(self.name if which == "adapter" else f"base_{self.name}")
        return ((ev.get("metrics") or {}).get(self.name) or {}).get(which)


def choose_metric(name: str | None, recipe: Recipe) -> Metric:
    """--metric NAME, checked against what the task measures; default: the task's headline metric where it is
    measured (references to compare with), else eval_loss."""
    from lorafit.core import tasks

    task = tasks.task(recipe.model.task)
    known = (*LOSSES, *task.metrics)
    if name is None:
        measured = recipe.evaluation.metrics and task.metrics and not (
            task.reference_in_labels and (recipe.data.format == "text" or recipe.data.train_on_inputs))
        return Metric(task.metrics[0], True) if measured else Metric("eval_loss", False)
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise LorafitError(f"{name!r} is not measured for task {task.name}", where="--metric",
                           fix=f"{hint}choose one of: {', '.join(known)}")
    if name in task.metrics and not recipe.evaluation.metrics:
        raise LorafitError(f"{name} is not measured: the recipe sets evaluation.metrics: false", where="--metric",
                           fix="use --metric eval_loss, or --set evaluation.metrics=true")
    return Metric(name, name not in LOSSES)


@dataclass
class Plan:
    recipe_path: Path
    overrides: list[str]           # the user's --set, for every point
    axes: list[Axis]
    search: str
    trials: int | None
    max_steps: int | None
    metric: Metric
    tolerance: float
    base: Recipe                   # the recipe with the user's --set and the budget, no point values
    budget: list[str] = field(default_factory=list)  # --set the sweep adds to every point
    points: list[Point] = field(default_factory=list)  # grid: every point; random / tpe: filled as trials come
    prune_eval_steps: int | None = None
    parallel: int = 1
    overwrite: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.base.output.dir) / "sweep"

    def run_dir(self, point: Point) -> Path:
        return self.sweep_dir / point.name

    def point_sets(self, point: Point) -> list[str]:
        return [*self.overrides, *point.sets, *self.budget]

    def recipe_of(self, point: Point) -> Recipe:
        return load_recipe(self.recipe_path, self.point_sets(point))

    def base_group(self, point: Point) -> str:
        """Points in one group share one evaluation of the base model."""
        shaping = [(k, t) for k, t in point.values
                   if not k.startswith(ADAPTER_ONLY) or k in BASE_SHAPING_TRAINING]
        return json.dumps(shaping)

    def train_argv(self, point: Point, *, resume: bool, compare_base: bool, overwrite: bool = False) -> list[str]:
        argv = ["train", str(self.recipe_path)]
        for item in self.point_sets(point) + ([] if compare_base else ["evaluation.compare_base=false"]):
            argv += ["--set", item]
        argv += ["--output-dir", str(self.run_dir(point))]
        if overwrite:
            argv.append("--overwrite")
        return argv + (["--resume"] if resume else [])

    def signature(self) -> str:
        """What makes a study this sweep's: the recipe as trained (without where it is written), the space, the
        search and the metric."""
        recipe = self.base.model_dump(mode="json")
        recipe.pop("output", None)
        doc = {"recipe": recipe, "axes": [a.describe() for a in self.axes], "search": self.search,
               "metric": self.metric.name}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def describe(self) -> dict:
        tr = self.base.training
        return {"recipe": str(self.recipe_path), "set": self.overrides, "search": self.search, "trials": self.trials,
                "axes": [a.describe() for a in self.axes],
                "budget": {"max_steps": tr.max_steps, "epochs": None if tr.max_steps else tr.epochs,
                           "seed": tr.seed, "data_seed": self.base.data.seed, "eval_steps": tr.eval_steps},
                "metric": {"name": self.metric.name, "goal": self.metric.goal}, "tolerance": self.tolerance,
                "pruning": {"on": self.prune_eval_steps is not None, "eval_steps": self.prune_eval_steps,
                            "pruner": "optuna MedianPruner"} if self.search != "grid" else {"on": False},
                "sweep_dir": str(self.sweep_dir)}


def make_plan(recipe_path: Path, overrides: list[str], axes: list[Axis], *, search: str, trials: int | None,
              max_steps: int | None, metric: str | None, tolerance: float, parallel: int, overwrite: bool) -> Plan:
    """Parse-level checks of the options, then the recipe with the budget. Raises LorafitError (exit 2)."""
    if search not in SEARCHES:
        raise LorafitError(f"unknown search {search!r}", where="--search", fix="use grid, random or tpe")
    if not axes:
        raise LorafitError("nothing varies", where="--grid",
                           fix="add --grid KEY=V1,V2 (or, with --search random|tpe, --range KEY=LO:HI)")
    ranges = [a for a in axes if a.is_range]
    if search == "grid":
        if ranges:
            raise LorafitError(f"{ranges[0].label}: a range has no grid of values", where="--range",
                               fix="use --search random or tpe with --trials N, or give the values: --grid KEY=V1,V2")
        if trials is not None:
            raise LorafitError("grid search trains every combination", where="--trials",
                               fix="drop --trials, or use --search random or tpe")
    elif trials is None:
        raise LorafitError(f"{search} search needs the number of points to train", where="--trials",
                           fix=f"add --trials N (e.g. --search {search} --trials 8)")
    if not 0 <= tolerance < 1:
        raise LorafitError(f"{tolerance} is not in [0, 1)", where="--tolerance",
                           fix="give a fraction of the best metric, e.g. 0.01 for 1 %")
    budget = [f"training.max_steps={max_steps}"] if max_steps is not None else []
    base = load_recipe(recipe_path, [*overrides, *budget])
    plan = Plan(recipe_path, list(overrides), axes, search, trials, max_steps, choose_metric(metric, base),
                tolerance, base, budget, parallel=parallel, overwrite=overwrite)
    if search != "grid":
        _plan_pruning(plan)
    else:
        plan.points = grid_points(axes)
    return plan


def _plan_pruning(plan: Plan) -> None:
    """Pruning reads a point's periodic eval losses from its checkpoints: the sweep evaluates PRUNE_EVALS times per
    point when the recipe does not say how often, and checkpoints at each evaluation."""
    tr = plan.base.training
    eval_steps = tr.eval_steps
    if eval_steps is None and tr.max_steps:
        eval_steps = max(1, tr.max_steps // PRUNE_EVALS)
        plan.budget.append(f"training.eval_steps={eval_steps}")
    if eval_steps is None:
        plan.notes.append("pruning off: the points have no periodic evaluation (set training.eval_steps, or give "
                          "--max-steps so that the sweep can choose it)")
        return
    if tr.save_steps is None or tr.save_steps > eval_steps:
        plan.budget.append(f"training.save_steps={eval_steps}")
    plan.prune_eval_steps = eval_steps
    plan.base = load_recipe(plan.recipe_path, [*plan.overrides, *plan.budget])


def probe_points(axes: list[Axis]) -> list[Point]:
    """Random / TPE points are not known before they are sampled: check the corners instead, every choice and
    both ends of every range, the other axes at their first value."""
    def first(axis: Axis) -> tuple:
        return tuple(zip(axis.keys, axis.choices[0])) if not axis.is_range else \
            ((axis.keys[0], format_number(axis.low, axis.integer)),)

    probes = [tuple(v for a in axes for v in first(a))]
    for i, axis in enumerate(axes):
        options = [tuple(zip(axis.keys, c)) for c in axis.choices] if not axis.is_range else \
            [((axis.keys[0], format_number(x, axis.integer)),) for x in (axis.low, axis.high)]
        for option in options:
            values = tuple(v for j, a in enumerate(axes) for v in (option if j == i else first(a)))
            if values not in probes:
                probes.append(values)
    return [point_for(v) for v in probes]


def check_plan(plan: Plan, *, will_train: bool) -> None:
    """Every check that needs no training, before anything is written: each point's recipe (grid) or each corner
    of the space (random / TPE) through the schema; `lorafit validate`'s checks on the first; the model checks
    (files, config, target modules on the meta model) of each other distinct model; the data must hold eval rows
    (points are ranked on them); and point dirs must not hold runs of another recipe."""
    from lorafit import pipeline

    points = plan.points if plan.search == "grid" else probe_points(plan.axes)
    recipes, problems = [], []
    for point in points:
        try:
            recipes.append((point, plan.recipe_of(point)))
        except RecipeError as e:
            problems += [f"point {point.name}: {line}" for line in e.problems]
    if problems:
        raise RecipeError(problems[0], problems=problems)
    if not will_train:
        return
    first = recipes[0][1]
    report = pipeline.validate(first, recipe_path=plan.recipe_path)
    from lorafit import render

    for line in render.estimate_headline(report.plan)[2:]:
        log.warn(f"point {recipes[0][0].name}: {line}")
    if not report.data.get("eval_rows"):
        raise LorafitError("the points are ranked on held-out rows, and the data has none", where="data.eval_fraction",
                           fix="set data.eval (a file) or data.eval_fraction (e.g. 0.1)")
    checked = {_model_key(first)}
    for point, recipe in recipes[1:]:
        key = _model_key(recipe)
        if key not in checked:
            checked.add(key)
            try:
                pipeline.check_model(recipe)
            except LorafitError as e:
                raise LorafitError(e.message, where=f"point {point.name}: {e.where}" if e.where else
                                   f"point {point.name}", fix=e.fix) from None
    if plan.search == "grid" and not plan.overwrite:
        check_point_dirs(plan, dict(recipes))


def _model_key(recipe: Recipe) -> str:
    """What pipeline.check_model looks at."""
    doc = recipe.model_dump(mode="json")
    tr = doc["training"]
    return json.dumps([doc["model"], doc["quantization"], doc["lora"]["target_modules"], doc["data"]["packing"],
                       tr["precision"], tr["liger"], tr["report_to"], tr["distributed"]], sort_keys=True)


STALE_FIX = "add --overwrite to train every point again, or set another output.dir (--set output.dir=DIR)"


def stale_run(plan: Plan, point: Point, recipe: Recipe | None = None) -> str | None:
    """Why the point's dir holds a run (finished or interrupted) of another recipe, which would be reused or
    resumed as if it were this point's; None when it holds none or this point's."""
    from lorafit.stages.resume import recipe_changes

    run_dir = plan.run_dir(point)
    if run_state(run_dir) == "new" or not (run_dir / "recipe.yaml").is_file():
        return None
    recipe = recipe or plan.recipe_of(point)
    changes = recipe_changes(run_dir / "recipe.yaml", recipe) + _length_changes(run_dir / "recipe.yaml", recipe)
    return f"{run_dir} holds a run of another recipe ({'; '.join(changes[:4])})" if changes else None


def check_point_dirs(plan: Plan, recipes: dict) -> None:
    """Grid: refuse before training when a point's dir holds another recipe's run, naming the differences."""
    for point, recipe in recipes.items():
        why = stale_run(plan, point, recipe)
        if why:
            raise RecipeError(why, where="output.dir", fix=STALE_FIX)


def _length_changes(old_file: Path, recipe: Recipe) -> list[str]:
    import yaml

    old = (yaml.safe_load(old_file.read_text(encoding="utf-8")) or {}).get("training") or {}
    new = recipe.training
    found = []
    if old.get("max_steps") != new.max_steps:
        found.append(f"training.max_steps: {old.get('max_steps')!r} → {new.max_steps!r}")
    elif new.max_steps is None and old.get("epochs") != new.epochs:
        found.append(f"training.epochs: {old.get('epochs')!r} → {new.epochs!r}")
    return found
