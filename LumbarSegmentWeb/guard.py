"""What ``lumbarseg web`` accepts over HTTP and the WebSocket (the policy of docs/threat_model.md).

The server runs next to the annotator's browser, so every page of another origin is
hostile: it may send requests to ``127.0.0.1:PORT`` and open a WebSocket to it. The
rules, checked on every request before any handler runs (:func:`middleware`):

* **Host** must name the served address and port (``127.0.0.1``, ``localhost`` or
  ``[::1]`` for a loopback server, the ``--host`` address otherwise; any name for a
  wildcard address such as ``0.0.0.0``, which needs a token). A DNS-rebinding page,
  whose requests say ``Host: evil.example:PORT``, is refused.
* **Origin**, when the browser sends one (always on a WebSocket and on scripted
  requests), must be this server's own origin; ``Sec-Fetch-Site`` must not say
  ``cross-site``/``same-site`` except for a top-level navigation. Pages may not be
  framed (``X-Frame-Options``, ``frame-ancestors``).
* **Token** (when the server has one): the page needs ``?token=``; the page hands it to
  the connection endpoint below (in its request body, and in the ``Referer`` that
  ``Referrer-Policy: same-origin`` keeps to this origin). No cookie is ever set: a
  cookie is not scoped by port, so it would reach every other server on this host.
* **WebSocket**: the page learns the URL of the socket from :data:`LAUNCHER_PATH` (the
  launcher step of trame's client) with a random per-run key in it; ``/ws`` without that
  key is refused, and wslink's hello must carry the same key instead of its public
  default secret (:func:`bind`).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

LAUNCHER_PATH = "/paraview/"  # where trame's page POSTs for its session URL (wslink launcher protocol)
WS_PATH = "/ws"
PAGE_PATHS = ("/", "/index.html")
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
SECURITY_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                    "Referrer-Policy": "same-origin", "X-Content-Type-Options": "nosniff"}
MAX_SOCKETS = 16  # open WebSockets at once (one annotator's tabs)
DEFAULT_UPLOAD_MB = 1024  # --max-upload-mb: the largest volume a page may upload (over the socket)
TOKEN_HELP = "LumbarSegment: open the link with its ?token=... (printed when the server started)"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def same_secret(given, expected: str) -> bool:
    """Constant-time comparison that never raises (a non-ASCII or non-string value is just wrong)."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def split_host(value: str) -> tuple[str, int | None]:
    """``'[::1]:8080'`` -> ``('::1', 8080)``; ``'example'`` -> ``('example', None)``; bad -> ``('', None)``."""
    value = (value or "").strip().lower()
    try:
        parsed = urlsplit(f"//{value}")
        return (parsed.hostname or "").rstrip("."), parsed.port
    except ValueError:
        return "", None


@dataclass
class Policy:
    """What this run accepts: bind address, token (or none) and the per-run WebSocket key."""

    host: str = "127.0.0.1"
    token: str | None = None
    key: str = field(default_factory=lambda: secrets.token_hex(32))  # lower-case: trame lowercases the URL
    proxy_origins: tuple[str, ...] = ()  # e.g. "https://annotate.example.org" of a TLS proxy in front

    def names(self) -> frozenset[str] | None:
        """Host names the server answers to; ``None``: any (a wildcard address, token required)."""
        if is_wildcard(self.host):
            return None
        if is_loopback(self.host):
            return LOOPBACK_NAMES
        return frozenset({self.host.lower().strip("[]")})

    def host_ok(self, host_header: str | None, port: int | None) -> bool:
        if host_header is None:
            return False
        if host_header.lower() in {urlsplit(o).netloc.lower() for o in self.proxy_origins}:
            return True
        name, given_port = split_host(host_header)
        if not name or (given_port or 80) != port:
            return False
        names = self.names()
        return names is None or name in names

    def origin_ok(self, origin: str | None, host_header: str | None) -> bool:
        """A browser's ``Origin`` must be this server's own (the one in ``Host``) or a configured proxy's."""
        if origin is None:
            return True  # not sent by browsers on plain navigations; non-browser clients need the key anyway
        if origin in self.proxy_origins:
            return True
        try:
            parsed = urlsplit(origin)
        except ValueError:
            return False
        return parsed.scheme in ("http", "https") and bool(host_header) and \
            parsed.netloc.lower() == host_header.lower()

    def launcher_reply(self) -> dict:
        """What the page needs to open the socket: its URL (``USE_HOST``: the page's own host) and the hello key."""
        return {"sessionURL": f"ws://USE_HOST{WS_PATH}?key={self.key}", "secret": self.key}


