"""fal-client wiring: an HTTP transport with bounded timeouts, our own retry policy, and a waiter
that polls for cancel and a deadline while each call runs.

``fal-client`` retries some failures itself for up to ~50 s, a submit included: any ``httpx`` transport error or
timeout (also one that comes while the answer's body is read, after fal accepted the submission) and HTTP 408/409/429.
The client built here gives it an HTTP transport that caps every HTTP call's timeout, reads each answer's body itself
and hands every failure fal-client would retry (those answers, 5xx, dropped or refused connections, timeouts, a body
cut off, stalled or not decodable after the headers) to :func:`call_with_retries`, a bounded retry with backoff
(:class:`~.settings.FalSettings`). Answers are checked by what the call is, never by the URL they came from: a
submit's answer must be the JSON fal-client parses, and a submit never follows a redirect (fal's queue API does not
redirect one; following would send the body again, maybe elsewhere); a status poll, result or upload fal-client
cannot parse is retried (:func:`_parsed`). A submit is re-sent only when nothing reached fal (refused connection, 429,
5xx answers without fal's id), so a retry never pays twice. Every HTTP call runs in a worker thread while the caller's
``cancel_check`` is polled every 50 ms (:class:`Waiter`).
"""

from __future__ import annotations

import threading
import time

from ..errors import SDXLCNError
from ..request_log import fetch_command
from .errors import (
    FalAuthError,
    FalConnectionError,
    FalError,
    FalRateLimited,
    FalRequestFailed,
    FalServerError,
    FalTimeout,
    FalUnexpectedAnswer,
    FalValidationError,
)
from .key import SERVER_KEY, redact
from .settings import (ENDPOINT_URL_ENV, CancelCheck, FalSettings, FalStatus, StatusCallback,
                       check_followed_url, log, own_http_calls)


def received_by_fal(response) -> str | None:
    """The request id when fal itself answered (so a submit reached it and may be billed), else None.

    fal-client's own rule (``_maybe_retry_request``): only a 5xx *without* an ``x-fal-request-id`` header is an
    ingress error, one that never reached fal and may be sent again. fal-client has no public function for this
    test; it is written once, here.

    A 429 is a refusal, whatever its headers, so a submit answered 429 is sent again: fal-client re-sends every 429
    (``RETRY_CODES``, a submit included, without looking at ``x-fal-request-id``), and fal's docs say a queue
    submission is never turned away for concurrency: it waits in the queue instead ("Requests are never rejected due
    to concurrency limits", docs.fal.ai, model-apis/concurrency-limits). A 429 on the submit is the gateway refusing
    before anything is queued. Should fal ever queue a request it answers 429, this is the line to change.
    """
    if response.status_code == 429:
        return None
    return response.headers.get("x-fal-request-id") or None


def may_be_accepted(response) -> bool:
    """Whether a submit that got ``response`` (its status line and headers) may have been accepted by fal: a success
    always (its body may still break), an error answer when :func:`received_by_fal` says fal itself sent it."""
    return response.status_code < 400 or received_by_fal(response) is not None


class Transient(Exception):
    """A failure worth retrying: raised from the transport so fal-client's own retry loop passes it up."""

    def __init__(self, kind: str, message: str, status_code: int | None = None, sent: bool = True,
                 request_id: str | None = None, retry: bool = True):
        # "http", "timeout", "connection", "answer" (a body fal-client cannot parse), "redirect" (a submit's 3xx)
        self.kind = kind
        self.status_code = status_code
        self.sent = sent  # whether the request may have reached fal
        self.request_id = request_id  # fal's id for it, when fal answered
        self.retry = retry  # False: the same answer would come again (nothing is sent again)
        super().__init__(message)


def detail_text(body) -> str:
    if isinstance(body, dict) and "detail" in body:
        body = body["detail"]
    if isinstance(body, (list, dict)):
        import json

        return json.dumps(body)
    return str(body)


SUBMIT_ANSWER_KEYS = ("request_id", "response_url", "status_url", "cancel_url")  # what fal-client's submit reads

# what the HTTP call the transport now sees is for, set by the thread that makes it (fal-client's calls run in the
# thread that calls them): the transport checks a submission's answer as one whatever URL it went to
_calling = threading.local()


