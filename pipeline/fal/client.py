"""Run a :class:`GenerationRequest` on fal's hosted endpoint, through the official ``fal-client``.

The flow is fal's queue protocol: submit -> poll the status (queue position, logs) -> fetch the
result -> download/decode the images. The result has the same shape as the local path
(:class:`GenerationResult`, images as PIL).

- **Input images**: http(s) URLs and data URIs go as given. Local paths, ``file://`` URLs and PIL
  images become data URIs, or are uploaded to fal's storage (``fal_client``'s upload) when the
  encoded file is over :data:`UPLOAD_THRESHOLD_BYTES` (2 MiB; a data URI that large makes every
  request body heavy, and fal's request size limit is reached sooner).
- **Retries**: ``fal-client`` retries some failures itself for up to ~50 s. This module gives the
  client an HTTP transport that caps every HTTP call's timeout and hands transient failures
  (429, 5xx, dropped or refused connections, HTTP timeouts) to *our* bounded retry with backoff
  (:class:`FalSettings`). A submit is re-sent only when nothing reached fal (refused connection,
  429, 5xx answers), so a retry never pays twice.
- **Cancel**: every HTTP call runs in a worker thread while the caller's ``cancel_check`` is
  polled every 50 ms, so a cancel stops waiting at once and asks fal to cancel (``cancel_url``;
  fal honours it while the request is queued).
- **Paid results are never lost**: the request id is written to the request log
  (:mod:`.request_log`) before waiting starts; :func:`fetch_remote_result` gets a finished
  result by id.
- **The key** never appears in a message, a log line or an exception text (:mod:`.fal_key`).
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import os
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import request_log
from .errors import ImageInputError
from .fal_errors import (
    FalAuthError,
    FalCancelled,
    FalConnectionError,
    FalError,
    FalImageDownloadError,
    FalNoImages,
    FalRateLimited,
    FalRequestFailed,
    FalServerError,
    FalTimeout,
    FalValidationError,
)
from .fal_key import RedactingFilter, redact, resolve_key
from .generate import GenerationResult
from .images import decode_image, download, load_image
from .request import GenerationRequest

ENDPOINT = "fal-ai/fast-sdxl-controlnet-canny/image-to-image"
UPLOAD_THRESHOLD_BYTES = 2 * 1024 * 1024
DEFAULT_TIMEOUT_S = 600.0

log = logging.getLogger("sdxl_controlnet_img2img.fal")
if not any(isinstance(f, RedactingFilter) for f in log.filters):
    log.addFilter(RedactingFilter())


@dataclass(frozen=True)
class FalSettings:
    """Network behaviour of the remote path (the defaults suit real use; tests shrink them)."""

    http_timeout_s: float = 60.0  # cap on each single HTTP call (connect, read, write)
    max_retries: int = 4  # extra attempts after a transient failure (429, 5xx, connection, HTTP timeout)
    backoff_s: float = 1.0  # first retry delay; doubles each time
    backoff_max_s: float = 20.0
    poll_interval_s: float = 0.5  # between status polls
    upload_threshold_bytes: int = UPLOAD_THRESHOLD_BYTES
    max_download_bytes: int = 50 * 1024 * 1024  # per result image
    download_timeout_s: float = 60.0
    upload_repository: str | None = None  # fal_client's upload repository (None: its default, "fal_v3" then "fal")
    host_map: dict = field(default_factory=dict)  # {"rest.fal.ai": "127.0.0.1:8443"}: redirect fixed hosts (tests)


@dataclass
class FalStatus:
    """What ``on_status`` receives while waiting."""

    request_id: str
    state: str  # "SUBMITTED", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
    queue_position: int | None
    logs: list[str]  # new log lines since the previous call
    elapsed: float  # seconds since submission


StatusCallback = Callable[[FalStatus], None]
CancelCheck = Callable[[], bool]


# ---- transport: bounded timeouts, our own retry policy --------------------------------------

class _Transient(Exception):
    """A failure worth retrying: raised from the transport so fal-client's own retry loop passes it up."""

    def __init__(self, kind: str, message: str, status_code: int | None = None, sent: bool = True):
        self.kind = kind  # "http", "timeout", "connection"
        self.status_code = status_code
        self.sent = sent  # whether the request may have reached fal
        super().__init__(message)


