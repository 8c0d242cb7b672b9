"""``lumbarseg web``: options, access control, and the server start.

Access (docs/threat_model.md): by default the server listens on 127.0.0.1 only, reachable
from this machine (an SSH tunnel is the way in from elsewhere). Listening on another
address exposes a scene with patient images to the network, so it needs
``--allow-remote`` and a token; ``--token`` on a loopback server asks for one too (a
machine shared with other users). The page must be opened with ``?token=...``; no cookie
is set (cookies are not scoped by port). Every request and the WebSocket are checked by
:mod:`.guard` (Host, Origin, token, per-run key) and :mod:`.socket_guard` (hello key,
message sizes, no exit on a client's word). The token is not a substitute for TLS: put a
TLS proxy in front when the network is not trusted.
"""
from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

from LumbarSegmentLib.core.checks import number_arg

from .guard import is_loopback, is_wildcard  # noqa: F401  (is_loopback: part of this module's API)

TOKEN_ENV = "LUMBARSEG_WEB_TOKEN"
log = logging.getLogger(__name__)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


# the command lines' one bounded-number parser (a usage message naming the value and the range)
_megabytes = number_arg(1, 65536, kind=int, what="a whole number of megabytes", use="give 1 to 65536 megabytes")
_port = number_arg(1, 65535, kind=int, what="a port number", use="a port is 1 to 65535")