def _as_submit(fn):
    """``fn`` (fal-client's submit) with its POST known to the transport as a submission."""

    def run():
        _calling.submit = True
        try:
            return fn()
        finally:
            _calling.submit = False

    return run


def check_submit_answer(response) -> None:
    """A submit's 2xx answer must be the JSON fal-client parses (an object with the request id and its URLs);
    anything else (an HTML page from a proxy) is a :class:`Transient` here, never a raw ``ValueError`` or
    ``KeyError`` out of fal-client after fal accepted the submission. A 3xx is never followed: fal's queue does not
    redirect a submission, and following re-sends the body (a second bill), maybe to another host."""
    code = response.status_code
    rid = response.headers.get("x-fal-request-id") or None
    if 300 <= code < 400:
        where = redact(response.headers.get("location", "nowhere"))[:200]
        raise Transient("redirect", f"HTTP {code} to {where}", status_code=code, sent=rid is not None,
                        request_id=rid, retry=False)
    if not 200 <= code < 300:
        return
    import json

    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
        problem = "is not JSON"
    else:
        problem = None
    if problem is None and not (
            isinstance(body, dict) and all(isinstance(body.get(k), str) for k in SUBMIT_ANSWER_KEYS)):
        problem = f"lacks {', '.join(SUBMIT_ANSWER_KEYS)}"
    if problem is None:
        return
    ctype = response.headers.get("content-type", "no content type")
    shown = response.content[:120].decode("utf-8", "replace")
    rid = rid or (body.get("request_id") if isinstance(body, dict) else None)
    raise Transient("answer", f"the answer (HTTP {code}, {ctype}) {problem}: {shown!r}",
                    status_code=code, sent=True, request_id=rid if isinstance(rid, str) else None)


def _parsed(fn):
    """``fn`` (a fal-client call that starts nothing on fal: a status poll, a result fetch, an upload) with an answer
    it cannot parse (not JSON, a field missing or of another kind, an unknown status, a redirect loop) as a
    :class:`Transient`, retried like any other broken answer, wherever the answer came from."""
    import httpx

    def run():
        try:
            return fn()
        except SDXLCNError:
            raise
        except (ValueError, KeyError, TypeError, httpx.HTTPError) as exc:
            raise Transient("answer", f"fal-client could not parse it ({type(exc).__name__}: {str(exc)[:200]})",
                            sent=True) from None

    return run


def read_body(response, cap: float) -> None:
    """Read the whole answer here, so that a body cut off or stalled after the headers is a :class:`Transient`
    (with fal's id from the headers) instead of an ``httpx`` error that fal-client's retry would answer by sending
    the request again."""
    import httpx

    code = response.status_code
    rid = response.headers.get("x-fal-request-id") or None
    sent = may_be_accepted(response)
    try:
        response.read()
    except httpx.TimeoutException as exc:
        raise Transient("timeout", f"the answer (HTTP {code}) stopped coming: nothing for {cap:g} s after its "
                                   f"headers ({type(exc).__name__})", status_code=code, sent=sent,
                        request_id=rid) from None
    except httpx.TransportError as exc:
        raise Transient("connection", f"the answer (HTTP {code}) was cut off after its headers "
                                      f"({type(exc).__name__}: {exc})", status_code=code, sent=sent,
                        request_id=rid) from None
    except httpx.DecodingError as exc:  # not a TransportError: fal-client would pass it on raw, the id lost
        coding = response.headers.get("content-encoding", "none")
        raise Transient("answer", f"the answer (HTTP {code}) could not be decoded as its Content-Encoding "
                                  f"({coding}) says ({exc})", status_code=code, sent=sent, request_id=rid) from None
    finally:
        response.close()