def _detail_text(body) -> str:
    if isinstance(body, dict) and "detail" in body:
        body = body["detail"]
    if isinstance(body, (list, dict)):
        import json

        return json.dumps(body)
    return str(body)


def _make_transport(settings: FalSettings):
    import httpx

    try:
        from fal_client.client import BackupDomainTransport

        inner = BackupDomainTransport()
    except Exception:  # older/newer fal-client without it
        inner = httpx.HTTPTransport()

    class BoundedTransport(httpx.BaseTransport):
        def handle_request(self, request):
            cap = settings.http_timeout_s
            t = dict(request.extensions.get("timeout") or {})
            for k in ("connect", "read", "write", "pool"):
                v = t.get(k)
                t[k] = cap if v is None else min(v, cap)
            request.extensions["timeout"] = t
            mapped = settings.host_map.get(request.url.host)
            if mapped:
                host, _, port = mapped.partition(":")
                request.url = request.url.copy_with(host=host, port=int(port) if port else None)
                request.headers["Host"] = mapped
            try:
                response = inner.handle_request(request)
            except httpx.TimeoutException as exc:
                sent = not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
                raise _Transient("timeout", f"no answer within {cap:g} s ({type(exc).__name__})", sent=sent) from None
            except httpx.TransportError as exc:
                sent = not isinstance(exc, httpx.ConnectError)
                raise _Transient("connection", f"{type(exc).__name__}: {exc}", sent=sent) from None
            if response.status_code == 429 or response.status_code >= 500:
                try:
                    response.read()
                    try:
                        text = _detail_text(response.json())
                    except ValueError:
                        text = response.text[:300]
                finally:
                    response.close()
                # fal did not accept the request: retrying a submit cannot pay twice
                raise _Transient("http", text.strip(), status_code=response.status_code, sent=False)
            return response

        def close(self):
            inner.close()

    return BoundedTransport()


def _make_client(key: str, settings: FalSettings):
    """A ``fal_client.SyncClient`` whose HTTP client uses the bounded transport."""
    import fal_client
    import httpx

    class _Client(fal_client.SyncClient):
        @property
        def _client(self):  # noqa: D401 - replaces fal_client's cached_property of the same name
            c = self.__dict__.get("_sdxlcn_http")
            if c is None:
                c = httpx.Client(
                    transport=_make_transport(settings),
                    headers={"Authorization": self._auth.header_value, "User-Agent": getattr(
                        fal_client.client, "USER_AGENT", "fal-client (python)")},
                    timeout=settings.http_timeout_s,
                    follow_redirects=True,
                )
                self.__dict__["_sdxlcn_http"] = c
            return c

    return _Client(key=key, default_timeout=settings.http_timeout_s)


# ---- waiting with cancel and a deadline -----------------------------------------------------

class _Cancelled(Exception):
    pass


class _Deadline(Exception):
    pass


class _Waiter:
    def __init__(self, cancel_check: CancelCheck | None, deadline: float | None):
        self.cancel_check = cancel_check
        self.deadline = deadline

    def check(self):
        if self.cancel_check is not None and self.cancel_check():
            raise _Cancelled()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise _Deadline()

    def sleep(self, seconds: float):
        end = time.monotonic() + max(seconds, 0.0)
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def call(self, fn):
        """Run ``fn`` in a daemon thread; stop waiting at once on cancel or deadline."""
        box: dict = {}
        done = threading.Event()

        def target():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc
            finally:
                done.set()

        self.check()
        threading.Thread(target=target, name="sdxlcn-fal-call", daemon=True).start()
        while not done.wait(0.05):
            self.check()
        if "error" in box:
            raise box["error"]
        return box["value"]


def _notify(on_status: StatusCallback, status: FalStatus) -> None:
    """Call ``on_status``; an exception from it (e.g. ComfyUI's interrupt) cancels the request."""
    try:
        on_status(status)
    except Exception as exc:  # noqa: BLE001
        log.warning("fal: status callback raised %s; cancelling request %s", type(exc).__name__, status.request_id)
        raise _Cancelled() from exc


