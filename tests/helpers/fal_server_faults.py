"""Answers the fal test server (:mod:`fal_server`) does not give by itself, installed on it for one test.

Each is sent as raw bytes with the headers given, so a test can answer what no fal-protocol code would: a body that
is not the gzip its ``Content-Encoding`` says, a redirect, a status poll fal-client cannot parse, a garbled result.
``/elsewhere`` on the same server stands for another host (the client reaches it as ``localhost``, fal's queue as
``127.0.0.1``); what it answers is set per test too. Every request is counted in ``server.calls`` as usual.

Use :func:`install` with pytest's ``monkeypatch``: the server's handlers come back when the test ends.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

ELSEWHERE = "/elsewhere"


@dataclass
class Answer:
    """One raw answer. ``fal_id``: carry ``x-fal-request-id`` (on a submit, the id of the job it accepted)."""

    code: int
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    fal_id: bool = False


def elsewhere_url(server) -> str:
    return f"https://localhost:{server.port}{ELSEWHERE}"


def send(h, answer: Answer, rid: str | None = None) -> None:
    h.send_response(answer.code)
    headers = dict(answer.headers)
    if answer.fal_id and rid:
        headers["x-fal-request-id"] = rid
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(answer.body)))
    h.end_headers()
    h.wfile.write(answer.body)


def _accept(server, app: str, raw: bytes) -> str:
    """The job fal creates for a submission (it is billed), as :meth:`fal_server.FalTestServer._submit` does."""
    import fal_server

    rid = str(uuid.uuid4())
    with server.lock:
        server.submissions += 1
        server.jobs[rid] = fal_server.Job(rid, json.loads(raw or b"{}"), server.behaviour)
    return rid


def install(server, monkeypatch, *, submit: Answer | None = None, accept: bool = True, status=(),
            result: Answer | None = None, elsewhere: Answer | None = None) -> dict:
    """Answer the next submit with ``submit`` (after accepting its job when ``accept``), the first status polls with
    the answers in ``status`` (then as usual), every result with ``result``, every request to :data:`ELSEWHERE`
    with ``elsewhere``. Returns the counts of status polls and result fetches."""
    polls = list(status)
    counts = {"status": 0, "result": 0}
    submit_as_usual, status_as_usual, result_as_usual = server._submit, server._status, server._result
    handle_as_usual = server._handle

    def _submit(h, app, raw):
        nonlocal submit
        if submit is None:
            return submit_as_usual(h, app, raw)
        answer, submit = submit, None
        if accept:
            return send(h, answer, _accept(server, app, raw))
        with server.lock:
            server.submissions += 1
        return send(h, answer)

    def _status(h, job, query):
        counts["status"] += 1
        if polls:
            return send(h, polls.pop(0), job.id)
        return status_as_usual(h, job, query)

    def _result(h, job):
        counts["result"] += 1
        if result is not None:
            return send(h, result, job.id)
        return result_as_usual(h, job)

    def _handle(h, method):
        if elsewhere is not None and h.path.startswith(ELSEWHERE):
            length = int(h.headers.get("Content-Length") or 0)
            if length:
                h.rfile.read(length)
            with server.lock:
                server.calls.append((method, h.path, h.headers.get("Authorization", "")))
            return send(h, elsewhere)
        return handle_as_usual(h, method)

    monkeypatch.setattr(server, "_submit", _submit)
    monkeypatch.setattr(server, "_status", _status)
    monkeypatch.setattr(server, "_result", _result)
    monkeypatch.setattr(server, "_handle", _handle)
    return counts


def json_answer(body, code: int = 200, **headers) -> Answer:
    return Answer(code, json.dumps(body).encode(), {"Content-Type": "application/json", **headers})


HTML_PAGE = Answer(200, b"<html><body>upstream busy</body></html>", {"Content-Type": "text/html"})
# what a proxy may send: a header saying gzip over a body that is not gzip (httpx raises DecodingError reading it)
NOT_GZIP = Answer(200, b"this is not gzip at all", {"Content-Type": "application/json", "Content-Encoding": "gzip"})
