"""The stand-alone server speaks HTTP as HTTP says, and no client can wear it out (issue 31, item 1): raw bytes on a
socket against a real server on 127.0.0.1, the truth being the HTTP/1.1 rules (RFC 9112: chunked bodies, one valid
Content-Length) and the kernel's own view of the listening socket (``ss``).

- a chunked body is read as the body (it ran as a second request before), and a duplicated, conflicting or
  malformed Content-Length, a Content-Length beside chunked, or a line that is not HTTP is 400 with nothing queued;
- the key (and a declared length over the limit) is judged from the headers, before any body is read;
- a body that trickles gets 408 at its deadline; headers that trickle are cut at theirs; one address cannot hold
  more than its share of connections, and a keyed client is still answered while another address trickles;
- 150 submits at once are each answered (200 or 429), none reset: the listen backlog is at least 128.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from loopback import Loopback, Quiet, ipv6_can_bind
from test_serve import APP, KEY, Paused, call, fal_input


class Running:
    """The stand-alone server on 127.0.0.1 (a ``with`` block), its store in ``tmp_path``, its backend running nothing
    (``Paused``): ``app`` holds more of ``ServeApp``'s options (``cors_origins``, ...), ``conn`` ``ConnLimits``'s."""

    def __init__(self, tmp_path, key=KEY, max_waiting=100, app: dict | None = None, limits: dict | None = None,
                 **conn):
        from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
        from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
        from sdxl_controlnet_img2img.pipeline.serve.server import ConnLimits, StandaloneServer
        from sdxl_controlnet_img2img.pipeline.serve.store import Store

        self.store = Store(tmp_path / "data")
        limits = Limits(**{"max_waiting": max_waiting, "max_body_bytes": 1 << 20, **(limits or {})})
        app = ServeApp(self.store, Paused(), key=key, limits=limits, **(app or {}))
        self.server = StandaloneServer(app, limits=ConnLimits(**conn)).start()
        self.port, self.url = self.server.port, self.server.url

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.stop()
        self.store.close()


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP response from ``sock`` (status, lower-case headers, body by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole response: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, headers, rest[:length]


def send(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)


def post_head(path: str, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(body: bytes, size: int = 1000) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def closed_by_server(sock: socket.socket, deadline_s: float) -> bool:
    """Whether the server closes ``sock`` within ``deadline_s`` (an answer before the close is read and dropped)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        sock.settimeout(max(0.05, min(0.5, end - time.monotonic())))
        try:
            if sock.recv(65536) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:  # reset
            return True
    return False