def local_failure_reason(exc: BaseException) -> str | None:
    """Why a *local* run cannot go on (so falling back to fal makes sense), or None.

    True for: CUDA/MPS out of memory, no usable GPU / CUDA driver, a device that cannot be used.
    Not for bad requests, missing model files or a user cancel (fal would not help, or must not run).
    """
    from .errors import GenerationCancelled, RequestError

    if isinstance(exc, (RequestError, GenerationCancelled, KeyboardInterrupt)):
        return None
    name = type(exc).__name__
    text = str(exc)
    low = text.lower()
    if name in ("OutOfMemoryError",) or "out of memory" in low:
        return f"local generation ran out of GPU memory ({name})"
    markers = ("no cuda gpus are available", "found no nvidia driver", "cuda driver", "torch not compiled with cuda",
               "cuda error", "mps backend out of memory", "no usable gpu", "cudnn_status",
               "requires accelerator, but not found")
    if any(m in low for m in markers):
        return f"no usable GPU for local generation ({name}: {text[:200]})"
    return None


def _http_error(exc, what: str, request_id: str | None) -> FalError:
    """A ``fal_client.FalClientHTTPError`` as one of our errors (redacted)."""
    code = exc.status_code
    detail = exc.message
    rid = f" (request {request_id})" if request_id else ""
    if code in (401, 403):
        text = redact(_detail_text(detail))
        return FalAuthError(
            f"fal refused the key (HTTP {code}) while {what}{rid}: {text}. "
            "Check FAL_KEY (or the key file) and your fal balance at https://fal.ai/dashboard.",
            code, text, request_id)
    if code == 422:
        items = detail if isinstance(detail, list) else []
        if items and isinstance(items[0], dict):
            first = items[0]
            loc = [str(p) for p in first.get("loc", []) if p not in ("body",)]
            fld = ".".join(loc) or "request"
            msg = redact(first.get("msg", "is invalid"))
            more = f" (and {len(items) - 1} more problem(s): {redact(_detail_text(items[1:]))})" if len(items) > 1 else ""
            return FalValidationError(fld, f"fal rejected this value: {msg}{more}{rid}", request_id)
        return FalValidationError("request", f"fal rejected the request: {redact(_detail_text(detail))}{rid}", request_id)
    if code == 404 and request_id:
        return FalRequestFailed(
            f"fal does not know request {request_id} (HTTP 404) while {what}: {redact(_detail_text(detail))}. "
            "Check the id and the endpoint; fal keeps results for a limited time.", request_id)
    return FalServerError(f"fal answered HTTP {code} while {what}{rid}: {redact(_detail_text(detail))}", code, request_id)


def _call_with_retries(waiter: _Waiter, fn, what: str, settings: FalSettings, request_id: str | None,
                       submit: bool = False):
    import fal_client

    attempt = 0
    while True:
        try:
            return waiter.call(fn)
        except fal_client.FalClientHTTPError as exc:
            raise _http_error(exc, what, request_id) from None
        except _Transient as exc:
            retryable = not (submit and exc.sent)
            if retryable and attempt < settings.max_retries:
                delay = min(settings.backoff_s * (2 ** attempt), settings.backoff_max_s)
                attempt += 1
                log.info("fal: %s failed (%s); retry %d/%d in %.1f s", what, redact(exc), attempt,
                         settings.max_retries, delay)
                waiter.sleep(delay)
                continue
            raise _transient_error(exc, what, attempt, request_id, submit) from None


def _transient_error(exc: _Transient, what: str, retries: int, request_id: str | None, submit: bool) -> FalError:
    tried = f" after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else ""
    rid = f" (request {request_id})" if request_id else ""
    text = redact(exc)
    recover = (f" The request may still finish: fetch it later by id {request_id}." if request_id else "")
    if exc.kind == "http" and exc.status_code == 429:
        return FalRateLimited(f"fal is rate-limiting this key (HTTP 429){tried} while {what}{rid}: {text}. "
                              f"Lower the concurrency or try again later.{recover}", request_id)
    if exc.kind == "http":
        return FalServerError(f"fal had a server error (HTTP {exc.status_code}){tried} while {what}{rid}: {text}. "
                              f"Try again later.{recover}", exc.status_code, request_id)
    if submit and exc.sent:
        note = (" The submission may have reached fal (check https://fal.ai/dashboard/requests) and was not "
                "re-sent, so it is not paid twice.")
    else:
        note = recover
    if exc.kind == "timeout":
        return FalTimeout(f"fal did not answer{tried} while {what}{rid}: {text}.{note}", request_id)
    return FalConnectionError(f"the connection to fal failed{tried} while {what}{rid}: {text}. "
                              f"Check the network.{note}", request_id)


