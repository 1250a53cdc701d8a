"""Errors. A LorafitError is the user's mistake (exit 2); anything else is ours (exit 1).

Raise them deep, with *where* (a dotted recipe path or ``file:line``) and a *fix*; only the CLI
turns them into the one ``error:`` line the user reads.
"""

from __future__ import annotations


class LorafitError(Exception):
    """A mistake the user can fix: bad recipe, data file, CLI usage, missing model or module."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.message = message
        self.where = where
        self.fix = fix
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text}; {self.fix}" if self.fix else text


class RecipeError(LorafitError):
    """The recipe (or a --set override) is invalid."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None,
                 problems: list[str] | None = None):
        super().__init__(message, where=where, fix=fix)
        # Every problem found, one line each: all are reported at once, not one per run.
        self.problems = problems or [str(self)]


class DataError(LorafitError):
    """A data file or its rows cannot be used; *where* is ``file:line`` when known."""


class ModelError(LorafitError):
    """The model (or adapter) cannot be found or does not fit the recipe."""


class AdviceError(LorafitError):
    """Advice (docs/advice.md) made an error by advice.strict or --strict: the run would start, but unwisely."""


class RunFailed(LorafitError):
    """Training produced a NaN/inf loss: the adapter is not saved."""


class PushError(LorafitError):
    """The push cannot be done as asked (repo id, token, rights)."""


class OutOfMemory(LorafitError):
    """An evaluation ran out of memory even at batch size 1 (it halves its batch first)."""


class TrainingInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped `train`: not a mistake and not a failure. The CLI prints the resume
    command and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, *, step: int, max_steps: int, checkpoint: str | None, immediate: bool = False,
                 saving: str | None = None):
        self.signum = signum
        self.step = step
        self.max_steps = max_steps
        self.checkpoint = checkpoint    # the last complete checkpoint, or None
        self.immediate = immediate      # a second signal: stopped at once, without a new checkpoint
        self.saving = saving            # the checkpoint being written when it stopped at once (not written), or None
        self.resume_command: str | None = None  # filled in by the CLI, which knows the command line
        super().__init__(f"interrupted at step {step}/{max_steps}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class EvaluationInterrupted(Exception):
    """Ctrl-C / SIGTERM during the final evaluation of `train`: the adapter and metrics.json are saved already.
    The CLI says how to evaluate later (`lorafit evaluate RUN`) and exits 128 + the signal's number."""

    def __init__(self, signum: int, run_dir: str | None = None):
        self.signum = signum
        self.run_dir = run_dir          # filled in by the train pipeline, which knows it
        super().__init__(f"interrupted during the final evaluation (signal {signum})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
