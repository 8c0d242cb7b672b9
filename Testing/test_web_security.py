"""``lumbarseg web`` against hostile pages, co-users and careless input (docs/threat_model.md).

The server runs on 127.0.0.1 as a child process (the real start path: trame, wslink,
aiohttp) and is attacked over HTTP and its WebSocket the way a page of another origin,
a DNS-rebinding page or a script on the same machine would. Upload, draft and start-up
rules are checked on the session and the command line directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from conftest import stop_server, wait_for_server

from LumbarSegmentWeb import missing_dependency

why = missing_dependency()
if why:
    pytest.skip(f"browser front end not installed: {why}", allow_module_level=True)

import aiohttp  # noqa: E402

from LumbarSegmentWeb import serve  # noqa: E402
from LumbarSegmentWeb.worklist import Worklist, case_id_for  # noqa: E402

TOKEN = "tok#&+/=-0123456789abcdef"  # characters a URL must encode
UPLOAD_MB = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(base: Path, *extra: str, name: str = "server"):
    port = _free_port()
    env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", LUMBARSEG_HOME=str(base / "home"))
    env.pop(serve.TOKEN_ENV, None)
    log = open(base / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "LumbarSegmentLib.cli.main", "web", "--port", str(port),
                             "--data", str(base / "data"), "--work", str(base / name), "--device", "cpu", *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
    return proc, port, log


def _wait_up(proc, port, log_path: Path, path: str = "/lumbarseg/favicon.png") -> None:
    wait_for_server(proc, f"http://127.0.0.1:{port}{path}", log_path, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``lumbarseg web --token`` on 127.0.0.1 with a small upload limit."""
    base = tmp_path_factory.mktemp("websec")
    (base / "data").mkdir()
    proc, port, log = _start(base, "--token", TOKEN, "--max-upload-mb", str(UPLOAD_MB))
    _wait_up(proc, port, base / "server.log")
    yield {"port": port, "proc": proc, "log": base / "server.log", "own": f"127.0.0.1:{port}"}
    stop_server(proc, log)


def _run(coro):
    return asyncio.run(coro)


async def _get(port, path, headers=None, method="GET", data=None):
    async with aiohttp.ClientSession() as http:
        async with http.request(method, f"http://127.0.0.1:{port}{path}", headers=headers or {}, data=data,
                                allow_redirects=False) as r:
            return r.status, (await r.read()).decode("utf-8", "replace"), r.headers


def _page(token=TOKEN) -> str:
    from urllib.parse import quote

    return f"/index.html?token={quote(token, safe='')}"


async def _launch(port, own, origin=True, token=TOKEN):
    headers = {"Referer": f"http://{own}{_page(token)}", "Content-Type": "application/json"}
    if origin:
        headers["Origin"] = f"http://{own}"
    return await _get(port, "/paraview/", headers, "POST", json.dumps({"application": "trame"}))


def _pack(message: dict, msg_id: int = 7) -> bytes:
    body = msgpack.packb(message)
    return msg_id.to_bytes(4, "little") + (0).to_bytes(4, "little") + len(body).to_bytes(4, "little") + body


async def _recv(ws, timeout=20):
    msg = await ws.receive(timeout=timeout)
    if msg.type != aiohttp.WSMsgType.BINARY:
        return msg
    return msgpack.unpackb(msg.data[12:])


async def _hello(ws, secret):
    await ws.send_bytes(_pack({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                               "args": [{"secret": secret}], "kwargs": {}}))
    return await _recv(ws)


