"""Files and directories that appear whole or not at all: written under a temporary name beside their place,
then renamed into it. A failure (a full disk, Ctrl-C, a crash) leaves what was there before, never half of
the new one; the temporary name is unique per process, so two processes writing one run dir never clash.

Every write of a result goes through here: run files (metrics.json, recipe.yaml, report.md, loss.png),
adapter/ and checkpoints, the GGUF cache, merge's, blend's and export's outputs, predict's JSONL; and the one
check of a directory a command is about to write whole (check_output).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lorafit.errors import LorafitError


def temp_sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name beside *path*: ``.NAME.TAG-PID-RANDOM`` (hidden: push never uploads it)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """*write* a temporary file beside *path* (it is given the temporary path), then rename it over *path*;
    the temporary file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def replace_dir(new: Path, path: Path) -> None:
    """Rename the directory *new* to *path*. An old *path* is first renamed aside and removed only after the
    new one is in place: at every moment *path* is the old directory or the new one."""
    new, path = Path(new), Path(path)
    old = None
    if path.exists() or path.is_symlink():
        old = temp_sibling(path, "old")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path, tag: str = "partial") -> Iterator[Path]:
    """A fresh temporary directory beside *path* (``.NAME.partial-…``, made with the umask's permissions) to
    write into; renamed to *path* (replace_dir) when the block succeeds, removed when it fails.

        with atomic_dir(run_dir / "adapter") as tmp:
            model.save_pretrained(tmp)      # any failure here leaves adapter/ as it was
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, tag)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(output: Path, sources: Iterable[Path | None], *, overwrite: bool, option: str = "--output") -> None:
    """*output* may become a directory written whole (atomic_dir: with --overwrite, what is there is removed).
    Refused, --overwrite or not: a file; a directory that is, or holds, one of *sources* (what the command
    reads), the working directory or the home directory. Without *overwrite*: a directory that holds anything."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LorafitError(f"{output} is a file", where=option, fix="give a directory path")
    target = output.expanduser().resolve()
    fix = "write to a new directory of its own (e.g. beside the source: NAME-out)"
    for source in sources:
        # Equal to, or a folder above, a source: --overwrite would remove what is being read.
        if source is not None and source.exists() and source.resolve().is_relative_to(target):
            raise LorafitError(f"{output} holds a source of this command ({source})", where=option, fix=fix)
    for name, place in (("the working directory", Path.cwd()), ("the home directory", Path.home())):
        if place.resolve().is_relative_to(target):
            what = name if place.resolve() == target else f"a folder above {name}"
            raise LorafitError(f"{output} is {what}: --overwrite would remove what it holds", where=option, fix=fix)
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LorafitError(f"{output} exists and is not empty", where=option,
                           fix="choose a new directory, or add --overwrite to replace it")
