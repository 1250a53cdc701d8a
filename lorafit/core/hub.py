"""Where a model name points: a hub repo id, or a path on this machine. A local path never leaves the
machine (push, model cards); a name that can only be a path but does not exist is the user's mistake."""

from __future__ import annotations

import os
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
    offline_unless_reachable()  # a hub id is about to be looked up
    return None


# Whether this process found the hub unreachable: None (not asked yet), "" (reachable or offline by choice), or
# the address that did not answer.
_UNREACHABLE: list[str | None] = [None]


def offline_unless_reachable(timeout: float = 1.5) -> None:
    """Before the process's first hub look-up: unless the hub is offline already (HF_HUB_OFFLINE), one TCP
    connection to its endpoint (HF_ENDPOINT; the proxy when HTTPS_PROXY is set), at most *timeout* seconds. When
    that fails (no network, no DNS, a firewall), huggingface_hub goes offline for this process: a cached model
    loads at once and an uncached one is refused at once, where huggingface_hub would first retry every file five
    times (~25 s)."""
    if _UNREACHABLE[0] is not None:
        return
    import socket
    import sys
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    _UNREACHABLE[0] = ""
    if constants.is_offline_mode():
        return
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        _UNREACHABLE[0] = f"{host}:{port}"
        constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub and transformers
        os.environ["HF_HUB_OFFLINE"] = "1"  # for what reads it when imported later (datasets)
        config = sys.modules.get("datasets.config")
        if config is not None:
            config.HF_HUB_OFFLINE = True


def hub_unreachable() -> str | None:
    """The hub address this process could not reach (and went offline for), or None."""
    return _UNREACHABLE[0] or None


def local_dir(spec: ModelSpec) -> Path | None:
    path = local_path(spec.name)
    return path if path is not None and path.is_dir() else None
