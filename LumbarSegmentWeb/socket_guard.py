"""The WebSocket side of the policy: per-run hello key, bounded messages, no exit on a client's word.

wslink (under trame) has three defaults that do not suit a server on an annotator's
machine, changed here when trame binds its web server (:func:`bind`):

* its hello accepts the public secret ``wslink-secret``: replaced by the run's random key
  (:class:`~.guard.Policy`), compared in constant time;
* once a client said hello, a message may declare up to 4 GiB, allocated before a byte
  of it arrives: replaced by :class:`BoundedUnChunker` (memory grows only with the bytes
  received, a message may not exceed the upload limit, and only a ``trame.trigger`` call,
  which is how a file upload arrives, may exceed :data:`STATE_LIMIT`);
* it exits 300 s after the last browser left, and any client may call
  ``application.exit``: both switched off. The server stops on Ctrl-C, or by itself only
  with ``--idle-exit`` and then never while a job runs (:class:`IdleExit`).
"""
from __future__ import annotations

import asyncio
import logging

import msgpack

from .guard import DEFAULT_UPLOAD_MB, Connections, Policy, same_secret  # noqa: F401

log = logging.getLogger(__name__)

MiB = 1 << 20
STATE_LIMIT = 8 * MiB  # any message but an upload (state changes, clicks, view events)
PRE_HELLO_LIMIT = 512  # wslink's own limit before the hello
MAX_PENDING = 4  # messages being received at once on one socket
CHUNK_HEADER = 12  # wslink's chunk header: id, offset, total size (uint32 each)
TOO_BIG = 1009  # WebSocket close code "message too big"


class MessageRefused(ValueError):
    """A WebSocket message over the limits; the socket is closed."""


class BoundedUnChunker:
    """wslink's chunk reassembly with limits (drop-in for ``wslink.chunking.UnChunker``)."""

    def __init__(self, upload_limit: int, state_limit: int = STATE_LIMIT):
        self.upload_limit, self.state_limit = int(upload_limit), int(state_limit)
        self.max_message_size = PRE_HELLO_LIMIT
        self.pending: dict[int, tuple[int, bytearray]] = {}

    def set_max_message_size(self, size: int) -> None:
        """Called by wslink after a good hello (with 4 GiB): never above the upload limit."""
        self.max_message_size = min(int(size), self.upload_limit)

    def release_pending_messages(self) -> None:
        self.pending = {}

    def process_chunk(self, chunk: bytes):
        if len(chunk) < CHUNK_HEADER:
            raise MessageRefused("a WebSocket chunk shorter than its header")
        msg_id, offset, total = (int.from_bytes(chunk[i:i + 4], "little") for i in (0, 4, 8))
        content = memoryview(chunk)[CHUNK_HEADER:]
        entry = self.pending.get(msg_id)
        if entry is None:
            if total > self.max_message_size:
                raise MessageRefused(f"a message of {total} bytes is over the limit of {self.max_message_size}")
            if len(self.pending) >= MAX_PENDING:
                raise MessageRefused(f"more than {MAX_PENDING} messages in flight on one socket")
            entry = (total, bytearray())
            self.pending[msg_id] = entry
        size, buf = entry
        if size != total or offset != len(buf) or len(buf) + len(content) > size:
            del self.pending[msg_id]
            raise MessageRefused("a chunk that does not continue its message")
        buf += content
        if len(buf) < size:
            return None
        del self.pending[msg_id]
        message = msgpack.unpackb(buf)
        if size > self.state_limit and not (isinstance(message, dict) and message.get("method") == "trame.trigger"):
            raise MessageRefused(f"a message of {size} bytes is over the limit of {self.state_limit} "
                                 f"(only a file upload may be larger)")
        return message


def _ws_handlers(wslink_server) -> list:
    handlers = getattr(wslink_server, "_ws_handlers", None)
    if not handlers or not all(hasattr(h, "unchunkers") and hasattr(h, "onConnect") for h in handlers):
        raise RuntimeError("this wslink version is not supported (its WebSocket handlers could not be bounded); "
                           "install the wslink version LumbarSegment lists")
    return handlers


def _bound_handler(handler, upload_limit: int) -> None:
    connect, on_message = handler.onConnect, handler.onMessage

    async def bounded_connect(request, client_id):
        await connect(request, client_id)
        handler.unchunkers[client_id] = BoundedUnChunker(upload_limit)

    async def bounded_message(is_binary, msg, client_id):
        try:
            await on_message(is_binary, msg, client_id)
        except (MessageRefused, msgpack.UnpackException, ValueError) as exc:
            log.warning("closed a WebSocket: %s", exc)
            ws = handler.connections.get(client_id)
            if ws is not None:
                await ws.close(code=TOO_BIG, message=str(exc)[:120].encode())

    handler.onConnect, handler.onMessage = bounded_connect, bounded_message


def bind(server, wslink_server, policy: Policy, connections: Connections, upload_limit: int) -> None:
    """Apply the policy to the web server trame just created (``on_server_bind``), before it listens."""
    from .guard import middleware

    handlers = _ws_handlers(wslink_server)
    wslink_server.app.middlewares.append(middleware(policy, connections))
    wslink_server.config["timeout"] = 0  # wslink's idle exit (it would close the session and stop a retrain)
    protocol = server.protocol
    protocol.updateSecret(policy.key)

    async def validate(token, client_id):
        return same_secret(token, policy.key)

    protocol.validateToken = validate
    protocol.stopServer = lambda *a: log.warning("ignored a client's request to stop the server")
    for handler in handlers:
        _bound_handler(handler, upload_limit)


class IdleExit:
    """``--idle-exit SECONDS``: stop after that long without a browser, never while a job runs."""

    def __init__(self, seconds: float, connections: Connections, busy, stop, interval: float = 1.0):
        self.seconds, self.connections, self.busy, self.stop = float(seconds), connections, busy, stop
        self.interval = min(interval, max(self.seconds / 4, 0.05))

    def due(self) -> bool:
        return self.connections.open == 0 and self.connections.idle_for() >= self.seconds and not self.busy()

    async def watch(self) -> None:
        while not self.due():
            await asyncio.sleep(self.interval)
        log.warning("no browser connected for %.0f s and no job running: stopping (--idle-exit)", self.seconds)
        result = self.stop()
        if asyncio.iscoroutine(result):
            await result
