"""What the remote path talks to and how patiently: the endpoint, network settings, the status record.

The logger lives here too, with the key-redacting filter on it, so every module of the fal client
logs through it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

from .key import RedactingFilter

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
    # a cancel, time limit or Ctrl-C during a submit waits this long for fal's answer (a submit fal accepted is
    # billed: its id is recorded and it is cancelled, never abandoned)
    submit_answer_s: float = 120.0
    upload_threshold_bytes: int = UPLOAD_THRESHOLD_BYTES
    max_download_bytes: int = 50 * 1024 * 1024  # per result image
    download_timeout_s: float = 60.0
    upload_repository: str | None = None  # fal_client's upload repository (None: its default, "fal_v3" then "fal")
    host_map: dict = field(default_factory=dict)  # {"rest.fal.ai": "127.0.0.1:8443"}: redirect fixed hosts (tests)


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
