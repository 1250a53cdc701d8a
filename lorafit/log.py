"""Progress and warnings go to stderr, so that stdout stays clean for results and --json."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Under torchrun every process runs the CLI; only rank 0 speaks."""
    return os.environ.get("RANK", "0") == "0"


def info(message: str) -> None:
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Every rank meets the same warnings: rank 0 alone says them."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def local_rank() -> int:
    """This process's GPU under torchrun / accelerate launch (0 when alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def quiet_libraries() -> None:
    """Our progress bar and warnings are the ones users read: silence the libraries' chatter."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Deprecation notices about names lorafit (or peft) uses internally are not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is deprecated and will be removed in v6.*")
