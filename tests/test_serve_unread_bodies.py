"""A request body is read only for the calls that take one (issue 31, item 1; the break-it review): submit and run.
Any other call that declares a body (a Content-Length above 0, or chunked), the key-less ``/ready``, ``/health``,
``/openapi.json``, ``/.well-known/jwks.json``, result files and any OPTIONS included, is answered 413 at once and
its connection closed, the body unread: 8 key-less clients sending 60 MiB each to ``GET /ready`` took a keyed
server from 466 to 1159 MB (each body was read whole before the answer).

The truth is the client's own view over a real socket: it sends the headers and the body's first bytes only, and
still gets 413 and then the server's close (RFC 9110 15.5.14: the server may close the connection), where the
server used to wait for the rest of the body.
"""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

from test_serve import APP, KEY
from test_serve_http import Running, closed_by_server, read_response

ZERO = "00000000-0000-0000-0000-000000000000"
REQUEST = f"/fal-ai/fast-sdxl-controlnet-canny/requests/{ZERO}"
KEYLESS_CALLS = [("GET", "/ready"), ("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/.well-known/jwks.json"),
                 ("GET", "/files/" + "0" * 32 + "/0.png"), ("OPTIONS", f"/{APP}")]
KEYED_CALLS = [("GET", f"{REQUEST}/status"), ("GET", REQUEST), ("PUT", f"{REQUEST}/cancel"), ("OPTIONS", f"/{APP}")]
BODIES = {"a length": (b"Content-Length: 900000\r\n", b"A" * 100),
          "chunked": (b"Transfer-Encoding: chunked\r\n", b"dbba0\r\n" + b"A" * 100)}


def answer_to_unfinished_body(port: int, method: str, path: str, key: str | None, body: str) -> tuple[int, str, bool]:
    """(status, detail, closed by the server) for ``method path`` whose body's first bytes only are ever sent."""
    declared, first_bytes = BODIES[body]
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode() + declared
    if key:
        head += f"Authorization: Key {key}\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + b"\r\n" + first_bytes)
        try:
            status, _h, answer = read_response(s)  # within the socket's 20 s; the body never completes
        except socket.timeout:
            return 0, "no answer within 20 s: the server waited for the body", False
        return status, json.loads(answer)["detail"], closed_by_server(s, 10.0)


def test_calls_that_take_no_body_refuse_one_unread(tmp_path):
    with Running(tmp_path, key=KEY) as srv:
        cases = [(m, p, k, body) for calls, k in ((KEYLESS_CALLS, None), (KEYED_CALLS, KEY)) for m, p in calls
                 for body in BODIES]
        with ThreadPoolExecutor(len(cases)) as pool:  # each waits up to 20 s for its answer, so all at once
            answers = list(pool.map(lambda case: answer_to_unfinished_body(srv.port, *case), cases))
        for (method, path, key, body), (status, detail, closed) in zip(cases, answers):
            assert (status, closed) == (413, True), (method, path, key is not None, body, status, detail)
            assert "takes no request body" in detail, detail
        assert srv.store.waiting() == 0


def test_a_keyless_server_refuses_them_the_same(tmp_path):
    with Running(tmp_path, key=None) as srv:
        calls = [("GET", "/ready"), ("OPTIONS", f"/{APP}"), ("GET", f"{REQUEST}/status")]
        cases = [(m, p, None, body) for m, p in calls for body in BODIES]
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: answer_to_unfinished_body(srv.port, *case), cases))
        for case, (status, detail, closed) in zip(cases, answers):
            assert (status, closed) == (413, True), (case, status, detail)


def test_an_upload_put_to_a_token_never_handed_out_is_refused_unread(tmp_path):
    """fal's storage PUT carries no key (@fal-ai/client's storage.js): only a token this server handed out within the
    hour opens a body; a guessed one is 404 with the body unread, so no one can make the server read 64 MiB."""
    with Running(tmp_path, key=KEY) as srv:
        cases = [("PUT", "/storage/upload/" + "0" * 32, None, body) for body in BODIES]
        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(lambda case: answer_to_unfinished_body(srv.port, *case), cases))
        for case, (status, detail, closed) in zip(cases, answers):
            assert (status, closed) == (404, True), (case, status, detail)
            assert "upload URL" in detail, detail


def test_an_upload_declared_over_the_image_limit_is_refused_unread(tmp_path):
    """A live upload URL's PUT whose Content-Length is over --max-image-mb is 413 before its body is read (it was read
    up to --max-body-mb, 64 MiB, and then refused)."""
    from test_serve_uploads import initiate

    with Running(tmp_path, key=KEY, limits={"max_image_bytes": 50_000}) as srv:
        code, urls, _ = initiate(srv)
        assert code == 200, urls
        path = urls["upload_url"].split(f":{srv.port}", 1)[1]
        status, detail, closed = answer_to_unfinished_body(srv.port, "PUT", path, None, "a length")
        assert (status, closed) == (413, True), (status, detail)
        assert "900000 bytes" in str(detail), detail