# ---------------------------------------------------------------- HTTP: Host, Origin, token, cookie
def test_page_requests_from_other_hosts_origins_or_without_token_are_refused(server):
    port, own = server["port"], server["own"]

    async def main():
        return {
            "ok": await _get(port, _page()),
            "rebinding": await _get(port, _page(), {"Host": f"evil.example:{port}"}),
            "other_port": await _get(port, _page(), {"Host": f"127.0.0.1:{port + 1}"}),
            "origin": await _get(port, _page(), {"Origin": "http://evil.example"}),
            "other_local_origin": await _get(port, _page(), {"Origin": f"http://127.0.0.1:{port + 1}"}),
            "cross_site_script": await _get(port, "/lumbarseg/favicon.png",
                                            {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors",
                                             "Sec-Fetch-Dest": "image"}),
            "no_token": await _get(port, "/index.html"),
            "wrong_token": await _get(port, _page("x" * 30)),
            "non_ascii_token": await _get(port, "/index.html?token=%C3%A9%E2%82%AC"),
            "non_ascii_cookie": await _get(port, "/index.html", {"Cookie": "lumbarseg_token=\u00e9t\u00e9"}),
            "root": await _get(port, f"/?token={_page().split('=', 1)[1]}"),
        }

    r = _run(main())
    assert r["ok"][0] == 200
    assert "Set-Cookie" not in r["ok"][2]  # no cookie: it would reach every other port of this host
    assert r["ok"][2]["X-Frame-Options"] == "DENY"
    for case in ("rebinding", "other_port", "origin", "other_local_origin", "cross_site_script", "no_token",
                 "wrong_token", "non_ascii_token", "non_ascii_cookie"):
        assert r[case][0] == 403, (case, r[case][:2])
    assert "?token=" in r["no_token"][1]  # says what to do
    # "/" forwards the raw query: a token with '#' or '&' reaches the page intact
    from urllib.parse import parse_qs, urlsplit

    location = r["root"][2]["Location"]
    assert r["root"][0] == 302 and parse_qs(urlsplit(location).query) == {"token": [TOKEN]}, location
    assert "Traceback" not in server["log"].read_text() and "TypeError" not in server["log"].read_text()


# ---------------------------------------------------------------- WebSocket: origin, key, hello secret
def test_websocket_needs_this_origin_this_host_the_run_key_and_its_hello_secret(server):
    port, own = server["port"], server["own"]
    url = f"http://127.0.0.1:{port}/ws"

    async def refused(**kw):
        async with aiohttp.ClientSession() as http:
            try:
                async with http.ws_connect(kw.pop("url", url), **kw):
                    return False
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status == 403

    async def main():
        out = {"launch_other_origin": (await _get(port, "/paraview/", {"Origin": "http://evil.example"},
                                                  "POST", "{}"))[0],
               "launch_get": (await _get(port, "/paraview/", {"Referer": f"http://{own}{_page()}"}))[0],
               "launch_no_token": (await _launch(port, own, token="wrong-token-0123456789"))[0]}
        status, body, _ = await _launch(port, own)
        out["launch"] = status
        key = json.loads(body)["secret"]
        assert json.loads(body)["sessionURL"].endswith(f"/ws?key={key}")
        keyed = f"{url}?key={key}"
        out["no_key"] = await refused(origin=f"http://{own}")
        out["evil_origin"] = await refused(url=keyed, origin="http://evil.example")
        out["other_local_port"] = await refused(url=keyed, origin=f"http://127.0.0.1:{port + 1}")
        out["rebinding"] = await refused(url=keyed, origin=f"http://evil.example:{port}",
                                         headers={"Host": f"evil.example:{port}"})
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(keyed, origin=f"http://{own}") as ws:
                out["public_secret"] = await _hello(ws, "wslink-secret")
                out["run_secret"] = await _hello(ws, key)
        return out, key

    out, key = _run(main())
    assert out["launch_other_origin"] == 403 and out["launch_no_token"] == 403 and out["launch"] == 200
    assert out["launch_get"] == 405  # a navigation (or a frame) never gets the key
    assert len(key) >= 32 and key != "wslink-secret"
    for case in ("no_key", "evil_origin", "other_local_port", "rebinding"):
        assert out[case] is True, case
    assert "error" in out["public_secret"], out["public_secret"]  # wslink's public default no longer works
    assert "clientID" in out["run_secret"]["result"]


async def _authenticated(port, own):
    _, body, _ = await _launch(port, own)
    key = json.loads(body)["secret"]
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(f"http://127.0.0.1:{port}/ws?key={key}", origin=f"http://{own}")
    assert "result" in await _hello(ws, key)
    return http, ws


def test_websocket_messages_are_bounded_and_a_client_cannot_stop_the_server(server):
    port, own = server["port"], server["own"]

    async def main():
        http, ws = await _authenticated(port, own)
        try:
            # one 12-byte header declaring a 64 MiB message (over --max-upload-mb 16): refused at once
            header = (9).to_bytes(4, "little") + (0).to_bytes(4, "little") + (64 << 20).to_bytes(4, "little")
            await ws.send_bytes(header)
            closed = await ws.receive(timeout=20)
        finally:
            await ws.close()
            await http.close()
        http, ws = await _authenticated(port, own)
        try:  # wslink's own RPCs to stop the server: ignored
            for n, method in enumerate(("application.exit", "application.exit.later")):
                await ws.send_bytes(_pack({"wslink": "1.0", "id": f"rpc:c0:{n}", "method": method,
                                           "args": [0] if method.endswith("later") else [], "kwargs": {}}, 20 + n))
                await _recv(ws)
        finally:
            await ws.close()
            await http.close()
        await asyncio.sleep(3)
        return closed, (await _get(port, _page()))[0]

    closed, after = _run(main())
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
    assert closed.data == 1009, closed
    assert after == 200 and server["proc"].poll() is None  # still serving