@contextlib.contextmanager
def trickling(sock: socket.socket, every_s: float = 0.2):
    """Within the block, a thread sends one byte (a space) on ``sock`` every ``every_s`` seconds, until the block
    ends or the socket is closed: a body that trickles."""
    stop = threading.Event()

    def trickle():
        while not stop.wait(every_s):
            try:
                sock.send(b" ")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def test_chunked_bodies_are_bodies_and_bad_lengths_are_400(tmp_path):
    body = json.dumps(fal_input()).encode()
    with Running(tmp_path) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(post_head(f"/{APP}", {"Authorization": f"Key {KEY}", "Content-Type": "application/json",
                                            "Transfer-Encoding": "chunked"}) + chunked(body))
            status, _h, answer = read_response(s)
            assert status == 200, answer
            rid = json.loads(answer)["request_id"]
            # the same connection carries the next request: the chunks were the body, not a request of their own
            s.sendall(f"GET /{APP}/requests/{rid}/status HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Key {KEY}"
                      "\r\n\r\n".encode())
            status, _h, answer = read_response(s)
            assert status == 200 and json.loads(answer)["status"] == "IN_QUEUE", answer
        assert srv.store.waiting() == 1
        auth = {"Authorization": f"Key {KEY}", "Content-Type": "application/json"}
        for name, extra, payload in (
                ("two lengths", {"Content-Length": f"{len(body)}\r\nContent-Length: {len(body)}"}, body),
                ("conflicting lengths", {"Content-Length": f"{len(body)}\r\nContent-Length: 5"}, body),
                ("1_0", {"Content-Length": "1_0"}, b"0123456789"),
                ("not a number", {"Content-Length": "ten"}, b"0123456789"),
                ("a sign", {"Content-Length": f"+{len(body)}"}, body),
                ("chunked and a length", {"Transfer-Encoding": "chunked", "Content-Length": "5"}, chunked(body))):
            status, _h, answer = send(srv.port, post_head(f"/{APP}", {**auth, **extra}) + payload)
            assert status == 400, (name, status, answer[:300])
        status, _h, _a = send(srv.port, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        assert status == 400
        assert srv.store.waiting() == 1  # nothing of the refused ones was queued


@pytest.mark.parametrize("auth", [None, "Key not-the-key"], ids=["no key", "wrong key"])
def test_the_key_is_checked_before_the_body_is_read(tmp_path, auth):
    """A caller without the key sends the headers of a large body and only its first bytes: it is answered 401 at
    once (the server read the whole body first, holding the connection and the memory)."""
    with Running(tmp_path) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            headers = {"Content-Type": "application/json", "Content-Length": str(900_000)}
            if auth:
                headers["Authorization"] = auth
            s.sendall(post_head(f"/{APP}", headers) + b"{" + b" " * 1000)
            status, _h, answer = read_response(s)  # within the socket's 15 s, the body never completed
        assert status == 401 and "not-the-key" not in answer.decode()
        # a declared body over the limit is refused as early, with the key
        with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as s:
            s.sendall(post_head(f"/{APP}", {"Authorization": f"Key {KEY}", "Content-Length": str(5 << 20)}) + b"{")
            status, _h, answer = read_response(s)
        assert status == 413 and json.loads(answer)["detail"][0]["loc"] == ["body"]


def test_a_trickling_body_gets_408_at_its_deadline(tmp_path):
    with Running(tmp_path, body_s=2.0) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
            s.sendall(post_head(f"/{APP}", {"Authorization": f"Key {KEY}", "Content-Length": "1000"}))
            with trickling(s):
                status, _h, answer = read_response(s)
        assert status == 408 and "did not arrive" in json.loads(answer)["detail"]


def test_trickling_connections_are_bounded_per_address_and_cut_at_the_header_deadline(tmp_path):
    """40 connections from 127.0.0.2 that send their headers a byte at a time: past 8 from that address each new one
    takes the place of the oldest (idle, and none sent the key), so 32 are closed at once and the newest 8 at the 3 s
    header deadline; meanwhile a keyed client on 127.0.0.1 is answered."""
    with Running(tmp_path, max_client_connections=8, header_s=3.0) as srv:
        socks = []
        try:
            for _ in range(40):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=10, source_address=("127.0.0.2", 0))
                try:
                    s.sendall(b"POST /" + APP.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                except OSError:  # closed already
                    pass
                socks.append(s)
            code, body, _ = call("GET", f"{srv.url}/{APP}/requests/00000000-0000-0000-0000-000000000000/status")
            assert code == 404, body
            closed = [closed_by_server(s, 2.0) for s in socks[:32]]
            assert all(closed), f"{closed.count(False)} of the 32 connections over the per-address limit stayed open"
            for s in socks[32:]:
                try:
                    s.sendall(b"a")
                except OSError:
                    pass
            assert all(closed_by_server(s, 15.0) for s in socks[32:]), "headers trickled past their deadline"
        finally:
            for s in socks:
                s.close()


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the listen backlog")
def test_150_submits_at_once_are_each_answered(tmp_path):
    body = json.dumps(fal_input()).encode()
    with Running(tmp_path, max_waiting=20) as srv:
        listing = subprocess.run(["ss", "-Hltn", f"sport = :{srv.port}"], capture_output=True, text=True).stdout
        backlog = int(listing.split()[2])  # LISTEN's Send-Q: the backlog given to listen()
        assert backlog >= 128, listing
        results, go = [], threading.Barrier(150)

        def submit():
            go.wait()
            try:
                results.append(call("POST", f"{srv.url}/{APP}", body)[0])
            except Exception as exc:  # noqa: BLE001 - a reset, a refused connection: what must not happen
                results.append(repr(exc))

        threads = [threading.Thread(target=submit) for _ in range(150)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sorted(set(map(str, results))) == ["200", "429"], [r for r in results if r not in (200, 429)][:5]
        assert results.count(200) == 20 and srv.store.waiting() == 20


def test_a_malformed_proxy_target_is_404_in_fals_shape(tmp_path):
    """An ``x-fal-target-url`` that urllib cannot even split (an unclosed IPv6 bracket) is one more target this
    server does not serve: 404 with fal's ``{"detail": ...}``, as for any other (it was aiohttp's plain-text 500)."""
    for key in (KEY, None):
        with Running(tmp_path / str(bool(key)), key=key) as srv:
            for target in ("http://[::1", "https://queue.fal.run:99999/x"):
                status, headers, answer = send(srv.port, post_head("/proxy", {"x-fal-target-url": target,
                                                                              "Content-Length": "2"}) + b"{}")
                assert status == 404 and headers["content-type"].startswith("application/json"), (target, answer)
                assert "forwards nothing to fal" in json.loads(answer)["detail"], answer


def test_a_key_that_is_not_utf8_is_401(tmp_path):
    """``Authorization: Key`` followed by bytes that are not UTF-8 is a wrong key: 401 (it was a 500)."""
    with Running(tmp_path) as srv:
        for raw in (b"Key \xff\xfe", b"Key \xed\xa0\x80"):
            head = post_head(f"/{APP}", {"Content-Length": "2"}).replace(b"\r\n\r\n", b"\r\nAuthorization: " + raw
                                                                         + b"\r\n\r\n")
            status, _h, answer = send(srv.port, head + b"{}")
            assert status == 401 and "missing or wrong key" in json.loads(answer)["detail"], (raw, status, answer)


@pytest.mark.skipif(not ipv6_can_bind(80), reason="needs [::1]:80 (IPv6 loopback, a free port 80 and the right "
                                                     "to bind it)")
def test_an_ipv6_url_without_a_port_goes_to_port_80_with_its_host_bracketed(tmp_path):
    """The server's outbound fetch of ``http://[::1]/x`` (an image URL, a webhook) reaches [::1]:80, the scheme's
    default port (RFC 3986), and says ``Host: [::1]`` (RFC 9110); it went to host ':' port 1."""
    from http.server import HTTPServer

    from sdxl_controlnet_img2img.pipeline.serve import fetch

    seen = []

    class Handler(Quiet):
        def do_GET(self):
            seen.append((self.path, self.headers["Host"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    with Loopback(Handler, host="::1", port=80, server_class=HTTPServer):
        status, data = fetch.request("http://[::1]/x?y=1", max_bytes=100, timeout_s=10,
                                     policy=fetch.Policy(fetch.Policy.ALL))
    assert (status, data) == (200, b"ok") and seen == [("/x?y=1", "[::1]")], (status, data, seen)


@pytest.mark.skipif(not ipv6_can_bind(), reason="needs IPv6 loopback (::1)")
def test_an_ipv6_url_keeps_its_brackets_in_messages():
    """A download that fails names its URL as RFC 3986 writes an IPv6 host, in brackets, without query or
    credentials: the message said 'http://::1:PORT/x.png', which urllib itself reads as host ':' and no port."""
    import urllib.parse

    from sdxl_controlnet_img2img.pipeline.images import ImageInputError, download, redact_url

    with socket.socket(socket.AF_INET6) as s:  # a port nothing listens on
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageInputError) as err:
        download(f"http://user:pw@[::1]:{port}/x.png?token=secret", "image_url", timeout=10)
    message = str(err.value)
    named = message[message.index("http://"):].split()[0]
    parts = urllib.parse.urlsplit(named)
    assert (parts.hostname, parts.port, parts.path) == ("::1", port, "/x.png"), message
    assert "secret" not in message and "pw" not in message, message
    assert redact_url("https://user:pw@[2001:db8::1]/a/b.png?x=1") == "https://[2001:db8::1]/a/b.png"
