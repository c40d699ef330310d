"""Run a :class:`GenerationRequest` on fal's hosted endpoint, through the official ``fal-client``:
the public API (:func:`run_remote`, :func:`fetch_remote_result`, :func:`run_remote_batch`).

The flow is fal's queue protocol: submit -> poll the status (queue position, logs) -> fetch the
result -> download/decode the images (:mod:`.files`). The result has the same shape as the local
path (:class:`GenerationResult`, images as PIL).

- **Network**: bounded timeouts, retries and cancel: :mod:`.transport`.
- **Cancel**: the caller's ``cancel_check`` stops waiting at once and asks fal to cancel
  (``cancel_url``; fal honours it while the request is queued); a fetch by id only stops waiting.
- **Paid results are never lost**: the request id is written to the request log
  (:mod:`..request_log`) before waiting starts; :func:`fetch_remote_result` gets a finished
  result by id.
- **The key** never appears in a message, a log line or an exception text (:mod:`.key`).
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .. import request_log
from ..request import GenerationRequest
from ..result import GenerationResult
from ..errors import SDXLCNError
from .errors import (
    FalBatchIncomplete,
    FalCancelled,
    FalError,
    FalRequestFailed,
    FalTimeout,
    FalUnexpectedAnswer,
    FalValidationError,
)
from .files import decode_result, fal_arguments, prepare_image
from .key import redact, resolve_key
from .settings import DEFAULT_TIMEOUT_S, ENDPOINT, CancelCheck, FalSettings, FalStatus, StatusCallback, log
from .transport import (
    Cancelled,
    Deadline,
    SubmitUnanswered,
    Waiter,
    call_with_retries,
    close_client,
    make_client,
    notify,
)


# how a caller allows more time: run_remote's and the node's timeout_s, the CLI's --fal-timeout
_TIME_LIMIT = "timeout_s; --fal-timeout on the command line"


def _recovery(request_id: str, request_log_dir, recorded: bool) -> str:
    """How to fetch ``request_id`` later (see :func:`..request_log.recovery`), the fal node's way included."""
    return request_log.recovery(request_id, request_log_dir, recorded)[:-1] + " (or the fal node's request_id input)."


def _wait_and_fetch(client, handle_factory, request_id: str, endpoint: str, waiter: Waiter, settings: FalSettings,
                    on_status: StatusCallback | None, started: float, timings: dict, request=None,
                    request_log_dir=None, record_completed: bool = True,
                    cancel_on_stop: bool = True, recorded: bool = True,
                    earlier_lines: bool = True) -> GenerationResult:
    """Poll ``request_id`` until it is done, then fetch and decode its result. A stop (cancel, Ctrl-C) asks fal to
    cancel when ``cancel_on_stop`` (our own submission); a fetch by id only stops waiting. ``recorded``: whether
    the request log holds the id (the messages say how to fetch it later accordingly). ``earlier_lines``: whether
    fal's log lines of a request that had finished before the first look are said (our own submission: yes; a fetch
    by id: no, that run's lines were said, or not wanted, when it ran: one line says it is done)."""
    import fal_client

    recover = _recovery(request_id, request_log_dir, recorded)
    who = settings.target
    handle = handle_factory()
    seen_logs = 0
    last_state = last_pos = None
    t_wait = time.perf_counter()
    try:
        while True:
            status = call_with_retries(waiter, lambda: _status(handle), "polling the status", settings, request_id,
                                        recovery=lambda _rid: recover)
            logs = getattr(status, "logs", None) or []
            new = [redact(entry.get("message", entry) if isinstance(entry, dict) else entry) for entry in logs[seen_logs:]]
            seen_logs = max(seen_logs, len(logs))
            if isinstance(status, fal_client.Queued):
                state, pos = "IN_QUEUE", status.position
            elif isinstance(status, fal_client.InProgress):
                state, pos = "IN_PROGRESS", None
            else:
                state, pos = "COMPLETED", None
            # the log: one line per status change and fal's new lines once each (those a finished request's answer
            # brings came before it finished)
            changed = (state, pos) != (last_state, last_pos)
            said = [_said(state, pos, time.monotonic() - started, settings)] if changed else []
            if state == "COMPLETED" and last_state is None and not earlier_lines:
                said, new = ["already done: fetching its result"], []
            for line in (new + said) if state == "COMPLETED" else (said + new):
                log.info("%s %s: %s", who, request_id, line)
            if on_status is not None and (new or state != last_state or state == "IN_QUEUE"):
                notify(on_status, FalStatus(request_id, state, pos, new, time.monotonic() - started))
            last_state, last_pos = state, pos
            if isinstance(status, fal_client.Completed):
                if status.error:
                    raise FalRequestFailed(
                        f"{who} reported an error for request {request_id}: {redact(status.error)}"
                        + (f" ({status.error_type})" if status.error_type else ""), request_id)
                break
            waiter.sleep(settings.poll_interval_s)
        timings["fal_wait"] = time.perf_counter() - t_wait
        t = time.perf_counter()
        data = call_with_retries(waiter, handle.get,  # once fal reports COMPLETED: nothing left to poll
                                  "fetching the result", settings, request_id, recovery=lambda _rid: recover)
        timings["fetch"] = time.perf_counter() - t
        result = _decoded(data, request, request_id, settings, timings, recover)
    except Cancelled:
        if not cancel_on_stop:  # the user stopped waiting for a result: the request stays theirs, and pending
            raise FalCancelled(f"stopped waiting for request {request_id}; it was not cancelled on {who}. {recover}",
                               request_id) from None
        log.warning("%s: cancelling request %s", who, request_id)
        event, said = _cancel(handle, settings, recover)
        # only a request fal reports as cancelled is done with; otherwise fal may still run (and bill) it
        request_log.record(request_log_dir, event, request_id, endpoint=endpoint)
        raise FalCancelled(f"cancelled while waiting for request {request_id} on {who}; {said}.", request_id) from None
    except Deadline:
        allowed = f"the {waiter.deadline - started:g} s" if waiter.deadline is not None else "the time"
        raise FalTimeout(
            f"request {request_id} on {who} did not finish within {allowed} allowed ({_TIME_LIMIT}). It may still "
            f"finish{settings.billing(' (and is billed)')}. {recover}", request_id) from None
    if record_completed:
        request_log.record(request_log_dir, "completed", request_id, endpoint=endpoint)
    return result