def make_transport(settings: FalSettings):
    import httpx

    try:
        from fal_client.client import BackupDomainTransport

        inner = BackupDomainTransport()
    except Exception:  # older/newer fal-client without it
        inner = httpx.HTTPTransport()
    try:
        from fal_client.client import RETRY_CODES  # what fal-client retries itself (408, 409, 429)
    except ImportError:
        RETRY_CODES = (408, 409, 429)

    class BoundedTransport(httpx.BaseTransport):
        def handle_request(self, request):
            cap = settings.http_timeout_s
            submit = request.method == "POST" and getattr(_calling, "submit", False)
            t = dict(request.extensions.get("timeout") or {})
            for k in ("connect", "read", "write", "pool"):
                v = t.get(k)
                t[k] = cap if v is None else min(v, cap)
            request.extensions["timeout"] = t
            moved = settings.redirect(str(request.url))  # a self-hosted endpoint (SDXLCN_FAL_URL)
            if moved is not None:
                request.url = httpx.URL(moved)
                request.headers["Host"] = request.url.netloc.decode("ascii")
            mapped = settings.host_map.get(request.url.host)
            if mapped:
                host, _, port = mapped.partition(":")
                request.url = request.url.copy_with(host=host, port=int(port) if port else None)
                request.headers["Host"] = mapped
            check_followed_url(str(request.url))  # a URL a server answered: never the key in clear text
            try:
                response = inner.handle_request(request)
            except httpx.TimeoutException as exc:
                sent = not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
                raise Transient("timeout", f"no answer within {cap:g} s ({type(exc).__name__})", sent=sent) from None
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError)
                raise Transient("connection", f"{type(exc).__name__}: {exc}", sent=sent) from None
            read_body(response, cap)
            if response.status_code in RETRY_CODES or response.status_code >= 500:
                try:
                    text = detail_text(response.json())
                except ValueError:
                    text = response.text[:300]
                received = received_by_fal(response)
                raise Transient("http", text.strip(), status_code=response.status_code, sent=may_be_accepted(response),
                                request_id=received)
            if submit:
                check_submit_answer(response)
            return response

        def close(self):
            inner.close()

    return BoundedTransport()


def make_client(key: str, settings: FalSettings):
    """A ``fal_client.SyncClient`` whose HTTP client uses the bounded transport."""
    import fal_client
    import httpx

    class _Client(fal_client.SyncClient):
        @property
        def _client(self):  # noqa: D401 - replaces fal_client's cached_property of the same name
            c = self.__dict__.get("_sdxlcn_http")
            if c is None:
                c = httpx.Client(
                    transport=make_transport(settings),
                    headers={"Authorization": self._auth.header_value, "User-Agent": getattr(
                        fal_client.client, "USER_AGENT", "fal-client (python)")},
                    timeout=settings.http_timeout_s,
                    # as fal-client's own client: a poll, result or upload may follow a redirect (it starts nothing
                    # on fal; httpx drops the key when it leaves the host); a submit never does (the transport
                    # stops it: check_submit_answer), and every answer is checked by its call, not its URL
                    follow_redirects=True,
                )
                self.__dict__["_sdxlcn_http"] = c
            return c

    return _Client(key=key, default_timeout=settings.http_timeout_s)


# ---- waiting with cancel and a deadline -----------------------------------------------------

class Cancelled(Exception):
    pass


class Deadline(Exception):
    pass


class SubmitUnanswered(Exception):
    """A stop came while a submit was in flight and its answer did not come within the bound (or a second Ctrl-C
    gave up waiting): fal may have accepted (and may bill) it. ``stop`` is what asked to stop."""

    def __init__(self, stop: BaseException, waited_s: float):
        self.stop = stop
        self.waited_s = waited_s
        super().__init__(f"no answer to the submission within {waited_s:.0f} s")


class Waiter:
    def __init__(self, cancel_check: CancelCheck | None, deadline: float | None):
        self.cancel_check = cancel_check
        self.deadline = deadline
        # a stop (Cancelled, Deadline, KeyboardInterrupt) that came while a kept call ran: the caller acts on it
        # once that call's answer is in (a submit fal accepted is recorded, then cancelled)
        self.stopped: BaseException | None = None

    def check(self):
        if self.cancel_check is not None and self.cancel_check():
            raise Cancelled()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Deadline()

    def sleep(self, seconds: float):
        end = time.monotonic() + max(seconds, 0.0)
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def call(self, fn, keep_s: float | None = None, on_keep=None):
        """Run ``fn`` in a daemon thread while polling cancel and the deadline.

        Without ``keep_s`` a stop ends the wait at once (for calls that start nothing on fal). With ``keep_s`` (a
        submit: fal may accept and bill it while the body is still being sent) a stop never abandons ``fn``:
        ``on_keep(stop)`` says that we wait, the wait goes on for up to ``keep_s`` s for ``fn``'s answer, and the
        stop is kept in :attr:`stopped` for the caller to act on. Past ``keep_s``, or at a second Ctrl-C, it raises
        :class:`SubmitUnanswered`.
        """
        box: dict = {}
        done = threading.Event()

        def target():
            try:
                with own_http_calls():  # httpx's line per request stays out of the log: ours say what matters
                    box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()

        self.check()
        threading.Thread(target=target, name="sdxlcn-fal-call", daemon=True).start()
        try:
            while not done.wait(0.05):
                self.check()
        except (Cancelled, Deadline, KeyboardInterrupt) as stop:
            if keep_s is None:
                raise
            self.stopped = stop
            if on_keep is not None:
                on_keep(stop)
            try:
                if not done.wait(keep_s):
                    raise SubmitUnanswered(stop, keep_s) from None
            except KeyboardInterrupt:
                raise SubmitUnanswered(stop, keep_s) from None
        if "error" in box:
            raise box["error"]
        return box["value"]


