"""The process side of `lorafit serve`: the listening socket (bound before minutes of loading, so that a port in
use fails at once), uvicorn on it, and SIGTERM / Ctrl-C as a graceful stop that exits 0."""

from __future__ import annotations

import ipaddress

from lorafit.errors import LorafitError


def is_loopback(host: str) -> bool:
    """Only this machine can reach *host* (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int):
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


def run(app, sock) -> str | None:
    """uvicorn on *sock* until SIGTERM / Ctrl-C: it stops accepting, lets requests in flight finish, and the
    process exits 0 (uvicorn would re-raise the signal after its graceful stop; it is noted instead).
    Returns the signal's name, or None. The socket is closed on the way out."""
    import signal
    import threading

    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None, server_header=False)
    server = uvicorn.Server(config)
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # no signals off the main thread
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
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