def _said(state: str, position, elapsed: float, settings: FalSettings) -> str:
    """A status change as the log says it."""
    if state == "IN_QUEUE":
        return f"in {settings.queue}, position {position}" if position is not None else f"in {settings.queue}"
    if state == "IN_PROGRESS":
        return "running"
    return f"done (waited {elapsed:.1f} s)"


def _status(handle):
    """fal's status of ``handle`` (fal-client parses it), in the shapes the wait above uses: a queue position that is
    a number, logs that are a list; anything else is a garbled answer (``ValueError``: retried, see
    :func:`.transport.call_with_retries`)."""
    status = handle.status(with_logs=True)
    logs = getattr(status, "logs", None)
    if logs is not None and not isinstance(logs, list):
        raise ValueError(f"its logs are {type(logs).__name__}, not a list")
    pos = getattr(status, "position", None)
    if pos is not None and (isinstance(pos, bool) or not isinstance(pos, int)):
        raise ValueError(f"its queue_position is {str(pos)[:40]!r}, not a number")
    return status


def _decoded(data, request, request_id: str, settings: FalSettings, timings: dict, recover: str) -> GenerationResult:
    """:func:`.files.decode_result`, a result with fields of another kind (a seed that is no number) as the pack's
    error naming the id, which stays pending (the result is paid for; fal keeps it a while): ``recover`` says how to
    fetch it again."""
    try:
        return decode_result(data, request, request_id, settings, timings)
    except SDXLCNError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise FalUnexpectedAnswer(f"the result of request {request_id} from {settings.target} could not be read "
                                  f"({type(exc).__name__}: {redact(exc)[:200]}). {recover}", None, request_id) from None


def _cancel(handle, settings: FalSettings, recover: str) -> tuple[str, str]:
    """Ask fal to cancel, then look once at the request: ("cancelled" | "cancel_requested", what to tell the user,
    with ``recover``, how to fetch it, when it may still run). fal honours a cancel while the request is queued; a
    running or finished one may still be billed."""
    import fal_client

    deadline = time.monotonic() + min(settings.http_timeout_s, 10.0)  # bounded: the user asked to stop
    try:
        Waiter(None, deadline).call(handle.cancel)
    except Exception as exc:  # noqa: BLE001 - fal refuses with 400 (ALREADY_COMPLETED); the status below tells
        log.info("%s: cancel answered %s", settings.target, redact(type(exc).__name__))
    try:  # one quick look: a slow answer is not worth keeping a user who pressed Cancel waiting
        status = Waiter(None, min(deadline, time.monotonic() + 1.0)).call(lambda: handle.status(with_logs=False))
    except Exception:  # noqa: BLE001
        status = None
    if isinstance(status, fal_client.Completed) and "cancel" in f"{status.error} {status.error_type}".lower():
        return "cancelled", (f"{settings.target} cancelled it"
                             + settings.billing(" (nothing is billed for a request cancelled in the queue)"))
    return "cancel_requested", (
        f"{settings.target} was asked to cancel it, but it was already "
        f"{'done' if isinstance(status, fal_client.Completed) else 'running'}: it may still finish"
        f"{settings.billing(' and be billed')}. {recover[:-1]}")