def _fetch_ok(request) -> bool:
    """``Sec-Fetch-*``: only this origin's own requests, the user's typing, or top-level navigation."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is None or site in ("same-origin", "none"):
        return True
    return request.headers.get("Sec-Fetch-Mode") == "navigate" and \
        request.headers.get("Sec-Fetch-Dest", "document") == "document"


def _local_port(request) -> int | None:
    sock = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return sock[1] if sock and len(sock) > 1 else None


async def _launcher_token(request) -> list:
    """The token as the page sends it to the launcher: its ``Referer``'s query, then the JSON body."""
    found = []
    referer = request.headers.get("Referer")
    if referer:
        try:
            found += parse_qs(urlsplit(referer).query).get("token", [])
        except ValueError:
            pass
    try:
        body = json.loads(await request.text()) if request.can_read_body else {}
    except (ValueError, UnicodeDecodeError):
        body = {}
    if isinstance(body, dict) and "token" in body:
        found.append(body["token"])
    return found


def _refuse(reason: str, text: str = "LumbarSegment: request refused"):
    from aiohttp import web

    log.warning("refused a request: %s", reason)
    return web.Response(status=403, text=text, headers=SECURITY_HEADERS)


def middleware(policy: Policy, connections: "Connections | None" = None):
    """aiohttp middleware enforcing :class:`Policy` on every request (see the module doc)."""
    from aiohttp import web

    @web.middleware
    async def guard(request, handler):
        host = request.headers.get("Host")
        if not policy.host_ok(host, _local_port(request)):
            return _refuse(f"Host {host!r} is not this server")
        if not policy.origin_ok(request.headers.get("Origin"), host):
            return _refuse(f"Origin {request.headers.get('Origin')!r} is not this server's page")
        if not _fetch_ok(request):
            return _refuse(f"Sec-Fetch-Site {request.headers.get('Sec-Fetch-Site')!r} for {request.path}")
        if request.path == LAUNCHER_PATH:
            if request.method != "POST":  # the page's script asks with POST; a navigation never gets the key
                return web.Response(status=405, text="POST only", headers=SECURITY_HEADERS)
            if policy.token and not any(same_secret(t, policy.token) for t in await _launcher_token(request)):
                return _refuse("launcher request without the token", TOKEN_HELP)
            return web.json_response(policy.launcher_reply(), headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})
        if request.path == WS_PATH:
            if not same_secret(request.query.get("key"), policy.key):
                return _refuse("WebSocket without this run's key")
            if connections is None:
                return await handler(request)
            if connections.open >= MAX_SOCKETS:
                log.warning("refused a WebSocket: %d are open already", connections.open)
                return web.Response(status=503, text="too many open connections", headers=SECURITY_HEADERS)
            with connections:
                return await handler(request)
        if policy.token and request.path in PAGE_PATHS and not same_secret(request.query.get("token"), policy.token):
            return _refuse("page request without the token", TOKEN_HELP)
        if request.path == "/":  # wslink's own redirect decodes the query: a token with '#' or '&' would break
            raw = request.rel_url.raw_query_string
            raise web.HTTPFound("index.html" + (f"?{raw}" if raw else ""), headers=SECURITY_HEADERS)
        response = await handler(request)
        if isinstance(response, web.StreamResponse) and not response.prepared:
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
        return response

    return guard


class Connections:
    """How many sockets are open, and since when none is (for ``--idle-exit``)."""

    def __init__(self, clock=None):
        import time

        self._clock = clock or time.monotonic
        self.open = 0
        self.idle_since: float | None = self._clock()

    def __enter__(self):
        self.open += 1
        self.idle_since = None
        return self

    def __exit__(self, *exc):
        self.open -= 1
        if self.open == 0:
            self.idle_since = self._clock()
        return False

    def idle_for(self) -> float:
        return 0.0 if self.idle_since is None else self._clock() - self.idle_since