# ---- input images ---------------------------------------------------------------------------

def _image_bytes(value, field_name: str) -> tuple[bytes, str, str] | None:
    """(bytes, content type, file name) for a local image input; None when it goes to fal as given."""
    from PIL import Image

    if isinstance(value, Image.Image):
        from .images import encode_image

        data, ctype = encode_image(value.convert("RGB") if value.mode not in ("RGB", "L") else value, "png")
        return data, ctype, f"{field_name}.png"
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise ImageInputError(field_name, f"cannot be sent to fal: got {type(value).__name__}")
    s = value.strip()
    low = s[:16].lower()
    if low.startswith(("http://", "https://", "data:")):
        return None
    if low.startswith("file://"):
        s = urllib.request.url2pathname(urllib.parse.urlsplit(s).path)
    p = Path(s).expanduser()
    if not p.is_file():
        raise ImageInputError(field_name, f"file not found: {p}; check the path")
    load_image(str(p), field_name)  # a readable image, or a clear error before anything is paid
    ctype = mimetypes.guess_type(p.name)[0] or "image/png"
    return p.read_bytes(), ctype, p.name


def prepare_image(value, field_name: str, client, waiter: _Waiter, settings: FalSettings) -> str:
    """The value of an image field as fal takes it: a URL, a data URI, or a fal storage URL."""
    got = _image_bytes(value, field_name)
    if got is None:
        return value.strip() if isinstance(value, str) else value
    data, ctype, name = got
    if len(data) <= settings.upload_threshold_bytes:
        return f"data:{ctype};base64,{base64.b64encode(data).decode('ascii')}"
    kwargs = {"file_name": name}
    if settings.upload_repository:
        kwargs["repository"] = settings.upload_repository
    log.info("fal: uploading %s (%d bytes) to fal storage", field_name, len(data))
    return _call_with_retries(waiter, lambda: client.upload(data, ctype, **kwargs),
                              f"uploading {field_name}", settings, None)


def fal_arguments(request: GenerationRequest) -> dict:
    """``request.to_fal_arguments()``, checked for what only works locally."""
    args = request.to_fal_arguments()
    for i, lora in enumerate(request.loras):
        if not str(lora.path).lower().startswith(("http://", "https://")):
            raise FalValidationError(
                f"loras[{i}].path",
                f"{lora.path!r} is a local file; fal needs a LoRA URL (https://...). Upload it (e.g. to Hugging "
                "Face or fal storage) or run locally")
    if not request.apply_canny:
        log.warning("fal: apply_canny=false is local-only; fal always runs Canny on the control image")
    return args


# ---- results ---------------------------------------------------------------------------------

def _decode_result(data, request: GenerationRequest | None, request_id: str, settings: FalSettings,
                   timings: dict) -> GenerationResult:
    if not isinstance(data, dict):
        raise FalNoImages(f"fal's result for request {request_id} is not an object; no images came back", request_id)
    entries = data.get("images") or []
    if not isinstance(entries, list) or not entries:
        raise FalNoImages(
            f"fal's result for request {request_id} holds no images (keys: {sorted(data)}); nothing to return. "
            "Try again (a new request is billed again).", request_id)
    images = []
    t = time.perf_counter()
    for i, entry in enumerate(entries):
        url = entry.get("url") if isinstance(entry, dict) else entry
        where = f"images[{i}]"
        if not isinstance(url, str) or not url:
            raise FalImageDownloadError(f"fal's result for request {request_id}: {where} has no url", request_id)
        try:
            if url[:5].lower() == "data:":
                img = load_image(url, where)
            elif url[:8].lower().startswith(("https://", "http://")):
                raw = download(url, where, max_bytes=settings.max_download_bytes, timeout=settings.download_timeout_s)
                img = decode_image(where, raw, f"the image at {where}")
            else:
                raise ImageInputError(where, "is neither an http(s) URL nor a data URI")
        except ImageInputError as exc:
            raise FalImageDownloadError(
                f"request {request_id}: result image {redact(exc)}. The result is kept by fal for a while: "
                f"fetch it again by id {request_id}.", request_id) from None
        images.append(img)
    timings["download"] = time.perf_counter() - t
    flags = data.get("has_nsfw_concepts")
    if not isinstance(flags, list):
        flags = [False] * len(images)
    remote_t = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    all_timings = {f"fal_{k}": float(v) for k, v in remote_t.items() if isinstance(v, (int, float))}
    all_timings.update(timings)
    seed = data.get("seed", request.seed if request is not None else None)
    prompt = data.get("prompt") or (request.prompt if request is not None else "")
    expanded = data.get("expanded_prompt")
    if expanded is None and request is not None and request.expand_prompt and data.get("prompt") and \
            data.get("prompt") != request.prompt:
        expanded = data.get("prompt")
    return GenerationResult(
        images=images,
        seed=int(seed) if seed is not None else 0,
        has_nsfw_concepts=[bool(f) for f in flags],
        width=images[0].width,
        height=images[0].height,
        prompt=prompt,
        expanded_prompt=expanded,
        timings=all_timings,
    )