def _origin(text: str) -> str:
    from urllib.parse import urlsplit

    try:
        parsed = urlsplit(text.rstrip("/"))
        ok = parsed.scheme in ("http", "https") and parsed.hostname and not parsed.path and parsed.port != 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: give an origin such as https://annotate.example.org[:PORT]")
    return text.rstrip("/")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lumbarseg web`` (shared by the Lib's CLI and ``python -m LumbarSegmentWeb``)."""
    from .guard import DEFAULT_UPLOAD_MB

    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    p.add_argument("--data", default=None, help="folder of volumes to annotate (read only)")
    p.add_argument("--work", default="lumbarseg-web", help="folder for uploads, drafts, exported cases and "
                   "training runs (default ./lumbarseg-web)")
    p.add_argument("--models", default=None, metavar="REGISTRY",
                   help="model registry folder to offer and publish retrained models into "
                        "(default: the user registry, then the shipped models)")
    from LumbarSegmentLib.inference.options import SegmentOptions

    SegmentOptions.add_arguments(p, only=("device", "threads"))  # for every draft: `lumbarseg segment`'s own flags
    p.add_argument("--allow-remote", action="store_true",
                   help="required to listen on an address other than loopback")
    p.add_argument("--token", default=None, help=f"access token the page link must carry: required for a "
                   f"non-loopback host (default: ${TOKEN_ENV}, else a random one printed at start); on "
                   f"127.0.0.1 it is optional and keeps other users of a shared machine out")
    p.add_argument("--idle-exit", type=_seconds, default=None, metavar="SECONDS",
                   help="stop the server after SECONDS without a connected browser, but never while a "
                        "segmentation or retraining runs (default: run until Ctrl-C)")
    p.add_argument("--max-upload-mb", type=_megabytes, default=DEFAULT_UPLOAD_MB, metavar="MB",
                   help=f"largest volume the page may upload, in MiB (default {DEFAULT_UPLOAD_MB})")
    p.add_argument("--origin", action="append", default=[], metavar="URL", type=_origin,
                   help="origin of a TLS proxy in front of this server (https://name[:port]), "
                        "allowed besides the server's own; repeatable")


def check_access(host: str, allow_remote: bool, token: str | None) -> str | None:
    """The token the server must require (``None``: none); refuses an unflagged remote host."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if is_loopback(host) and not token:
        return None
    if not is_loopback(host) and not allow_remote:
        raise SystemExit(f"lumbarseg web: error: --host {host} would expose the annotation server to the network; "
                         f"add --allow-remote (a token is then required), or use the default 127.0.0.1 "
                         f"and an SSH tunnel")
    token = token or secrets.token_urlsafe(24)
    if len(token) < 16:
        raise SystemExit("lumbarseg web: error: the token must be at least 16 characters")
    return token


def link_url(host: str, port: int, token: str | None) -> str:
    """The link to print: 127.0.0.1 for loopback and wildcard addresses, the token percent-encoded."""
    shown = "127.0.0.1" if host == "localhost" or is_wildcard(host) else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/" + (f"?token={quote(token, safe='')}" if token else "")


def check_folders(args) -> str | None:
    """Why the folders given cannot be used (one line), or ``None``: checked before anything starts."""
    if args.data is not None and not Path(args.data).is_dir():
        return f"--data {args.data}: no such folder; give the folder that holds the volumes to annotate"
    if args.models is not None:
        from LumbarSegmentLib.registry.package import PackageError
        from LumbarSegmentLib.registry.registry import Registry

        if not Path(args.models).is_dir():
            return (f"--models {args.models}: no such folder; give an existing model registry folder "
                    f"(mkdir it to start an empty one)")
        try:
            Registry(args.models).packages()
        except (PackageError, OSError, ValueError) as exc:
            return f"--models {args.models}: {exc}"
    work = Path(args.work)
    try:
        for sub in ("", "uploads", "drafts", "cases", "training"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=work):
            pass
    except OSError as exc:
        return (f"--work {args.work}: cannot write there ({exc.strerror or exc}); give a folder you can "
                f"write to (uploads, drafts and exported cases go there)")
    return None


def build(args, server=None):
    """Session + page on a trame server (not started): what ``run`` and the tests use."""
    from trame.app import get_server

    from LumbarSegmentLib.registry.package import shipped_registry_root
    from LumbarSegmentLib.registry.registry import Registry

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
        session.logic.trainer.publish_registry = Path(args.models).resolve()
    page = LumbarSegmentPage(server, session)
    return server, session, page


def _add_idle_exit(server, idle) -> None:
    """Start ``idle.watch()`` once the server listens (once, even if a client replays "server_ready")."""
    import asyncio

    watching = []

    def start_idle_watch(**_):
        if not watching:
            watching.append(asyncio.ensure_future(idle.watch()))

    server.controller.on_server_ready.add(start_idle_watch)


def run(args) -> int:
    """Start the server and block until it stops (Ctrl-C, or ``--idle-exit``)."""
    from . import missing_dependency
    from .guard import Connections, Policy
    from .socket_guard import IdleExit, bind

    why = missing_dependency()
    if why:
        print(f"lumbarseg web: error: {why}", file=sys.stderr)
        return 1
    token = check_access(args.host, args.allow_remote, args.token)
    why = check_folders(args)
    if why:
        print(f"lumbarseg web: error: {why}", file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("LumbarSegmentWeb").setLevel(logging.INFO)
    server, session, _page = build(args)
    policy = Policy(host=args.host, token=token, proxy_origins=tuple(args.origin))
    connections = Connections()
    bound = {}

    def on_bind(wslink_server):
        bind(server, wslink_server, policy, connections, args.max_upload_mb << 20)
        bound["web"] = wslink_server

    server.controller.on_server_bind.add(on_bind)
    if args.idle_exit:
        _add_idle_exit(server, IdleExit(args.idle_exit, connections, lambda: session.segmenting or session.retraining,
                                        lambda: bound["web"].stop()))
    listening = []

    def announce(**_):  # once listening: a link printed before a failed bind would point at someone else
        if not listening:
            listening.append(True)
            print(f"LumbarSegment web: open {link_url(args.host, args.port, token)}", flush=True)

    server.controller.on_server_ready.add(announce)
    try:
        server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False, timeout=0)
    except OSError as exc:
        if listening:
            raise
        reason = os.strerror(exc.errno) if isinstance(exc.errno, int) and exc.errno > 0 else str(exc)
        print(f"lumbarseg web: error: cannot listen on {args.host}:{args.port} ({reason}); another program may "
              f"use that port: pick another with --port (or check --host)", file=sys.stderr)
        return 1
    finally:
        if session.retraining:
            print("LumbarSegment web: stopping the retraining that is still running", file=sys.stderr)
        session.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lumbarseg web", description="Annotate lumbar MR in a browser.")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