def test_unchunker_limits_state_messages_uploads_and_memory():
    from LumbarSegmentWeb.socket_guard import BoundedUnChunker, MessageRefused

    u = BoundedUnChunker(upload_limit=32 << 20, state_limit=1 << 20)
    with pytest.raises(MessageRefused):  # before the hello: wslink's 512 bytes
        u.process_chunk(_pack({"method": "x", "args": ["a" * 600]}))
    u.set_max_message_size(4 << 30)  # what wslink asks for after a good hello
    assert u.max_message_size == 32 << 20
    header = (1).to_bytes(4, "little") + (0).to_bytes(4, "little") + (33 << 20).to_bytes(4, "little")
    with pytest.raises(MessageRefused):
        u.process_chunk(header)
    u.process_chunk((2).to_bytes(4, "little") + (0).to_bytes(4, "little") + (30 << 20).to_bytes(4, "little") + b"x")
    assert len(u.pending[2][1]) == 1  # memory follows the bytes received, not the size declared

    def chunked(message, msg_id, size=1 << 20):
        body = msgpack.packb(message)
        for off in range(0, len(body), size):
            yield msg_id.to_bytes(4, "little") + off.to_bytes(4, "little") + len(body).to_bytes(4, "little") \
                + body[off:off + size]

    u.release_pending_messages()
    big = b"\0" * (3 << 20)
    with pytest.raises(MessageRefused, match="only a file upload"):
        for c in chunked({"method": "trame.state.update", "args": [[{"key": "k", "value": big}]]}, 3):
            u.process_chunk(c)
    results = [u.process_chunk(c) for c in chunked({"method": "trame.trigger", "args": ["upload", [big], {}]}, 4)]
    assert results[-1]["args"][1][0] == big


def test_open_sockets_are_capped_and_counted():
    from aiohttp import web

    from LumbarSegmentWeb.guard import MAX_SOCKETS, Connections, Policy, middleware

    async def main():
        policy, conns = Policy(), Connections()
        app = web.Application(middlewares=[middleware(policy, conns)])

        async def ws_handler(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for _ in ws:
                pass
            return ws

        app.router.add_get("/ws", ws_handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/ws?key={policy.key}"
        try:
            async with aiohttp.ClientSession() as http:
                socks = [await http.ws_connect(url) for _ in range(MAX_SOCKETS)]
                counted = conns.open
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url)
                await socks[0].close()
                await asyncio.sleep(0.3)
                extra = await http.ws_connect(url)  # room again once one closed
                for ws in (*socks[1:], extra):
                    await ws.close()
                await asyncio.sleep(0.3)
                return counted, refused.value.status, conns.open, conns.idle_since is not None
        finally:
            await runner.cleanup()

    counted, status, left, idle = _run(main())
    assert counted == 16 and status == 503 and left == 0 and idle


# ---------------------------------------------------------------- lifetime: no idle exit, no killed retrain
def test_idle_exit_waits_for_jobs_and_is_off_by_default(monkeypatch, tmp_path):
    from LumbarSegmentWeb.guard import Connections
    from LumbarSegmentWeb.socket_guard import IdleExit

    now = [0.0]
    conns = Connections(clock=lambda: now[0])
    busy = [True]
    idle = IdleExit(10, conns, lambda: busy[0], lambda: None)
    now[0] = 100.0
    assert not idle.due()  # a retraining runs: never stop
    busy[0] = False
    assert idle.due()
    with conns:
        assert not idle.due()
        now[0] = 200.0
    assert not idle.due() and conns.idle_for() == 0.0
    now[0] = 211.0
    assert idle.due()

    # Without --idle-exit the server is started with wslink's idle timeout off.
    started = {}

    class Stop(Exception):
        pass

    def fake_start(self, **kw):
        started.update(kw)
        raise Stop

    from trame_server.core import Server

    monkeypatch.setattr(Server, "start", fake_start)
    from trame.app import get_server

    fake = _FakeSession()
    monkeypatch.setattr(serve, "build", lambda args: (get_server("websec-idle", client_type="vue3"), fake, None))
    args = _parse(["--work", str(tmp_path / "w")])
    with pytest.raises(Stop):
        serve.run(args)
    assert started.get("timeout") == 0 and fake.closed


class _FakeSession:
    segmenting = retraining = False
    closed = False

    def close(self):
        self.closed = True


def test_server_with_idle_exit_stops_by_itself_when_no_browser_comes(tmp_path):
    (tmp_path / "data").mkdir()
    proc, port, log = _start(tmp_path, "--idle-exit", "1", name="idle")
    try:
        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "idle.log").read_text()
    assert rc == 0 and "--idle-exit" in text, text[-2000:]


