"""The listening socket and uvicorn: loopback by default, a busy port as a clear error, and the
real server in a thread for tests and the benchmark."""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import time
from typing import Any

from rpo_local.errors import ConfigError

DEFAULT_PORT = 8765


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so a busy port is a clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    sock.set_inheritable(False)
    return sock


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless explicitly allowed, and warn when it is."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise ConfigError(f"refusing to listen on {host}: not a loopback address (pass --allow-remote to do it anyway)")
    print(f"rpo: WARNING: listening on {host}: other machines can reach this daemon; "
          "set RPO_API_KEY to require a token", file=sys.stderr, flush=True)


def _uvicorn_server(app: Any, *, log_level: str = "warning", use_colors: bool = False):
    import uvicorn

    config = uvicorn.Config(app, lifespan="on", log_level=log_level, access_log=False, use_colors=use_colors,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, *, use_colors: bool = False) -> None:
    """Serve on `sock` until Ctrl-C (uvicorn finishes the requests in flight, then the lifespan stops)."""
    _uvicorn_server(app, use_colors=use_colors).run(sockets=[sock])


class BackgroundServer:
    """The real server on a loopback port in a thread (tests and the benchmark)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = _uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
