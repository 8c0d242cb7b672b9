"""Access rules of ``lumbarseg web``: loopback by default, another host only with a flag and a token.

The token middleware is served on 127.0.0.1 (never another address in tests) and
queried over HTTP: no token -> 403, ``?token=`` -> page and cookie, cookie -> page.
"""
from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest

from LumbarSegmentWeb.serve import TOKEN_COOKIE, check_access, is_loopback


def test_loopback_needs_no_token_and_other_hosts_need_the_flag():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert check_access("127.0.0.1", False, None) is None
    with pytest.raises(SystemExit, match="--allow-remote"):
        check_access("0.0.0.0", False, None)
    token = check_access("0.0.0.0", True, None)
    assert token and len(token) >= 16
    assert check_access("0.0.0.0", True, "a-long-enough-token-123") == "a-long-enough-token-123"
    with pytest.raises(SystemExit, match="16 characters"):
        check_access("0.0.0.0", True, "short")


def test_token_middleware_over_http():
    aiohttp = pytest.importorskip("aiohttp", reason="aiohttp comes with the [web] extra")
    from aiohttp import web

    from LumbarSegmentWeb.serve import token_middleware

    token = "tok-" + "x" * 20

    async def main():
        app = web.Application(middlewares=[token_middleware(token)])
        async def page(request):
            return web.Response(text="page")

        app.router.add_get("/", page)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]

        def get(path, cookie=None):
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                         headers={"Cookie": cookie} if cookie else {})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    return r.status, r.read().decode(), r.headers.get("Set-Cookie", "")
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode(), ""

        loop = asyncio.get_running_loop()
        try:
            results = [await loop.run_in_executor(None, get, *a) for a in (
                ("/",), ("/?token=wrong",), (f"/?token={token}",), ("/", f"{TOKEN_COOKIE}={token}"),
                ("/", f"{TOKEN_COOKIE}=wrong"))]
        finally:
            await runner.cleanup()
        return results

    (no, wrong, ok, cookie_ok, cookie_bad) = asyncio.run(main())
    assert no[0] == 403 and wrong[0] == 403 and cookie_bad[0] == 403
    assert ok[:2] == (200, "page") and f"{TOKEN_COOKIE}={token}" in ok[2] and "HttpOnly" in ok[2]
    assert cookie_ok[:2] == (200, "page")
