"""A point's run: `python -m lorafit train ...` in its own process, so that an out-of-memory kill or a crash
ends that point and not the sweep. Its stderr is relayed line by line (prefixed with the point's number)
and its last `error:` line kept; its eval losses are read as it goes from the trainer_state.json of its
newest checkpoint (the sweep checkpoints at every evaluation when it prunes); Ctrl-C / SIGTERM reach the
sweep alone (each point runs in its own session, so in a process group of its own that the terminal does not
signal) and the sweep forwards them once, so that the point checkpoints and stops as `lorafit train` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import log

POLL_SECONDS = 0.5


def run_state(run_dir: Path) -> str:
    """finished (an adapter and metrics.json), interrupted (checkpoints, no adapter) or new."""
    if (run_dir / "adapter").is_dir() and (run_dir / "metrics.json").is_file():
        return "finished"
    if run_dir.is_dir() and any((run_dir / "checkpoints").glob("checkpoint-*")):
        return "interrupted"
    return "new"


def read_metrics(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def newest_checkpoint(run_dir: Path) -> tuple[Path | None, int]:
    """The run's checkpoint of the highest step, and that step (None, -1 when there is none)."""
    newest, step = None, -1
    for ckpt in (run_dir / "checkpoints").glob("checkpoint-*"):
        suffix = ckpt.name.rsplit("-", 1)[-1]
        if suffix.isdigit() and int(suffix) > step:
            newest, step = ckpt, int(suffix)
    return newest, step


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    """[(step, eval loss)] of the periodic evaluations so far, from the newest checkpoint's trainer_state.json
    (checkpoints appear whole: they are renamed into place)."""
    newest, _ = newest_checkpoint(run_dir)
    if newest is None:
        return []
    try:
        state = json.loads((newest / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    found = {e["step"]: e["eval_loss"] for e in state.get("log_history", []) if "eval_loss" in e and "step" in e}
    return sorted(found.items())


@dataclass
class Child:
    """A point's process while it runs."""

    index: int                   # 1-based, for the relayed lines
    run_dir: Path
    proc: subprocess.Popen
    started: float
    on_eval: object = None       # callable(step, loss) -> True to prune; None: no pruning
    reported: set = field(default_factory=set)
    error: str | None = None     # the last `error:` line of its stderr
    tail: list = field(default_factory=list)
    pruned_at: int | None = None
    last_eval: float | None = None
    signalled: int | None = None
    reader: threading.Thread | None = None

    def check_progress(self) -> None:
        """New eval losses to the pruner; a point it prunes gets SIGTERM (it checkpoints and stops)."""
        if self.on_eval is None or self.pruned_at is not None:
            return
        for step, loss in eval_losses(self.run_dir):
            if step in self.reported:
                continue
            self.reported.add(step)
            self.last_eval = loss
            if self.on_eval(step, loss) and self.proc.poll() is None:
                self.pruned_at = step
                log.info(f"[{self.index}] pruned at step {step}: eval loss {loss:.4f} is worse than the median of "
                         "the points before it at that step")
                self.send(signal.SIGTERM)
                return

    def send(self, signum: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)


@dataclass
class Outcome:
    status: str                  # finished | failed | interrupted | pruned
    returncode: int
    error: str | None
    wall_seconds: float
    pruned_at: int | None = None
    last_eval: float | None = None
    resumable: bool = False      # killed (out of memory?) or interrupted: a re-run resumes it


def start(index: int, argv: list[str], run_dir: Path, *, env: dict | None = None, on_eval=None) -> Child:
    """Start `python -m lorafit ARGV` for a point, in a session (and so a process group) of its own: a Ctrl-C at
    the terminal reaches the sweep alone, which forwards it once (two would stop the point without its
    checkpoint). start_new_session (setsid) rather than Python 3.11's process_group=0: the same for the
    terminal's signals, and it runs on every Python lorafit supports (>= 3.10)."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace",
                            env={**os.environ, **(env or {})}, start_new_session=True)
    child = Child(index=index, run_dir=run_dir, proc=proc, started=time.monotonic(), on_eval=on_eval)
    child.reader = threading.Thread(target=_relay, args=(child,), daemon=True)
    child.reader.start()
    return child


def _relay(child: Child) -> None:
    for line in child.proc.stderr:
        line = line.rstrip("\n")
        if line.startswith("error: "):
            child.error = line.removeprefix("error: ")
        if line.strip():
            child.tail = (child.tail + [line])[-5:]
        log.info(f"[{child.index}] {line}")


def finish(child: Child) -> Outcome:
    """The outcome of a point whose process has exited."""
    code = child.proc.wait()
    if child.reader is not None:
        child.reader.join(timeout=5)
    child.check_progress()  # evaluations that came after the last poll (no pruning once it has exited)
    seconds = round(time.monotonic() - child.started, 3)
    if code == 0 and run_state(child.run_dir) == "finished":
        return Outcome("finished", code, None, seconds)
    if child.pruned_at is not None:
        return Outcome("pruned", code, None, seconds, child.pruned_at, child.last_eval)
    if code < 0:
        name = signal.Signals(-code).name
        why = " (out of memory?)" if -code == signal.SIGKILL else ""
        return Outcome("failed", code, f"killed by {name}{why}; a re-run resumes it from its last checkpoint",
                       seconds, last_eval=child.last_eval, resumable=True)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        return Outcome("interrupted", code, None, seconds, last_eval=child.last_eval, resumable=True)
    error = child.error or (child.tail[-1] if child.tail else f"exit code {code}")
    return Outcome("failed", code, error, seconds, last_eval=child.last_eval)


class Signals:
    """Ctrl-C / SIGTERM while points run: remember the first signal (no new point starts) and forward each one to
    the running points (the first makes a point checkpoint and stop, a second stops it at once)."""

    def __init__(self):
        self.signum: int | None = None
        self.children: list[Child] = []

    def _handler(self, signum, frame):
        self.signum = self.signum or signum
        for child in self.children:
            child.signalled = signum
            child.send(signum)

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for child in self.children:  # the sweep is leaving (an error of ours): leave no point running
                child.send(signal.SIGTERM)
            for s, handler in previous.items():
                signal.signal(s, handler)
