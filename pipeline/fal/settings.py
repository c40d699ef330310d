"""What the remote path talks to and how patiently: the endpoint, network settings, the status record.

The logger lives here too, with the key-redacting filter on it, so every module of the fal client
logs through it; and the filter that keeps httpx's "HTTP Request: GET ..." INFO line per call out of the log for
the calls the pack makes (:func:`own_http_calls`): a status poll every half second filled ComfyUI's log, twice
over (fal-client's transport sends each request through a second httpx client, which logs it again). The client
says what matters in its own lines: one per status change, per line of fal's log, per retry.
"""

from __future__ import annotations

import contextvars
import logging
import os
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from ..endpoint import ENDPOINT  # noqa: F401 - the client's default endpoint
from ..key_policy import is_loopback_address
from .errors import FalValidationError
from .key import RedactingFilter

UPLOAD_THRESHOLD_BYTES = 2 * 1024 * 1024
DEFAULT_TIMEOUT_S = 600.0

# a self-hosted endpoint of fal's queue API (this pack's `serve`, or a ComfyUI with the pack): set outside any
# workflow, so a shared workflow cannot send anyone's key elsewhere
ENDPOINT_URL_ENV = "SDXLCN_FAL_URL"

log = logging.getLogger("sdxl_controlnet_img2img.fal")
if not any(isinstance(f, RedactingFilter) for f in log.filters):
    log.addFilter(RedactingFilter())

_OWN_CALL = contextvars.ContextVar("sdxlcn_fal_own_http_call", default=False)


class _DropOwnRequestLines(logging.Filter):
    """On httpx's logger: drops the records of calls made inside :func:`own_http_calls` (others' stay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OWN_CALL.get()


@contextmanager
def own_http_calls():
    """httpx's per-request log lines stay out of the log for the calls made in this block (in this thread)."""
    token = _OWN_CALL.set(True)
    try:
        yield
    finally:
        _OWN_CALL.reset(token)


_httpx_log = logging.getLogger("httpx")
if not any(isinstance(f, _DropOwnRequestLines) for f in _httpx_log.filters):
    _httpx_log.addFilter(_DropOwnRequestLines())


@dataclass(frozen=True)
class FalSettings:
    """Network behaviour of the remote path (the defaults suit real use; tests shrink them)."""

    http_timeout_s: float = 60.0  # cap on each single HTTP call (connect, read, write)
    max_retries: int = 4  # extra attempts after a transient failure (429, 5xx, connection, HTTP timeout)
    backoff_s: float = 1.0  # first retry delay; doubles each time
    backoff_max_s: float = 20.0
    poll_interval_s: float = 0.5  # between status polls
    # a cancel, time limit or Ctrl-C during a submit waits this long for fal's answer (a submit fal accepted is
    # billed: its id is recorded and it is cancelled, never abandoned)
    submit_answer_s: float = 120.0
    upload_threshold_bytes: int = UPLOAD_THRESHOLD_BYTES
    max_download_bytes: int = 50 * 1024 * 1024  # per result image
    download_timeout_s: float = 60.0
    upload_repository: str | None = None  # fal_client's upload repository (None: its default, "fal_v3" then "fal")
    host_map: dict = field(default_factory=dict)  # {"rest.fal.ai": "127.0.0.1:8443"}: redirect fixed hosts (tests)
    # fal's queue and run hosts are sent here instead (SDXLCN_FAL_URL): a self-hosted endpoint; images then go as
    # data URIs (no uploads to fal's storage)
    endpoint_url: str | None = field(default_factory=lambda: endpoint_url_from_env())

    def __post_init__(self):
        if self.endpoint_url is not None:
            object.__setattr__(self, "endpoint_url", check_endpoint_url(self.endpoint_url))
            if self.upload_threshold_bytes == UPLOAD_THRESHOLD_BYTES:
                object.__setattr__(self, "upload_threshold_bytes", 1 << 62)

    @property
    def target(self) -> str:
        """Who runs the requests, as messages name it (:func:`target_name`)."""
        return target_name(self.endpoint_url)

    @property
    def server(self) -> str | None:
        """A self-hosted server as messages name it; None when the requests go to fal."""
        return None if self.endpoint_url is None else self.target

    @property
    def queue(self) -> str:
        """The queue a request waits in, as messages name it."""
        return "fal's queue" if self.endpoint_url is None else f"the queue of {self.target}"

    def billing(self, words: str, otherwise: str = "") -> str:
        """``words`` (about fal's billing) when the requests go to fal; ``otherwise`` on a self-hosted server, which
        bills nothing."""
        return words if self.endpoint_url is None else otherwise

    def redirect(self, url: str) -> str | None:
        """``url`` moved to :attr:`endpoint_url` when it is one of fal's queue/run URLs that fal_client built;
        None when it stays as it is."""
        if self.endpoint_url is None or url.startswith(self.endpoint_url + "/"):
            return None
        import fal_client.client as fc

        parts = urllib.parse.urlsplit(url)
        for fmt, sub in ((fc.QUEUE_URL_FORMAT, ""), (fc.RUN_URL_FORMAT, "/run")):
            home = urllib.parse.urlsplit(fmt)
            if parts.netloc == home.netloc and parts.path.startswith(home.path):
                rest = parts.path[len(home.path):].lstrip("/")
                return f"{self.endpoint_url}{sub}/{rest}" + (f"?{parts.query}" if parts.query else "")
        return None


