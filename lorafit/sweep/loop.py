"""The sweep's loop: points start as slots free up (one slot on CPU, one per GPU with --parallel), each in its
own process; a finished point is never trained again, an interrupted one resumes; a point random / TPE samples
again while it trains in another slot waits for it, then reuses its results (two processes never write one run
dir); the base model is evaluated by one point per base group (the first that trains), the others skip it
(evaluation.compare_base false); Ctrl-C / SIGTERM stop the loop once the running points have checkpointed.

Where the points come from is a Source: the grid (every point, in order) or an Optuna study (its interrupted
trials first, then new trials until there are --trials).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

from lorafit import log
from lorafit.sweep import runner
from lorafit.sweep.plan import STALE_FIX, Plan, stale_run
from lorafit.sweep.space import Point


@dataclass
class Job:
    point: Point
    index: int                    # 1-based: grid position, or trial number + 1
    trial: object = None          # optuna Trial (random / tpe)
    on_eval: object = None        # pruning reporter


@dataclass
class Done:
    """What happened to a point in this run of the sweep."""

    action: str                   # trained | resumed | reused
    outcome: runner.Outcome | None = None


class GridSource:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.queue = list(enumerate(plan.points, 1))
        self.total = len(plan.points)

    def next(self) -> Job | None:
        if not self.queue:
            return None
        index, point = self.queue.pop(0)
        return Job(point, index)

    def done(self, job: Job, outcome: runner.Outcome | None, metrics: dict | None) -> None:
        pass


class StudySource:
    """Trials of the study: those a previous run left RUNNING first (resumed), then new ones."""

    def __init__(self, plan: Plan, study):
        from lorafit.sweep import study as S

        self.plan, self.study, self.S = plan, study, S
        self.resume = S.running_trials(study)
        self.total = plan.trials
        self.distributions = S.distributions(plan.axes)

    def next(self) -> Job | None:
        S = self.S
        if self.resume:
            frozen = self.resume.pop(0)
            trial = S.live_trial(self.study, frozen)
            reported = frozen.intermediate_values.keys()
        elif len(self.study.trials) < self.total:
            trial, reported = self.study.ask(self.distributions), ()
        else:
            return None
        point = S.point_of(trial.params, self.plan.axes)
        if point not in self.plan.points:
            self.plan.points.append(point)
        on_eval = S.pruning_reporter(trial, self.plan.metric.maximize, reported) \
            if self.plan.prune_eval_steps is not None else None
        return Job(point, trial.number + 1, trial, on_eval)

    def done(self, job: Job, outcome: runner.Outcome | None, metrics: dict | None) -> None:
        value = self.plan.metric.of((metrics or {}).get("eval") or {}) if metrics else None
        status = outcome.status if outcome else "finished"
        job.trial.set_user_attr("point", job.point.name)
        self.S.tell(self.study, job.trial, status, value, outcome.error if outcome else None,
                    resumable=bool(outcome and outcome.resumable))


@dataclass
class Bases:
    """Which base group has its base evaluation (a finished point's metrics.json) or a running point measuring it."""

    plan: Plan
    known: set = field(default_factory=set)
    measuring: dict = field(default_factory=dict)   # group → point name

    def scan(self, points) -> None:
        for point in points:
            m = runner.read_metrics(self.plan.run_dir(point)) if runner.run_state(self.plan.run_dir(point)) == \
                "finished" else None
            if m and "base_eval_loss" in (m.get("eval") or {}):
                self.known.add(self.plan.base_group(point))

    def claim(self, point: Point) -> bool:
        """True: this point measures its group's base."""
        group = self.plan.base_group(point)
        if not self.plan.base.evaluation.compare_base or group in self.known or group in self.measuring:
            return False
        self.measuring[group] = point.name
        return True

    def release(self, point: Point) -> None:
        group = self.plan.base_group(point)
        if self.measuring.get(group) == point.name:
            del self.measuring[group]
        self.scan([point])


def slots(plan: Plan) -> list[str | None]:
    """One slot on CPU (points run one after another); with --parallel N, one per GPU (CUDA_VISIBLE_DEVICES)."""
    return [None] if plan.parallel <= 1 else [str(i) for i in range(plan.parallel)]


def run(plan: Plan, source) -> tuple[dict[str, Done], int | None]:
    """Train the source's points. Returns {point name: Done} and the signal that stopped the sweep (or None)."""
    done: dict[str, Done] = {}
    bases = Bases(plan)
    bases.scan(plan.points)
    free = slots(plan)
    trained: set[str] = set()  # points started in this run: with --overwrite the others are trained afresh
    running: dict[str | None, tuple[runner.Child, Job, str]] = {}
    held: list[Job] = []  # points sampled again while they train in another slot
    signals = runner.Signals()
    with signals.installed():
        while True:
            while signals.signum is None and free and \
                    (job := next_job(source, held, {j.point.name for _, j, _ in running.values()})) is not None:
                started = _start(plan, job, source.total, bases, free[0], fresh=plan.overwrite and
                                 job.point.name not in trained)
                trained.add(job.point.name)
                if started is None:  # finished before (or just now, in another slot): its metrics are reused
                    done.setdefault(job.point.name, Done("reused"))
                    source.done(job, None, runner.read_metrics(plan.run_dir(job.point)))
                    continue
                if isinstance(started, runner.Outcome):  # refused without running
                    done[job.point.name] = Done("-", started)
                    source.done(job, started, None)
                    continue
                child, action = started
                running[free.pop(0)] = (child, job, action)
                signals.children.append(child)
                if signals.signum is not None:  # a signal came while it started
                    child.send(signals.signum)
            if not running:
                break
            _wait(running)
            for slot, (child, job, action) in list(running.items()):
                if child.proc.poll() is None:
                    child.check_progress()
                    continue
                outcome = runner.finish(child)
                del running[slot]
                signals.children.remove(child)
                free.append(slot)
                bases.release(job.point)
                done[job.point.name] = Done(action, outcome)
                _say_outcome(plan, job, source.total, outcome)
                metrics = runner.read_metrics(plan.run_dir(job.point)) if outcome.status == "finished" else None
                source.done(job, outcome, metrics)
    return done, signals.signum


def next_job(source, held: list[Job], running: set[str]) -> Job | None:
    """The next point to start: a held one whose point no longer runs, else the source's next; a point that runs
    in another slot is held (appended to *held*) until it ends, then started like any point (finished: its
    results reused)."""
    for i, job in enumerate(held):
        if job.point.name not in running:
            return held.pop(i)
    while (job := source.next()) is not None:
        if job.point.name not in running:
            return job
        held.append(job)
    return None


def _start(plan: Plan, job: Job, total: int | None, bases: Bases, slot: str | None, *, fresh: bool):
    """Start the job's point (None when it finished before: reused), resumed when it was interrupted; *fresh*:
    trained from the start whatever its dir holds (--overwrite)."""
    run_dir = plan.run_dir(job.point)
    stale = None if fresh or plan.search == "grid" else stale_run(plan, job.point)  # grid: checked up front
    if stale:
        log.info(f"sweep: point {job.index}/{total} {job.point.name}: not trained: {stale}")
        return runner.Outcome("failed", 2, f"{stale}; {STALE_FIX}", 0.0)
    state = "new" if fresh else runner.run_state(run_dir)
    if state == "finished":
        log.info(f"sweep: point {job.index}/{total} {job.point.name}: finished before, its results reused")
        return None
    resume = state == "interrupted"
    if resume and runner.newest_checkpoint(run_dir)[1] >= (plan.recipe_of(job.point).training.max_steps or 1 << 62):
        # Its last step is checkpointed (it failed while evaluating or saving): resuming there would train one step
        # past the budget, so it trains again.
        resume, fresh = False, True
    measure = bases.claim(job.point)
    argv = plan.train_argv(job.point, resume=resume, compare_base=measure, overwrite=fresh)
    what = "resuming from its last checkpoint" if resume else "training"
    log.info(f"sweep: point {job.index}/{total} {job.point.name}: {what}"
             + (" (and evaluating the base model once for the sweep)" if measure else ""))
    env = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else None
    child = runner.start(job.index, argv, run_dir, env=env, on_eval=job.on_eval)
    return child, "resumed" if resume else "trained"


def _wait(running: dict) -> None:
    if len(running) == 1:
        (child, _, _), = running.values()
        try:
            child.proc.wait(timeout=runner.POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
    else:
        time.sleep(runner.POLL_SECONDS)


def _say_outcome(plan: Plan, job: Job, total: int | None, outcome: runner.Outcome) -> None:
    head = f"sweep: point {job.index}/{total} {job.point.name}:"
    if outcome.status == "finished":
        metrics = runner.read_metrics(plan.run_dir(job.point)) or {}
        value = plan.metric.of(metrics.get("eval") or {})
        shown = f"{value:.4f}" if value is not None else "-"
        log.info(f"{head} finished in {outcome.wall_seconds:.0f} s ({plan.metric.name} {shown})")
    elif outcome.status == "pruned":
        log.info(f"{head} pruned at step {outcome.pruned_at}")
    elif outcome.status == "interrupted":
        log.info(f"{head} interrupted; a re-run of the sweep resumes it")
    else:
        log.info(f"{head} failed: {outcome.error}")
