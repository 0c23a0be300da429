"""The guard in front of every route: a loopback Host header (against DNS rebinding) and, when
set, the bearer token.

Not Starlette's TrustedHostMiddleware: its refusal is a fixed plain-text 400 ("Invalid host
header"), while a client of this OpenAI-compatible API gets an OpenAI-style JSON error it can
show (403 `forbidden_host`); the token check needs a middleware here anyway.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from starlette.responses import Response

from rpo_local.server.request import error_response

if TYPE_CHECKING:
    from starlette.types import ASGIApp

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST = re.compile(r"(?:\[(?P<ip6>[0-9a-f:.]+)\]|(?P<name>[a-z0-9.-]+))(?::[0-9]{1,5})?")


def host_name(value: str) -> str:
    """The host of a Host header: `[::1]:8765` → `::1`, `LocalHost.:80` → `localhost`; "" for
    anything that is not exactly host[:port] (`localhost:80@evil.com`, a bare IPv6, spaces)."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return ""
    return match["ip6"] or match["name"].rstrip(".")


class Guard:
    """ASGI middleware: the Host must be one of `allowed_hosts`; `api_key`, when set, is required
    as a bearer token everywhere but /health (liveness)."""

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str], api_key: str | None) -> None:
        self.app, self.allowed_hosts, self.api_key = app, allowed_hosts, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            problem = self.check(scope["path"], headers)
            if problem is not None:
                await problem(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def check(self, path: str, headers: dict[str, str]) -> Response | None:
        if host_name(headers.get("host", "")) not in self.allowed_hosts:
            return error_response(403, f"Host {headers.get('host', '')!r} is not allowed; use 127.0.0.1 or localhost",
                                  "permission_error", "forbidden_host")
        if self.api_key and path != "/health":
            given = headers.get("authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return error_response(401, "missing or wrong API key (Authorization: Bearer $RPO_API_KEY)",
                                      "authentication_error", "invalid_api_key")
        return None
