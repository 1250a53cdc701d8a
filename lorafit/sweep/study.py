"""Random and TPE search through Optuna: the study lives in OUTPUT/sweep/optuna.journal (Optuna's file storage),
so a re-run resumes it: finished, failed and pruned trials stay done, a trial whose point was interrupted or
killed (still RUNNING in the journal) trains on from its checkpoint, and new trials are asked until there
are --trials in all. Pruning: Optuna's MedianPruner on the point's periodic eval losses."""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.sweep.space import Axis, Point, format_number, point_for

STUDY = "lorafit-sweep"
JOURNAL = "optuna.journal"
PRUNER_STARTUP = 3  # trials that finish before any is pruned: the median needs company


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep says what happens, in its own lines
    return optuna


def _storage(sweep_dir: Path):
    optuna = _optuna()
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))


def check_existing(sweep_dir: Path, signature: str) -> tuple[int, int]:
    """(trials, of which RUNNING) already in the sweep dir's study, (0, 0) when none; refuses a study made by
    another sweep (another recipe, budget, search space, search or metric), before anything is written."""
    if not (sweep_dir / JOURNAL).is_file():
        return 0, 0
    optuna = _optuna()
    try:
        study = optuna.load_study(study_name=STUDY, storage=_storage(sweep_dir))
    except KeyError:
        return 0, 0
    if study.user_attrs.get("signature") != signature:
        raise LorafitError(f"{sweep_dir / JOURNAL} holds the study of another sweep (a different recipe, step budget, "
                           "search space, search or metric)", where="--search",
                           fix="run the same sweep again to resume it, add --overwrite to start a new study there, "
                               "or choose another output.dir")
    return len(study.trials), len(running_trials(study))


def open_study(sweep_dir: Path, *, search: str, maximize: bool, seed: int, trials: int, signature: str):
    optuna = _optuna()
    storage = _storage(sweep_dir)
    done = len(optuna.load_study(study_name=STUDY, storage=storage).trials) \
        if STUDY in optuna.get_all_study_names(storage) else 0
    seed = seed + done  # a resumed study must not replay the first run's samples
    if search == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 3)))
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(study_name=STUDY, storage=storage, sampler=sampler, load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP),
                                direction="maximize" if maximize else "minimize")
    study.set_user_attr("signature", signature)
    return study


def distributions(axes: list[Axis]) -> dict:
    """Optuna distributions: a grid axis is a categorical over its choices, a range a float / int interval."""
    optuna = _optuna()
    found = {}
    for axis in axes:
        if axis.is_range:
            if axis.integer:
                found[axis.label] = optuna.distributions.IntDistribution(int(axis.low), int(axis.high), log=axis.log)
            else:
                found[axis.label] = optuna.distributions.FloatDistribution(axis.low, axis.high, log=axis.log)
        else:
            found[axis.label] = optuna.distributions.CategoricalDistribution([axis.choice_label(c) for c in axis.choices])
    return found


def point_of(params: dict, axes: list[Axis]) -> Point:
    """The point a trial's parameters stand for."""
    values = []
    for axis in axes:
        value = params[axis.label]
        if axis.is_range:
            values.append((axis.keys[0], format_number(value, axis.integer)))
        else:
            choice = next(c for c in axis.choices if axis.choice_label(c) == value)
            values.extend(zip(axis.keys, choice))
    return point_for(tuple(values))


def running_trials(study) -> list:
    """Trials a previous run left RUNNING (interrupted or killed): resumed first."""
    optuna = _optuna()
    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.RUNNING]


def live_trial(study, frozen):
    """A Trial to report to and tell, for a trial a previous process asked (Optuna keeps it by its id)."""
    optuna = _optuna()
    return optuna.trial.Trial(study, frozen._trial_id)  # noqa: SLF001 — Optuna has no public accessor


def pruning_reporter(trial, maximize: bool, reported=()):
    """(step, eval loss) → report it to the trial; True when the pruner says to stop. The study ranks by the
    sweep's metric: when that is to be maximized, losses are reported negated (higher is better there too).
    *reported*: the steps a previous run of the trial reported already."""
    seen = set(reported)

    def report(step: int, loss: float) -> bool:
        if step not in seen:
            seen.add(step)
            trial.report(-loss if maximize else loss, step)
        return trial.should_prune()

    return report


def tell(study, trial, status: str, value: float | None, error: str | None, *, resumable: bool = False) -> None:
    """Record a point's outcome in its trial. Interrupted / killed (*resumable*) points stay RUNNING: a re-run
    resumes them."""
    optuna = _optuna()
    state = optuna.trial.TrialState
    if status == "finished" and value is not None:
        study.tell(trial, value)
    elif status == "finished":
        trial.set_user_attr("error", "the sweep's metric was not measured")
        study.tell(trial, state=state.FAIL)
    elif status == "pruned":
        study.tell(trial, state=state.PRUNED)
    elif status == "failed" and not resumable:
        trial.set_user_attr("error", error)
        study.tell(trial, state=state.FAIL)
    else:
        trial.set_user_attr("error", error or "interrupted")