def _wait_and_fetch(client, handle_factory, request_id: str, endpoint: str, waiter: _Waiter, settings: FalSettings,
                    on_status: StatusCallback | None, started: float, timings: dict, request=None,
                    request_log_dir=None) -> GenerationResult:
    import fal_client

    handle = handle_factory()
    seen_logs = 0
    last_state = None
    t_wait = time.perf_counter()
    try:
        while True:
            status = _call_with_retries(waiter, lambda: handle.status(with_logs=True), "polling the status",
                                        settings, request_id)
            logs = getattr(status, "logs", None) or []
            new = [redact(entry.get("message", entry) if isinstance(entry, dict) else entry) for entry in logs[seen_logs:]]
            seen_logs = max(seen_logs, len(logs))
            if isinstance(status, fal_client.Queued):
                state, pos = "IN_QUEUE", status.position
            elif isinstance(status, fal_client.InProgress):
                state, pos = "IN_PROGRESS", None
            else:
                state, pos = "COMPLETED", None
            for line in new:
                log.info("fal %s: %s", request_id, line)
            if on_status is not None and (new or state != last_state or state == "IN_QUEUE"):
                _notify(on_status, FalStatus(request_id, state, pos, new, time.monotonic() - started))
            last_state = state
            if isinstance(status, fal_client.Completed):
                if status.error:
                    raise FalRequestFailed(
                        f"fal reported an error for request {request_id}: {redact(status.error)}"
                        + (f" ({status.error_type})" if status.error_type else ""), request_id)
                break
            waiter.sleep(settings.poll_interval_s)
        timings["fal_wait"] = time.perf_counter() - t_wait
        t = time.perf_counter()
        data = _call_with_retries(waiter, lambda: handle.get(interval=settings.poll_interval_s),
                                  "fetching the result", settings, request_id)
        timings["fetch"] = time.perf_counter() - t
        result = _decode_result(data, request, request_id, settings, timings)
    except _Cancelled:
        log.warning("fal: cancelling request %s", request_id)
        try:
            # a short, bounded cancel: the user asked to stop
            _Waiter(None, time.monotonic() + min(settings.http_timeout_s, 10.0)).call(handle.cancel)
            cancelled = "fal was asked to cancel it (fal honours this while the request is queued)"
        except Exception as exc:  # noqa: BLE001
            cancelled = f"asking fal to cancel it failed ({redact(type(exc).__name__)})"
        if request_log_dir is not None:
            request_log.append(request_log_dir, "cancelled", request_id, endpoint=endpoint)
        raise FalCancelled(f"cancelled while waiting for fal request {request_id}; {cancelled}.", request_id) from None
    except _Deadline:
        raise FalTimeout(
            f"fal request {request_id} did not finish within the time allowed. It may still finish (and is billed): "
            f"fetch it later by id {request_id} (node input 'request_id', or "
            f"`python -m sdxl_controlnet_img2img fal-fetch --request-id {request_id} --out DIR`).", request_id) from None
    if request_log_dir is not None:
        request_log.append(request_log_dir, "completed", request_id, endpoint=endpoint)
    return result


