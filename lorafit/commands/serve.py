"""`lorafit serve`: one base and its adapters behind an OpenAI-compatible API (lorafit.serving), each
request answered by the adapter its `model` names. Everything a user can get wrong on the command line
(paths, names, adapters of different bases or tasks, a port in use) fails here, before weights load; the socket,
uvicorn and signals are serving/server.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorafit import log
from lorafit.core.adapters import (ADAPTER_NAME, check_same_base, find_adapter, find_named, holds_adapter, parse_adapters,
                                   same_base)
from lorafit.errors import LorafitError, ModelError


def serve(model_or_adapter: str | None, *, adapters: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_loaded: int = 8, max_batch: int = 16,
          allow_runtime_adapters: bool = False,
          adapter_root: Path | None = None, trust_remote_code: bool = False,
          on_ready: Callable[[dict], None] | None = None) -> dict:
    """Serve until SIGTERM / Ctrl-C (requests in flight finish first); *on_ready* gets the banner's facts once
    the server accepts connections. Returns {url, served, requests, signal}."""
    from lorafit.serving.registry import check_servable
    from lorafit.serving.server import listen, run

    api_key = api_key.strip() if api_key is not None else None
    root = _check_options(model_or_adapter, adapters, api_key, allow_runtime_adapters, adapter_root, host)
    named, plain = [], None
    if model_or_adapter is not None and holds_adapter(model_or_adapter):
        source = find_adapter(model_or_adapter)
        named.append((_directory_name(model_or_adapter, source), source))
    elif model_or_adapter is not None:
        plain = str(model_or_adapter)
    pairs = parse_adapters(adapters or [])
    if named and named[0][0] in dict(pairs):
        raise LorafitError(f"the name '{named[0][0]}' is given twice (RUN_DIR is served under its directory name)",
                           where="--adapter", fix="give the --adapter another name")
    named += find_named(pairs)
    if named:
        check_same_base(named, "--adapter" if pairs else "RUN_DIR")
        check_servable(named, "--adapter" if pairs else "RUN_DIR")
    for name, _ in pairs:  # the base answers to its own name first: such an adapter would be unreachable
        if name in (plain, named[0][1].base):
            raise LorafitError(f"'{name}' is the base model's name", where=f"--adapter {name}",
                               fix="give the adapter another name")
    if plain is not None and named and not same_base(plain, named[0][1].base):
        raise ModelError(f"adapter '{named[0][0]}' was trained on {named[0][1].base}, not on {plain}",
                         where=f"--adapter {named[0][0]}", fix="drop MODEL: adapters name their own base")
    sock = listen(host, port)  # a port in use fails before minutes of loading
    try:
        from lorafit.serving.app import create_app
        from lorafit.serving.engine import Engine
        from lorafit.serving.handlers import Handlers
        from lorafit.serving.registry import open_registry

        registry = open_registry(named, plain, max_loaded=max_loaded, trust_remote_code=trust_remote_code)
        engine = Engine(registry, max_batch=max_batch)
        shown = f"[{host}]" if ":" in host else host
        info = {"url": f"http://{shown}:{sock.getsockname()[1]}", "base": registry.base_id,
                "adapters": list(registry.adapters), "classifies": registry.base.task.labelled,
                "api_key": api_key is not None, "runtime_adapters": str(root) if root else None,
                "max_loaded": max_loaded, "max_batch": max_batch, "context": registry.context}
        app = create_app(Handlers(engine, registry, adapter_root=root), api_key=api_key,
                         on_ready=(lambda: on_ready(info)) if on_ready else None)
        caught = run(app, sock)
    finally:
        sock.close()  # also when loading failed: the port is free again at once
    return {**info, "requests": engine.stats["requests"], "signal": caught}


def _directory_name(given: str, source) -> str:
    """The name a positional RUN_DIR / ADAPTER_DIR is served under: its directory's, when that can name an
    adapter (as --adapter names must) and is not the base's."""
    name = (source.run_dir or source.adapter_dir).name
    if not ADAPTER_NAME.fullmatch(name) or name in ("base", source.base):
        why = ("stands for the base model" if name in ("base", source.base)
               else "has characters other than letters, digits, '_' and '-'")
        raise LorafitError(f"it would be served under its directory name '{name}', which {why}", where="RUN_DIR",
                           fix=f"name it yourself: use --adapter NAME={given}")
    return name


def _check_options(model_or_adapter, adapters, api_key, allow_runtime_adapters, adapter_root, host) -> Path | None:
    from lorafit.serving.server import is_loopback

    if model_or_adapter is None and not adapters:
        raise LorafitError("nothing to serve", where="MODEL",
                           fix="pass a run dir, an adapter dir or a model, or --adapter NAME=DIR (repeatable)")
    if api_key is not None and not api_key.strip():
        raise LorafitError("the API key is empty", where="--api-key", fix="give a non-empty key, or none")
    if adapter_root is not None and not allow_runtime_adapters:
        raise LorafitError("--adapter-root is where runtime adapters are loaded from, and loading them is off",
                           where="--adapter-root", fix="add --allow-runtime-adapters")
    root = None
    if allow_runtime_adapters:
        if adapter_root is None:
            raise LorafitError("adapters loaded at run time must come from one folder", where="--allow-runtime-adapters",
                               fix="add --adapter-root DIR (no path outside it can be loaded)")
        if not adapter_root.is_dir():
            raise LorafitError(f"no folder {adapter_root}", where="--adapter-root", fix="give an existing folder")
        root = adapter_root.resolve()
    if api_key is None and not is_loopback(host):
        if allow_runtime_adapters:
            raise LorafitError(f"on {host} without an API key, anyone who reaches this port could load adapters from "
                               f"{root} into the server", where="--allow-runtime-adapters",
                               fix="add --api-key KEY (or set LORAFIT_API_KEY), or serve on --host 127.0.0.1")
        log.warn(f"serving on {host} without an API key: anyone who reaches this port can use the model "
                 "(set --api-key or LORAFIT_API_KEY)")
    return root