def notify(on_status: StatusCallback, status: FalStatus) -> None:
    """Call ``on_status``; an exception from it (e.g. ComfyUI's interrupt) cancels the request."""
    try:
        on_status(status)
    except Exception as exc:  # noqa: BLE001
        log.warning("status callback raised %s; cancelling request %s", type(exc).__name__, status.request_id)
        raise Cancelled() from exc


def http_error(exc, what: str, request_id: str | None, settings: FalSettings) -> FalError:
    """A ``fal_client.FalClientHTTPError`` as one of our errors (redacted), naming who answered it."""
    code = exc.status_code
    detail = exc.message
    rid = f" (request {request_id})" if request_id else ""
    who = settings.target
    if code in (401, 403):
        text = redact(detail_text(detail))
        return FalAuthError(
            f"{who} refused the key (HTTP {code}) while {what}{rid}: {text}. Check FAL_KEY (or the key file)"
            + settings.billing(" and your fal balance at https://fal.ai/dashboard.", f": it must be {SERVER_KEY}."),
            code, text, request_id)
    if code == 422:
        items = detail if isinstance(detail, list) else []
        if items and isinstance(items[0], dict):
            first = items[0]
            loc = [str(p) for p in first.get("loc", []) if p not in ("body",)]
            fld = ".".join(loc) or "request"
            msg = redact(first.get("msg", "is invalid"))
            more = f" (and {len(items) - 1} more problem(s): {redact(detail_text(items[1:]))})" if len(items) > 1 else ""
            return FalValidationError(fld, f"{who} rejected this value: {msg}{more}{rid}", request_id)
        return FalValidationError("request", f"{who} rejected the request: {redact(detail_text(detail))}{rid}",
                                  request_id)
    if code == 404 and request_id:
        return FalRequestFailed(
            f"{who} does not know request {request_id} (HTTP 404) while {what}: {redact(detail_text(detail))}. "
            f"Check the id and the endpoint; {who} keeps results for a limited time.", request_id)
    return FalServerError(f"{who} answered HTTP {code} while {what}{rid}: {redact(detail_text(detail))}", code,
                          request_id)


def call_with_retries(waiter: Waiter, fn, what: str, settings: FalSettings, request_id: str | None,
                       submit: bool = False, on_keep=None, recovery=None):
    """``fn`` with retries of transient failures. A submit is never abandoned while in flight (see
    :meth:`Waiter.call`); once a stop came (:attr:`Waiter.stopped`) it is not sent again: a failure that never reached
    fal raises the stop, a success returns the handle for the caller to record and cancel. Any other call's answer
    that fal-client cannot parse is retried (:func:`_parsed`). ``recovery(request_id)`` says how to fetch a request
    that failed here later (a submit's keeps the id fal gave first)."""
    import fal_client
    import httpx

    attempt = 0
    keep_s = settings.submit_answer_s if submit else None
    run = _as_submit(fn) if submit else _parsed(fn)
    while True:
        try:
            try:
                return waiter.call(run, keep_s=keep_s, on_keep=on_keep)
            except httpx.HTTPError as exc:  # a submit's the transport did not make a Transient: may have reached fal
                raise Transient("answer", f"{type(exc).__name__}: {exc}", sent=True) from None
        except fal_client.FalClientHTTPError as exc:
            raise http_error(exc, what, request_id, settings) from None
        except Transient as exc:
            retryable = exc.retry and not (submit and exc.sent)
            if retryable and waiter.stopped is not None:
                raise waiter.stopped from None  # fal never got it: stop now, nothing to recover
            if retryable and attempt < settings.max_retries:
                delay = min(settings.backoff_s * (2 ** attempt), settings.backoff_max_s)
                attempt += 1
                log.info("%s: %s failed (%s); retry %d/%d in %.1f s", settings.target, what, redact(exc), attempt,
                         settings.max_retries, delay)
                waiter.sleep(delay)
                continue
            raise transient_error(exc, what, attempt, request_id, submit, recovery, settings) from None