class _Submit:
    """The submit, run in the waiter's thread. The id is recorded by that thread as soon as fal answers, so it
    reaches the request log even when the caller stopped waiting; an abandoned submit answered late is cancelled."""

    def __init__(self, client, endpoint: str, request: GenerationRequest, settings: FalSettings, request_log_dir):
        self.client, self.endpoint, self.request = client, endpoint, request
        self.settings, self.request_log_dir = settings, request_log_dir
        self.lock = threading.Lock()
        self.abandoned = False
        self.handle = None
        self.recorded = False  # whether the id reached the request log

    def keep(self, request_id: str, **extra) -> str:
        """Record ``request_id`` (fal accepted it) in the request log; how to fetch it later, for the user."""
        r = self.request
        self.recorded = request_log.record(self.request_log_dir, "submitted", request_id, endpoint=self.endpoint,
                                           seed=r.seed, prompt=r.prompt[:200], num_images=r.num_images, **extra)
        return _recovery(request_id, self.request_log_dir, self.recorded)

    def send(self, args: dict):
        handle = self.client.submit(self.endpoint, args)
        self.keep(handle.request_id)
        with self.lock:
            self.handle = handle
            late = self.abandoned
        if late:
            self._cancel_late(handle)
        return handle

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            handle = self.handle
        if handle is not None:  # answered just as we gave up
            self._cancel_late(handle)

    def _cancel_late(self, handle) -> None:
        log.warning("%s: the submission was answered late as request %s (recorded); cancelling it",
                    self.settings.target, handle.request_id)
        try:
            event, _said = _cancel(handle, self.settings, _recovery(handle.request_id, self.request_log_dir,
                                                                    self.recorded))
            request_log.record(self.request_log_dir, event, handle.request_id, endpoint=self.endpoint)
        finally:
            close_client(self.client)


def _say_waiting(stop: BaseException, settings: FalSettings, on_status: StatusCallback | None) -> None:
    """A stop came while the submit was being sent: say that we wait for fal's answer (fal may already hold it)."""
    what = {Deadline: "the time limit passed", KeyboardInterrupt: "interrupted"}.get(type(stop), "cancelled")
    who = settings.target
    text = (f"{what} while the request was being sent to {who}: waiting up to {settings.submit_answer_s:.0f} s for "
            f"{who} to answer the submission, so that its id is recorded and the request cancelled instead of lost")
    if on_status is None:
        log.warning("%s: %s", who, text)
        return
    log.info("%s: %s", who, text)
    try:
        on_status(FalStatus("", "STOPPING", None, [text], 0.0))
    except Exception:  # noqa: BLE001 - already stopping
        pass


def _stop_after_submit(handle, stop: BaseException, endpoint: str, settings: FalSettings,
                       on_status: StatusCallback | None, started: float, request_log_dir,
                       recorded: bool) -> GenerationResult:
    """fal accepted a submit during which a stop came: its id is already recorded; cancel it, then raise the stop."""
    request_id = handle.request_id
    if on_status is not None:
        try:
            on_status(FalStatus(request_id, "SUBMITTED", None, [], time.monotonic() - started))
        except Exception:  # noqa: BLE001 - already stopping
            pass
    log.warning("%s: cancelling request %s (accepted while we were stopping)", settings.target, request_id)
    event, said = _cancel(handle, settings, _recovery(request_id, request_log_dir, recorded))
    request_log.record(request_log_dir, event, request_id, endpoint=endpoint)
    where = f"recorded in {request_log.log_path(request_log_dir)}" if recorded else "NOT recorded: note this id"
    text = f"{settings.target} had accepted the request as {request_id} ({where}); {said}."
    if isinstance(stop, Deadline):
        raise FalTimeout(f"the time limit ({_TIME_LIMIT}) passed while the request was being submitted: {text}",
                         request_id)
    if isinstance(stop, KeyboardInterrupt):
        log.warning("%s: interrupted while submitting: %s", settings.target, text)
        raise stop
    raise FalCancelled(f"cancelled while the request was being submitted: {text}", request_id)


