"""Progress and warnings go to stderr, so that stdout stays clean for results and --json."""

from __future__ import annotations

import sys

from lorafit.core.distributed import is_main_process  # under torchrun every process runs the CLI; rank 0 speaks


def info(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Every rank meets the same warnings: rank 0 alone says them."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


class Progress:
    """Batches of a long loop (evaluation, generation) on stderr, in the style of training's progress: a bar
    on a terminal; elsewhere a line at each quarter of a loop of 8 batches or more (no line for short ones).

        with log.Progress("generate (adapter)", total=len(batches)) as progress:
            for batch in batches: ...; progress.update()
    """

    def __init__(self, desc: str, total: int, unit: str = "batch"):
        self.desc, self.total, self.unit, self.done, self.bar = desc, total, unit, 0, None

    def __enter__(self) -> "Progress":
        if is_main_process() and sys.stderr.isatty() and self.total > 1:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, dynamic_ncols=True, leave=False)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total >= 8 and self.done < self.total and self.done % max(1, self.total // 4) < n:
            info(f"{self.desc}: {self.done}/{self.total} {self.unit}es" if self.unit.endswith("ch")
                 else f"{self.desc}: {self.done}/{self.total} {self.unit}s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