# ---------------------------------------------------------------- start-up checks and the printed link
def _parse(argv):
    import argparse

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(argv)


def _start_refused(monkeypatch, capsys, argv) -> str:
    monkeypatch.setattr(serve, "build", lambda args: pytest.fail("the server went on to start"))
    assert serve.run(_parse(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_unusable_folders_and_broken_registry_refuse_to_start(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    work = str(tmp_path / "w")
    err = _start_refused(monkeypatch, capsys, ["--data", str(tmp_path / "nonexistent"), "--work", work])
    assert "--data" in err and "no such folder" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    err = _start_refused(monkeypatch, capsys, ["--work", str(blocker / "work")])
    assert "--work" in err and "cannot write" in err
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "index.json").write_text("{ not json")
    err = _start_refused(monkeypatch, capsys, ["--work", work, "--models", str(registry)])
    assert "--models" in err and "registry index is unreadable" in err
    err = _start_refused(monkeypatch, capsys, ["--work", work, "--models", str(tmp_path / "typo")])
    assert "no such folder" in err


def test_read_only_work_folder_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import errno
    import tempfile

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    err = _start_refused(monkeypatch, capsys, ["--work", str(tmp_path)])
    assert "Read-only file system" in err and "--work" in err


def test_bad_port_or_origin_is_a_usage_error_and_a_busy_port_one_clear_line(tmp_path):
    for argv in (["--port", "0"], ["--port", "70000"], ["--port", "x"], ["--origin", "annotate.example.org"],
                 ["--origin", "https://a.example/path"], ["--idle-exit", "0"], ["--idle-exit", "nan"],
                 ["--max-upload-mb", "0"]):
        with pytest.raises(SystemExit) as exc:
            _parse(argv)
        assert exc.value.code == 2, argv
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", LUMBARSEG_HOME=str(tmp_path / "home"))
        r = subprocess.run([sys.executable, "-m", "LumbarSegmentLib.cli.main", "web", "--port", str(busy.getsockname()[1]),
                            "--work", str(tmp_path / "work"), "--device", "cpu"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=240)
    errors = [line for line in r.stderr.splitlines() if line.startswith("lumbarseg web: error:")]
    assert r.returncode == 1 and len(errors) == 1 and "Address already in use" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "open http" not in r.stdout  # no link to someone else's server


def test_printed_link_encodes_the_token_and_names_a_reachable_host(monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    assert serve.link_url("0.0.0.0", 8080, "a#b&c d/\u00e9") == "http://127.0.0.1:8080/?token=a%23b%26c%20d%2F%C3%A9"
    assert serve.link_url("127.0.0.1", 8080, None) == "http://127.0.0.1:8080/"
    assert serve.link_url("localhost", 8080, None) == "http://127.0.0.1:8080/"
    assert serve.link_url("::1", 8080, None) == "http://[::1]:8080/"
    assert serve.link_url("10.1.2.3", 9000, "t" * 16) == "http://10.1.2.3:9000/?token=" + "t" * 16
    assert serve.check_access("127.0.0.1", False, None) is None
    assert serve.check_access("127.0.0.1", False, "a-token-for-a-shared-machine") == "a-token-for-a-shared-machine"


def test_policy_names_per_address():
    from LumbarSegmentWeb.guard import Policy

    loop = Policy(host="127.0.0.1")
    assert loop.host_ok("127.0.0.1:8080", 8080) and loop.host_ok("localhost:8080", 8080)
    assert loop.host_ok("[::1]:8080", 8080)
    assert not loop.host_ok("evil.example:8080", 8080) and not loop.host_ok("127.0.0.1:8081", 8080)
    assert not loop.host_ok(None, 8080) and not loop.host_ok("127.0.0.1:notaport", 8080)
    assert not loop.origin_ok("null", "127.0.0.1:8080") and loop.origin_ok("http://127.0.0.1:8080", "127.0.0.1:8080")
    proxied = Policy(host="127.0.0.1", proxy_origins=("https://annotate.example.org",))
    assert proxied.host_ok("annotate.example.org", 8080)
    assert proxied.origin_ok("https://annotate.example.org", "annotate.example.org")
    assert Policy(host="0.0.0.0", token="t" * 16).host_ok("workstation.lab:8080", 8080)


# ---------------------------------------------------------------- uploads never collide
def _volume_bytes(tmp_path, seed, name="v.mha") -> bytes:
    from LumbarSegmentLib.formats.io import write_volume
    from LumbarSegmentLib.core.volume import Volume

    arr = (np.random.default_rng(seed).random((6, 8, 5)) * 100).astype(np.int16)
    path = tmp_path / f"{seed}-{name}"
    write_volume(Volume(arr, spacing=(3.0, 1.0, 1.0)), path)
    return path.read_bytes()


def test_uploads_never_replace_or_shadow_another_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "caseA_image.mha").write_bytes(_volume_bytes(tmp_path, 0))
    wl = Worklist(tmp_path / "work", data)
    a, b, c, d, e = (_volume_bytes(tmp_path, s) for s in (1, 2, 3, 4, 5))
    first = wl.save_upload("patient smith.mha", a)
    second = wl.save_upload("patient_smith.mha", b)
    assert first != second and first.read_bytes() == a and second.read_bytes() == b
    p1, p2 = wl.save_upload("x" * 64 + "_one.mha", c), wl.save_upload("x" * 64 + "_two.mha", d)
    assert p1 != p2 and p1.read_bytes() == c and p2.read_bytes() == d
    shadow = wl.save_upload("caseA_image.mha", e)
    assert case_id_for(shadow) != "caseA"
    assert wl.volumes()["caseA"] == data / "caseA_image.mha"  # the data folder's case is untouched
    assert wl.save_upload("again.mha", b) == second  # the same bytes again: the earlier upload
    ids = [case_id_for(p) for p in (first, second, p1, p2, shadow)]
    assert len(set(ids)) == len(ids) and all(len(i) <= 64 for i in ids)
    wl.drafts.joinpath("ghost.seg.nrrd").write_bytes(b"x")  # a draft whose volume is gone keeps its id
    assert case_id_for(wl.save_upload("ghost.mha", _volume_bytes(tmp_path, 6))) != "ghost"


def test_damaged_files_in_the_work_folder_do_not_stop_the_worklist(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "caseB_image.mha").write_bytes(_volume_bytes(tmp_path, 0))
    wl = Worklist(tmp_path / "work", data)
    (wl.dataset / "caseA__v1.json").write_text("[1, 2]")  # a JSON list where a case file belongs
    wl.draft_path("caseB").write_bytes(b"x")
    wl.draft_info_path("caseB").write_text('["not", "a", "dict"]')
    assert [(e.case_id, e.state) for e in wl.entries()] == [("caseB", "drafted")]
    assert "caseA" in wl.taken_ids()  # the damaged file still claims its case id
    assert case_id_for(wl.save_upload("caseA.mha", _volume_bytes(tmp_path, 1))) != "caseA"


# ---------------------------------------------------------------- session: drafts, garbage, models
@pytest.fixture
def session(tmp_path):
    from LumbarSegmentWeb.session import AnnotationSession

    asyncio.set_event_loop(asyncio.new_event_loop())
    data = tmp_path / "data"
    data.mkdir()
    (data / "caseA_image.mha").write_bytes(_volume_bytes(tmp_path, 0))
    (data / "caseB_image.mha").write_bytes(_volume_bytes(tmp_path, 1))
    s = AnnotationSession(Worklist(tmp_path / "work", data), device="cpu", threads=1)
    yield s
    s.close()


def test_a_draft_never_attaches_to_another_image_and_a_damaged_one_is_set_aside(session, tmp_path):
    wl = session.worklist
    assert session.load_case("caseA") == []
    session.add_segment("vertebral_body")
    session.save_draft()
    assert wl.read_info("caseA")["image_sha256"] == session.fingerprint
    session.load_case("caseB")
    # The file behind caseA is replaced by another patient's image (same name, same size).
    (wl.data / "caseA_image.mha").write_bytes(_volume_bytes(tmp_path, 5))
    notes = session.load_case("caseA")
    assert session.case_id == "caseA" and session.seg_node is None
    assert notes and "different image" in notes[0]
    assert not wl.draft_path("caseA").exists() and list((wl.drafts / "set-aside").glob("caseA.*.seg.nrrd"))
    # A damaged draft: the case still opens, without it, and says why.
    wl.draft_path("caseB").write_bytes(b"NRRD0004\ngarbage\n")
    notes = session.load_case("caseB")
    assert session.case_id == "caseB" and session.seg_node is None
    assert notes and "could not be read" in notes[0] and "caseB" in notes[0]


def test_garbage_upload_is_refused_and_leaves_nothing(session):
    from LumbarSegmentWeb.session_core import SessionError

    before = [e.case_id for e in session.worklist.entries()]
    with pytest.raises(SessionError, match="not a readable volume"):
        session.upload("scan.nii.gz", b"this is not a volume at all" * 10)
    assert [p.name for p in session.worklist.uploads.iterdir()] == []
    assert [e.case_id for e in session.worklist.entries()] == before


def test_a_client_cannot_pick_a_model_folder_or_mode(session, tmp_path):
    from LumbarSegmentWeb.session_core import SessionError

    with pytest.raises(SessionError, match="not one this server offers"):
        session.offered_model(str(tmp_path))
    with pytest.raises(SessionError):
        session.offered_model({"path": "/"})
    assert session.offered_model(None) is None
    offered = session.model_choices()
    if offered:
        assert session.offered_model(offered[0]["value"]) == offered[0]["value"]
    session.load_case("caseA")
    with pytest.raises(SessionError, match="unknown mode"):
        session.start_segmentation(None, mode="--registry=elsewhere")


def test_add_segment_then_export_works_and_a_stray_segment_can_be_removed_or_renamed(session):
    from LumbarSegmentLib.core.schema import SchemaError

    def name(sid):
        return session.seg_node.GetSegmentation().GetSegment(sid).GetName()

    session.load_case("caseA")
    sid = session.add_segment()  # named after a structure of the model's schema, so the export takes it
    assert name(sid) in ("vertebral_body", "intervertebral_disc")
    session.apply_threshold(50, 1000)
    assert session.export(force=True)["written"]
    odd = session.add_segment("my own structure")
    session.apply_threshold(50, 60)
    with pytest.raises(SchemaError, match="my own structure.*rename the segment .* or remove it"):
        session.export(force=True)
    session.rename_segment(odd, "intervertebral_disc" if name(sid) == "vertebral_body" else "vertebral_body")
    assert session.export(force=True)["version"] == 2
    session.remove_segment(odd)
    assert odd not in [r["id"] for r in session.segments()]
    assert session.export(force=True)["version"] == 3


HOSTILE_PAGE = """<!doctype html><title>waiting</title><script>
(async () => {
  const port = %d, out = {};
  try { const r = await fetch(`http://127.0.0.1:${port}/paraview/`, {method: "POST", body: "{}"});
        out.launch = r.status; out.body = await r.text(); }
  catch (e) { out.launch = "blocked"; }
  for (const url of [`ws://127.0.0.1:${port}/ws`, `ws://localhost:${port}/ws?key=guess`]) {
    out[url] = await new Promise(done => {
      const ws = new WebSocket(url);
      ws.onopen = () => { ws.close(); done("open"); };
      ws.onerror = () => done("refused");
    });
  }
  document.title = JSON.stringify(out);
})();
</script>"""


def test_a_page_of_another_local_port_cannot_drive_the_server_in_chromium(server, tmp_path):
    """A real browser: a page served from another 127.0.0.1 port tries the launcher and the socket;
    the printed link still opens the app."""
    import http.server
    import shutil
    import threading
    from functools import partial

    chromium = os.environ.get("LUMBARSEG_CHROMIUM", "/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    if not (shutil.which(chromium) or Path(chromium).is_file()):
        pytest.skip(f"no Chromium at {chromium} (set LUMBARSEG_CHROMIUM)")
    (tmp_path / "evil.html").write_text(HOSTILE_PAGE % server["port"])
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    hostile = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                         "--disable-dev-shm-usage"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{hostile.server_address[1]}/evil.html")
            page.wait_for_function("document.title !== 'waiting'", timeout=60_000)
            out = json.loads(page.title())
            # The server's own link (token with '#', '&', '/'): the page connects through the key.
            page.goto(serve.link_url("127.0.0.1", server["port"], TOKEN))
            page.wait_for_selector("[data-testid=upload] input[type=file]", state="attached", timeout=60_000)
            browser.close()
    finally:
        hostile.shutdown()
    assert out["launch"] == "blocked", out  # no readable answer, so no key
    assert [v for k, v in out.items() if k.startswith("ws://")] == ["refused", "refused"], out
