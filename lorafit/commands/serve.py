"""`lorafit serve`: one base and its adapters behind an OpenAI-compatible API (lorafit.serving), each
request answered by the adapter its `model` names. Everything a user can get wrong on the command line
(paths, names, adapters of different bases or tasks, a port in use) fails here, before weights load."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from lorafit import log
from lorafit.core.adapters import check_same_base, find_adapter, find_named, holds_adapter, parse_adapters, same_base
from lorafit.errors import LorafitError, ModelError


def serve(model_or_adapter: str | None, *, adapters: list[str] | None = None, host: str = "127.0.0.1",
          port: int = 8000, api_key: str | None = None, max_loaded: int = 8, max_batch: int = 16,
          allow_runtime_adapters: bool = False,
          adapter_root: Path | None = None, trust_remote_code: bool = False,
          on_ready: Callable[[dict], None] | None = None) -> dict:
    """Serve until SIGTERM / Ctrl-C (requests in flight finish first); *on_ready* gets the banner's facts once
    the server accepts connections. Returns {url, served, requests, signal}."""
    from lorafit.serving.registry import check_servable

    root = _check_options(model_or_adapter, adapters, api_key, allow_runtime_adapters, adapter_root, host)
    named, plain = [], None
    if model_or_adapter is not None and holds_adapter(model_or_adapter):
        source = find_adapter(model_or_adapter)
        name = (source.run_dir or source.adapter_dir).name
        named.append((name, source))
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
    if plain is not None and named and not same_base(plain, named[0][1].base):
        raise ModelError(f"adapter '{named[0][0]}' was trained on {named[0][1].base}, not on {plain}",
                         where=f"--adapter {named[0][0]}", fix="drop MODEL: adapters name their own base")
    sock = _listen(host, port)  # a port in use fails before minutes of loading
    from lorafit.serving.app import create_app
    from lorafit.serving.engine import Engine
    from lorafit.serving.handlers import Handlers
    from lorafit.serving.registry import open_registry

    registry = open_registry(named, plain, max_loaded=max_loaded, trust_remote_code=trust_remote_code)
    engine = Engine(registry, max_batch=max_batch)
    bound = sock.getsockname()
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{bound[1]}"
    info = {"url": url, "base": registry.base_id, "adapters": list(registry.adapters),
            "classifies": registry.base.task.labelled,
            "api_key": api_key is not None, "runtime_adapters": str(root) if root else None,
            "max_loaded": max_loaded, "max_batch": max_batch, "context": registry.context}
    app = create_app(Handlers(engine, registry, adapter_root=root), api_key=api_key,
                     on_ready=(lambda: on_ready(info)) if on_ready else None)
    caught = _run(app, sock)
    return {**info, "requests": engine.stats["requests"], "signal": caught}


def _check_options(model_or_adapter, adapters, api_key, allow_runtime_adapters, adapter_root, host) -> Path | None:
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
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warn(f"serving on {host} without an API key: anyone who reaches this port can use the model "
                 "(set --api-key or LORAFIT_API_KEY)")
    return root


def _listen(host: str, port: int):
    """A listening socket on host:port (port 0: any free one), or the user's mistake named."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LorafitError(f"cannot resolve '{host}': {e.strerror}", where="--host",
                           fix="give an address such as 127.0.0.1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        where = "--port" if e.errno in (98, 48, 13) else "--host"  # in use / permission; else the address
        raise LorafitError(f"cannot listen on {host}:{port}: {e.strerror}", where=where,
                           fix="pick another port (--port 0 takes any free one)" if where == "--port"
                           else "give an address of this machine, such as 127.0.0.1") from None
    sock.listen(2048)  # connections wait in the backlog until uvicorn serves them
    return sock


def _run(app, sock) -> str | None:
    """uvicorn on *sock* until SIGTERM / Ctrl-C: it stops accepting, lets requests in flight finish, and the
    process exits 0 (uvicorn would re-raise the signal after its graceful stop; it is noted instead).
    Returns the signal's name, or None."""
    import signal
    import threading

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None, server_header=False)
    server = uvicorn.Server(config)
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # no signals off the main thread
        server.run(sockets=[sock])
        return None
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in handled}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    return signal.Signals(caught[0]).name if caught else None