def _unanswered(exc: SubmitUnanswered, request_log_dir, settings: FalSettings) -> FalError:
    who = settings.target
    where = (f"`{request_log.cli_command()} fal-pending --request-log-dir {request_log_dir}`"
             if request_log_dir is not None else settings.billing("https://fal.ai/dashboard/requests", who))
    text = (f"{who} did not answer the submission within {exc.waited_s:.0f} s of the stop. It may have reached {who}"
            f"{settings.billing(' and be billed')}: if this process keeps running, its id is recorded and the request "
            f"cancelled when the answer comes; otherwise check {where}")
    if isinstance(exc.stop, Deadline):
        return FalTimeout(f"the time limit ({_TIME_LIMIT}) passed while the request was being submitted; {text}")
    return FalCancelled(f"cancelled while the request was being submitted; {text}")


def run_remote(
    request: GenerationRequest,
    *,
    key: str | None = None,
    key_file=None,
    endpoint: str = ENDPOINT,
    on_status: StatusCallback | None = None,
    cancel_check: CancelCheck | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    request_log_dir=None,
    settings: FalSettings | None = None,
    record_completed: bool = True,
) -> GenerationResult:
    """Run ``request`` on fal and return the same result shape as the local path.

    ``key`` / ``key_file``: see :func:`.key.resolve_key` (environment first, then the file).
    ``on_status(FalStatus)`` is called on every state change, queue position and new log lines.
    ``cancel_check()`` returning true cancels: fal is asked to cancel and :class:`FalCancelled` is
    raised at once. ``timeout_s`` bounds the whole wait (:class:`FalTimeout`, with the request id).
    ``request_log_dir``: where the request id is recorded before waiting (see :mod:`.request_log`).
    A request without a seed gets a random one first, so the result is reproducible.
    Every failure is a :class:`FalError` subclass with the key redacted. ``record_completed=False`` leaves the id
    pending: the caller records ``completed`` once the result reached the user (its files written).
    """
    settings = settings or FalSettings()
    request = request.with_seed()
    key = resolve_key(key, key_file, settings.server)
    started = time.monotonic()
    waiter = Waiter(cancel_check, started + timeout_s if timeout_s else None)
    timings: dict[str, float] = {}
    client = make_client(key, settings)
    sender = _Submit(client, endpoint, request, settings, request_log_dir)
    try:
        try:
            args = fal_arguments(request, settings.target)
            t = time.perf_counter()
            for name in ("image_url", "control_image_url"):
                args[name] = prepare_image(args[name], name, client, waiter, settings)
            timings["prepare"] = time.perf_counter() - t
            # fal received a submit whose answer then failed (it may bill it): the id is kept before the error is told
            handle = call_with_retries(waiter, lambda: sender.send(args), "submitting the request", settings, None,
                                       submit=True, on_keep=lambda stop: _say_waiting(stop, settings, on_status),
                                       recovery=lambda rid: sender.keep(rid, submit_error=True))
        except FalError as exc:
            if exc.request_id:
                if waiter.stopped is not None:  # the user stopped: do not leave it running either
                    recover = _recovery(exc.request_id, request_log_dir, sender.recorded)
                    event, said = _cancel(client.get_handle(endpoint, exc.request_id), settings, recover)
                    request_log.record(request_log_dir, event, exc.request_id, endpoint=endpoint)
                    raise FalCancelled(f"{exc} You stopped while it was being submitted: {said}.",
                                       exc.request_id) from None
            raise
        except SubmitUnanswered as exc:
            sender.abandon()  # its answer, if it ever comes, is recorded and cancelled by the sending thread
            raise _unanswered(exc, request_log_dir, settings) from None
        except Cancelled:  # before the submit was sent, or a send that never reached fal
            raise FalCancelled(f"cancelled before the request was submitted to {settings.target}"
                               f"{settings.billing(' (nothing was billed)')}") from None
        except Deadline:
            raise FalTimeout(f"the time limit ({_TIME_LIMIT}) passed before the request was submitted to "
                             f"{settings.target}{settings.billing(' (nothing was billed)')}") from None
        request_id = handle.request_id
        log.info("%s: submitted request %s to %s", settings.target, request_id, endpoint)
        if waiter.stopped is not None:  # a stop came while the submit was in flight: fal accepted it, cancel it
            return _stop_after_submit(handle, waiter.stopped, endpoint, settings, on_status, started, request_log_dir,
                                      sender.recorded)
        try:
            if on_status is not None:
                notify(on_status, FalStatus(request_id, "SUBMITTED", None, [], time.monotonic() - started))
        except Cancelled:
            waiter = Waiter(lambda: True, None)  # cancel at the first check, through the usual path
        return _wait_and_fetch(client, lambda: handle, request_id, endpoint, waiter, settings, on_status, started,
                               timings, request=request, request_log_dir=request_log_dir,
                               record_completed=record_completed, recorded=sender.recorded)
    finally:
        if not sender.abandoned:
            close_client(client)


