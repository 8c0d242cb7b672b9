"""Access rules of ``lumbarseg web``: loopback by default, another host only with a flag and a token.

The guard middleware is served on 127.0.0.1 (never another address in tests) and
queried over HTTP: no token -> 403, ``?token=`` -> page (and no cookie: cookies are not
scoped by port, so a token cookie would reach every other server on the host).
"""
from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest

from LumbarSegmentWeb.serve import check_access, is_loopback


def test_loopback_needs_no_token_and_other_hosts_need_the_flag(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    monkeypatch.delenv("LUMBARSEG_WEB_TOKEN", raising=False)
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

    from LumbarSegmentWeb.guard import Policy, middleware

    token = "tok-" + "x" * 20

    async def main():
        app = web.Application(middlewares=[middleware(Policy(host="127.0.0.1", token=token))])
        async def page(request):
            return web.Response(text="page")

        app.router.add_get("/index.html", page)
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
                ("/index.html",), ("/index.html?token=wrong",), (f"/index.html?token={token}",),
                ("/index.html", f"lumbarseg_token={token}"), ("/index.html", "lumbarseg_token=wrong"))]
        finally:
            await runner.cleanup()
        return results

    (no, wrong, ok, cookie, cookie_bad) = asyncio.run(main())
    assert no[0] == 403 and wrong[0] == 403 and cookie_bad[0] == 403
    assert ok[:2] == (200, "page") and ok[2] == ""  # the page, and no cookie
    assert cookie[0] == 403  # a cookie is no way in