def check_endpoint_url(raw: str) -> str:
    """A self-hosted endpoint's base URL (no trailing slash), or :class:`FalValidationError` naming the variable."""
    text = str(raw).strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment or \
            parts.username or parts.password:
        raise FalValidationError(ENDPOINT_URL_ENV, f"{text[:80]!r} is not a base URL such as https://gpu-box:8443 "
                                                   "(serve) or https://gpu-box:8188/sdxlcn/fal (ComfyUI); fix it, or "
                                                   "unset it to use fal itself")
    if parts.scheme == "http" and not is_loopback_address(parts.hostname):
        raise FalValidationError(ENDPOINT_URL_ENV, f"{text[:80]!r} is plain http to another machine: the key would "
                                                   "travel in clear text. Use https:// (serve --tls-cert/--tls-key, "
                                                   "or ComfyUI's --tls-certfile/--tls-keyfile); http is accepted "
                                                   "only for 127.0.0.1")
    return text.rstrip("/")


def check_followed_url(url: str) -> None:
    """Every URL the client sends the key to, a status, result or cancel URL a server answered and each redirect
    included: https, or http to this machine only; :class:`FalValidationError` before anything is sent otherwise."""
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback_address(parts.hostname or "")):
        return
    shown = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"[:120]
    raise FalValidationError("url", f"the server sent the client on to {shown!r}, not https: the key would travel "
                                    "in clear text, so nothing was sent there. A self-hosted server must answer https "
                                    "URLs (serve behind a TLS proxy: --public-url https://... or --trusted-proxy)")


def endpoint_url_from_env() -> str | None:
    value = os.environ.get(ENDPOINT_URL_ENV, "").strip()
    return check_endpoint_url(value) if value else None


def target_name(endpoint_url: str | None) -> str:
    """Who runs the requests, as messages name it: "fal", or "your server at <host:port>" for a self-hosted endpoint
    (its host and port only; :func:`check_endpoint_url` refuses a URL that holds a user name or password)."""
    if endpoint_url is None:
        return "fal"
    return f"your server at {urllib.parse.urlsplit(endpoint_url).netloc}"


def current_target() -> str:
    """:func:`target_name` for the endpoint ``SDXLCN_FAL_URL`` names now (a value that is no base URL is refused by the
    run itself, with its own error: "fal" here)."""
    try:
        return target_name(endpoint_url_from_env())
    except FalValidationError:
        return "fal"


@dataclass
class FalStatus:
    """What ``on_status`` receives while waiting."""

    request_id: str
    state: str  # "SUBMITTED", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"; "STOPPING" (request_id "": a stop came
    # during the submit, we wait for fal's answer; ``logs`` says so)
    queue_position: int | None
    logs: list[str]  # new log lines since the previous call
    elapsed: float  # seconds since submission


StatusCallback = Callable[[FalStatus], None]
CancelCheck = Callable[[], bool]