def transient_error(exc: Transient, what: str, retries: int, request_id: str | None, submit: bool,
                    recovery, settings: FalSettings) -> FalError:
    who, twice = settings.target, settings.billing("be billed twice", "run it twice")
    tried = f" after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else ""
    request_id = request_id or (exc.request_id if submit else None)
    rid = f" (request {request_id})" if request_id else ""
    text = redact(exc)
    if request_id:
        how = recovery(request_id) if recovery is not None else f"Fetch it with {fetch_command(request_id)}."
    recover = f" The request may still finish. {how}" if request_id else ""
    if submit and exc.sent:  # fal may hold (and bill) it: never sent again
        if request_id:
            note = f" {who} accepted it as request {request_id}: it was not sent again (that would {twice}). {how}"
        else:
            note = (f" It may have reached {who}{settings.billing(' (check https://fal.ai/dashboard/requests)')}: it "
                    f"was not sent again (that would {twice}).")
        cls = {"timeout": FalTimeout, "connection": FalConnectionError, "answer": FalUnexpectedAnswer,
               "redirect": FalUnexpectedAnswer}.get(exc.kind)
        head = {"http": f"{who} received the submission but answered HTTP {exc.status_code}{tried}{rid}: {text}.",
                "answer": f"the answer of {who} to the submission{rid} could not be read: {text}.",
                "redirect": f"{who} answered the submission{rid} with a redirect ({text}), which {settings.queue} "
                            "never sends for a submission: it was not followed.",
                "timeout": f"{who} did not answer the submission in time{rid}: {text}."}.get(
            exc.kind, f"the connection to {who} broke during the submission{rid}: {text}.")
        if cls is None:
            return FalServerError(head + note, exc.status_code, request_id)
        if issubclass(cls, FalServerError):
            return cls(head + note, exc.status_code, request_id)
        return cls(head + note, request_id)
    if exc.kind == "redirect":  # a submit's, without fal's id: fal did not answer it
        return FalUnexpectedAnswer(
            f"the submission was answered with a redirect ({text}) that carries no request id (x-fal-request-id): "
            f"{settings.queue} never redirects a submission, so something between this machine and {who} answered "
            f"it (a proxy, a captive portal, or a wrong {ENDPOINT_URL_ENV}). It was not followed (that would send the "
            f"request, and your key, elsewhere) and not sent again; nothing reached {who}. Check the network and "
            f"{ENDPOINT_URL_ENV}.", exc.status_code)
    if exc.kind == "answer":
        return FalUnexpectedAnswer(f"the answer of {who} could not be read{tried} while {what}{rid}: {text}."
                                   f"{recover or ' Try again later.'}", exc.status_code, request_id)
    if exc.kind == "http" and exc.status_code == 429:
        return FalRateLimited(f"{who} is rate-limiting this key (HTTP 429){tried} while {what}{rid}: {text}. "
                              f"Lower the concurrency or try again later.{recover}", request_id)
    if exc.kind == "http":
        return FalServerError(f"{who} had a server error (HTTP {exc.status_code}){tried} while {what}{rid}: {text}. "
                              f"Try again later.{recover}", exc.status_code, request_id)
    if exc.kind == "timeout":
        return FalTimeout(f"{who} did not answer{tried} while {what}{rid}: {text}.{recover}", request_id)
    return FalConnectionError(f"the connection to {who} failed{tried} while {what}{rid}: {text}. "
                              f"Check the network.{recover}", request_id)


def close_client(client) -> None:
    c = client.__dict__.get("_sdxlcn_http")
    if c is not None:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass
