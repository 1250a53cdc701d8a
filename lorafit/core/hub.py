"""Where a model name points: a hub repo id, or a path on this machine. A local path never leaves the
machine (push, model cards); a name that can only be a path but does not exist is the user's mistake."""

from __future__ import annotations

from pathlib import Path

from lorafit.errors import ModelError
from lorafit.recipe import ModelSpec


def looks_like_path(name: str) -> bool:
    """A name a user means as a path: ./x, /x, ~/x, a/b/c (hub ids have at most one slash), or a\\b."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def is_hub_id(name: str | None) -> bool:
    """A hub repo id (``gpt2``, ``owner/name``) that is not also a path on this machine."""
    if not name or Path(name).expanduser().exists() or looks_like_path(name):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_id(name: str | None) -> str | None:
    """*name* when it is a hub id, else None (a local path never leaves the machine)."""
    return name if is_hub_id(name) else None


def local_path(name: str, *, where: str = "model.name") -> Path | None:
    """The local file or directory *name* points at; None for a hub id. A name that can only be a path
    but does not exist is the user's mistake (ModelError naming *where*)."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if not is_hub_id(name):
        raise ModelError(f"directory not found: {name}", where=where, fix="check the path (or give a hub id)")
    return None


def local_dir(spec: ModelSpec) -> Path | None:
    path = local_path(spec.name)
    return path if path is not None and path.is_dir() else None
