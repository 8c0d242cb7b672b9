"""``lumbarseg web``: options, access control, and the server start.

Access: by default the server listens on 127.0.0.1 only, reachable from this machine
(an SSH tunnel is the way in from elsewhere). Listening on another address exposes a
scene with patient images to the network, so it needs ``--allow-remote`` and a token:
the first page load must carry ``?token=...``; the server then sets an HttpOnly cookie
that the page's websocket sends back. Requests without either get 403. The token is
not a substitute for TLS: put a TLS proxy in front when the network is not trusted.
"""
from __future__ import annotations

import argparse
import hmac
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path

TOKEN_COOKIE = "lumbarseg_token"
TOKEN_ENV = "LUMBARSEG_WEB_TOKEN"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lumbarseg web`` (shared by the Lib's CLI and ``python -m LumbarSegmentWeb``)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--data", default=None, help="folder of volumes to annotate (read only)")
    p.add_argument("--work", default="lumbarseg-web", help="folder for uploads, drafts, exported cases and "
                   "training runs (default ./lumbarseg-web)")
    p.add_argument("--models", default=None, metavar="REGISTRY",
                   help="model registry folder to offer and publish retrained models into "
                        "(default: the user registry, then the shipped models)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=None, help="CPU threads for each segmentation")
    p.add_argument("--allow-remote", action="store_true",
                   help="required to listen on an address other than loopback")
    p.add_argument("--token", default=None, help=f"access token for a non-loopback host (default: ${TOKEN_ENV}, "
                   "else a random one printed at start)")


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_access(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token the server must require (``None`` on loopback); refuses an unflagged remote host."""
    if is_loopback(host):
        return None
    if not allow_remote:
        raise SystemExit(f"lumbarseg web: error: --host {host} would expose the annotation server to the network; "
                         f"add --allow-remote (a token is then required), or use the default 127.0.0.1 "
                         f"and an SSH tunnel")
    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    if len(token) < 16:
        raise SystemExit("lumbarseg web: error: the token must be at least 16 characters")
    return token


def token_middleware(token: str):
    """aiohttp middleware: ``?token=`` once (sets the cookie), then the cookie; else 403."""
    from aiohttp import web

    @web.middleware
    async def require_token(request, handler):
        given = request.query.get("token")
        if given is not None and hmac.compare_digest(given, token):
            response = await handler(request)
            if isinstance(response, web.StreamResponse) and not response.prepared:
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        cookie = request.cookies.get(TOKEN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie, token):
            return await handler(request)
        return web.Response(status=403, text="LumbarSegment: open the link with its ?token=... (printed at start)")

    return require_token


def build(args, server=None):
    """Session + page on a trame server (not started): what ``run`` and the tests use."""
    from trame.app import get_server

    from LumbarSegmentLib.registry.packages import Registry, shipped_registry_root

    from .app import LumbarSegmentPage
    from .session import AnnotationSession
    from .worklist import Worklist

    registries = None
    if args.models:
        registries = [Registry(args.models), Registry(shipped_registry_root(), read_only=True)]
    server = server or get_server("lumbarseg-web", client_type="vue3")
    session = AnnotationSession(Worklist(args.work, args.data), registries=registries, device=args.device,
                                threads=args.threads)
    if args.models:
        # Segmentation and fine-tuning get package folders (see AnnotationSession.model_choices), so the
        # child processes need no registry; publishing is pointed at this registry.
        session.logic.trainer.publish_command = _publish_into(args.models, session.logic.trainer.publish_command)
    page = LumbarSegmentPage(server, session)
    return server, session, page


def _publish_into(registry: str, publish_command):
    """The Lib's publish command, aimed at ``registry`` instead of the user registry."""
    def command(*a, **kw):
        return [*publish_command(*a, **kw), "--registry", str(Path(registry).resolve())]
    return command


def run(args) -> int:
    """Start the server and block until it stops."""
    from . import missing_dependency

    why = missing_dependency()
    if why:
        print(f"lumbarseg web: error: {why}", file=sys.stderr)
        return 1
    token = check_access(args.host, args.allow_remote, args.token)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("LumbarSegmentWeb").setLevel(logging.INFO)
    server, session, _page = build(args)
    if token:
        server.controller.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(
            token_middleware(token)))
    shown = "127.0.0.1" if is_loopback(args.host) else args.host
    url = f"http://{shown}:{args.port}/" + (f"?token={token}" if token else "")
    print(f"LumbarSegment web: open {url}", flush=True)
    try:
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False)
    finally:
        session.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lumbarseg web", description="Annotate lumbar MR in a browser.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