# ---- public API ------------------------------------------------------------------------------

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
) -> GenerationResult:
    """Run ``request`` on fal and return the same result shape as the local path.

    ``key`` / ``key_file``: see :func:`fal_key.resolve_key` (environment first, then the file).
    ``on_status(FalStatus)`` is called on every state change, queue position and new log lines.
    ``cancel_check()`` returning true cancels: fal is asked to cancel and :class:`FalCancelled` is
    raised at once. ``timeout_s`` bounds the whole wait (:class:`FalTimeout`, with the request id).
    ``request_log_dir``: where the request id is recorded before waiting (see :mod:`.request_log`).
    A request without a seed gets a random one first, so the result is reproducible.
    Every failure is a :class:`FalError` subclass with the key redacted.
    """
    settings = settings or FalSettings()
    request = request.with_seed()
    key = resolve_key(key, key_file)
    started = time.monotonic()
    waiter = _Waiter(cancel_check, started + timeout_s if timeout_s else None)
    timings: dict[str, float] = {}
    client = _make_client(key, settings)
    try:
        try:
            args = fal_arguments(request)
            t = time.perf_counter()
            for name in ("image_url", "control_image_url"):
                args[name] = prepare_image(args[name], name, client, waiter, settings)
            timings["prepare"] = time.perf_counter() - t
            handle = _call_with_retries(waiter, lambda: client.submit(endpoint, args), "submitting the request",
                                        settings, None, submit=True)
        except _Cancelled:
            raise FalCancelled("cancelled before the request was submitted to fal (nothing was billed)") from None
        except _Deadline:
            raise FalTimeout("timed out before the request was submitted to fal (nothing was billed)") from None
        request_id = handle.request_id
        if request_log_dir is not None:
            request_log.append(request_log_dir, "submitted", request_id, endpoint=endpoint, seed=request.seed,
                               prompt=request.prompt[:200], num_images=request.num_images)
        log.info("fal: submitted request %s to %s", request_id, endpoint)
        try:
            if on_status is not None:
                _notify(on_status, FalStatus(request_id, "SUBMITTED", None, [], time.monotonic() - started))
        except _Cancelled:
            waiter = _Waiter(lambda: True, None)  # cancel at the first check, through the usual path
        return _wait_and_fetch(client, lambda: handle, request_id, endpoint, waiter, settings, on_status, started,
                               timings, request=request, request_log_dir=request_log_dir)
    finally:
        _close(client)


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
) -> GenerationResult:
    """Get the result of an already submitted request by its id (waiting for it when still running).

    The endpoint comes from ``endpoint``, else the request log's record of the id, else :data:`ENDPOINT`.
    Nothing new is submitted, so nothing is billed again.
    """
    settings = settings or FalSettings()
    request_id = (request_id or "").strip()
    if not request_id:
        raise FalValidationError("request_id", "is empty; give the id of a submitted fal request")
    if endpoint is None and request_log_dir is not None:
        rec = request_log.find(request_log_dir, request_id)
        endpoint = rec.get("endpoint") if rec else None
    endpoint = endpoint or ENDPOINT
    key = resolve_key(key, key_file)
    started = time.monotonic()
    waiter = _Waiter(cancel_check, started + timeout_s if timeout_s else None)
    client = _make_client(key, settings)
    try:
        return _wait_and_fetch(client, lambda: client.get_handle(endpoint, request_id), request_id, endpoint, waiter,
                               settings, on_status, started, {}, request=None, request_log_dir=request_log_dir)
    finally:
        _close(client)


def run_remote_batch(requests, *, max_concurrency: int = 4, on_status_for: Callable[[int], StatusCallback] | None = None,
                     **kwargs) -> list[GenerationResult]:
    """Run several requests with at most ``max_concurrency`` in flight; results in input order.

    Every request runs to its end (each is billed, so none is abandoned half-way); then the first
    failure is raised: a :class:`FalCancelled` if any, else the first in input order. ``kwargs``
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
    for exc in errors:
        if isinstance(exc, FalCancelled):
            raise exc
    if errors:
        raise errors[0]
    return [res for res, _exc in outcomes]


def _close(client) -> None:
    c = client.__dict__.get("_sdxlcn_http")
    if c is not None:
        try:
            c.close()
        except Exception:  # noqa: BLE001
            pass
