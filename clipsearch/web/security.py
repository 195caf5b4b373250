"""The web app's guard, an ASGI middleware in front of every route: Host and Origin checks, the access token,
and the security headers of every response.

- Host: only the bound host, localhost, 127.0.0.1 and [::1] (with the port) are answered, so a page on another
  site whose name an attacker re-points at 127.0.0.1 (DNS rebinding) gets 421. A wildcard bind (0.0.0.0, ::)
  accepts any name it is reached by: it always has a token.
- Origin: a request a browser marks as coming from another origin (`Origin` header) is refused with 403 unless it
  is a plain GET or HEAD, so another site cannot post to the API.
- Token: when set, every request carries it as `Authorization: Bearer T`, or in the HttpOnly, SameSite=Strict
  cookie that opening any URL once with `?token=T` sets (answered with a redirect to the URL without it).
- Headers: nosniff, no referrer, a strict Content-Security-Policy, no framing, no cross-origin embedding, never
  any `Access-Control-Allow-*`; plus `Server-Timing: app;dur=<ms>`, the time the app took to answer.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

Scope = dict[str, Any]
ASGIApp = Any

CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", CSP.encode()),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
]
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]{8,}")  # safe in a header, a cookie and a URL as it is


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server reachable from this machine only."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_token(token: str) -> None:
    """Refuse a token too short, or with characters a cookie or URL would mangle.

    Raises:
        ValueError: the message says what a token must look like.
    """
    if not TOKEN_PATTERN.fullmatch(token):
        raise ValueError(
            "the token must be at least 8 letters, digits or -._~ (make one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe())'`)"
        )


def cookie_name(port: int) -> str:
    """The token cookie's name: cookies ignore ports, so two servers on one machine need two names."""
    return f"clipsearch_token_{port}"


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header as text (the first, if repeated)."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class Guard:
    """The ASGI middleware; see the module docstring.

    Args:
        app: the app it guards.
        host: the address the server binds.
        port: the port it listens on.
        token: the access token; None lets every request through (loopback binds only).
    """

    def __init__(self, app: ASGIApp, host: str, port: int, token: str | None) -> None:
        if token is not None:
            check_token(token)
        self.app = app
        self.token = token
        self.cookie = cookie_name(port)
        bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
        names = {bound, *LOOPBACK_NAMES}
        self.any_host = host in WILDCARD_HOSTS
        self.hosts = {f"{n}:{port}" for n in names} | (names if port == 80 else set())
        self.origins = {f"http://{h}" for h in self.hosts}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # the app has none; refuse before any route sees one
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                elapsed = (time.perf_counter() - started) * 1000
                headers = [(k, v) for k, v in message.get("headers", []) if not k.startswith(b"access-control-")]
                headers += [*SECURITY_HEADERS, (b"server-timing", f"app;dur={elapsed:.2f}".encode())]
                message = {**message, "headers": headers}
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await self._respond(send_with_headers, *refusal)
            return
        if self.token is not None:
            query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
            if "token" in query:
                await self._token_from_url(scope, query, send_with_headers)
                return
            if not self._authorised(scope):
                message = "this server needs its token: send `Authorization: Bearer TOKEN`, or open /?token=TOKEN once"
                await self._respond(send_with_headers, 401, message)
                return
        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) for a request from a foreign Host or Origin; None for one that may go on."""
        host = (_header(scope, b"host") or "").lower()
        if not self.any_host and host not in self.hosts:
            return 421, f"unexpected Host header {host!r}; open the address `clipsearch serve` printed"
        origin = _header(scope, b"origin")
        if origin is not None and scope.get("method", "GET") not in ("GET", "HEAD"):
            allowed = origin.lower() in self.origins or (self.any_host and origin.lower() == f"http://{host}")
            if not allowed:
                return 403, f"requests from {origin!r} are not allowed; use the page this server serves"
        return None

    def _authorised(self, scope: Scope) -> bool:
        """Whether the request carries the token (header or cookie), compared in constant time."""
        given = []
        authorization = _header(scope, b"authorization") or ""
        if authorization.lower().startswith("bearer "):
            given.append(authorization[7:].strip())
        cookies = SimpleCookie()
        try:
            cookies.load(_header(scope, b"cookie") or "")
        except Exception:  # a malformed Cookie header is no token
            cookies = SimpleCookie()
        if self.cookie in cookies:
            given.append(cookies[self.cookie].value)
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)

    async def _token_from_url(self, scope: Scope, query: dict[str, str], send: Any) -> None:
        """`?token=T`: a right token sets the cookie and redirects to the URL without it; a wrong one is 401."""
        if not hmac.compare_digest(query["token"].encode(), self.token.encode()):
            await self._respond(send, 401, "wrong token; use the one `clipsearch serve` was started with")
            return
        rest = urlencode([(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode()) if k != "token"])
        location = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict"
        headers = [(b"location", location.encode()), (b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 303, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    @staticmethod
    async def _respond(send: Any, status: int, message: str) -> None:
        """A one-line JSON error."""
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