def fetch_remote_result(
    request_id: str,
    *,
    key: str | None = None,
    key_file=None,
    endpoint: str | None = None,
    on_status: StatusCallback | None = None,
    cancel_check: CancelCheck | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    request_log_dir=None,
    settings: FalSettings | None = None,
    record_completed: bool = True,
) -> GenerationResult:
    """Get the result of an already submitted request by its id (waiting for it when still running).

    The endpoint comes from ``endpoint``, else the request log's record of the id, else :data:`ENDPOINT`.
    Nothing new is submitted, so nothing is billed again. ``record_completed=False`` leaves the id pending in the
    request log: the caller records ``completed`` once the result reached the user (saved, returned). A stop
    (``cancel_check``, Ctrl-C) only stops waiting: the request is never cancelled on fal (:class:`FalCancelled`).
    """
    settings = settings or FalSettings()
    request_id = check_request_id(request_id)
    rec = request_log.find(request_log_dir, request_id) if request_log_dir is not None else None
    if endpoint is None:
        endpoint = rec.get("endpoint") if rec else None
    endpoint = endpoint or ENDPOINT
    key = resolve_key(key, key_file, settings.server)
    started = time.monotonic()
    waiter = Waiter(cancel_check, started + timeout_s if timeout_s else None)
    client = make_client(key, settings)
    try:
        return _wait_and_fetch(client, lambda: client.get_handle(endpoint, request_id), request_id, endpoint, waiter,
                               settings, on_status, started, {}, request=None, request_log_dir=request_log_dir,
                               record_completed=record_completed, cancel_on_stop=False,
                               recorded=request_log.is_recorded(request_log_dir, request_id) if rec else False,
                               earlier_lines=False)
    finally:
        close_client(client)


_REQUEST_ID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def check_request_id(request_id) -> str:
    """``request_id`` as fal issues them (a UUID); anything else is refused before a URL is built from it (a
    shared workflow could otherwise send the user's key to another app's path)."""
    text = (request_id or "").strip() if isinstance(request_id, str) else ""
    if not text:
        raise FalValidationError("request_id", "is empty; give the id of a submitted fal request")
    if not _REQUEST_ID.match(text):
        raise FalValidationError("request_id", f"{text[:60]!r} is not a fal request id (a UUID such as "
                                               "3f2b8c1e-0d4a-4b6e-9c7f-1a2b3c4d5e6f); nothing was sent")
    return text


def run_remote_batch(requests, *, max_concurrency: int = 4, on_status_for: Callable[[int], StatusCallback] | None = None,
                     **kwargs) -> list[GenerationResult]:
    """Run several requests with at most ``max_concurrency`` in flight; results in input order.

    Every request runs to its end (each is billed, so none is abandoned half-way). When some fail and some
    complete, :class:`FalBatchIncomplete` carries the completed results (paid for: never dropped) and the failures;
    when all fail, the first failure is raised (a :class:`FalCancelled` if any, else the first in input order). ``kwargs``
    go to :func:`run_remote` (one shared ``cancel_check`` cancels all); ``on_status_for(i)`` gives
    request ``i``'s status callback.
    """
    requests = list(requests)
    if not requests:
        return []
    n = max(1, min(int(max_concurrency), len(requests)))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sdxlcn-fal-batch") as pool:
        futures = []
        for i, r in enumerate(requests):
            kw = dict(kwargs)
            if on_status_for is not None:
                kw["on_status"] = on_status_for(i)
            futures.append(pool.submit(run_remote, r, **kw))
        outcomes = []
        for f in futures:
            try:
                outcomes.append((f.result(), None))
            except BaseException as exc:  # noqa: BLE001 - re-raised below, in input order
                outcomes.append((None, exc))
    errors = [exc for _res, exc in outcomes if exc is not None]
    if errors and any(res is not None for res, _exc in outcomes):
        raise FalBatchIncomplete([res for res, _exc in outcomes], [exc for _res, exc in outcomes])
    for exc in errors:
        if isinstance(exc, FalCancelled):
            raise exc
    if errors:
        raise errors[0]
    return [res for res, _exc in outcomes]
