"""fal's request headers that shape how a submitted request waits, read at submit (422 naming a bad one).

- ``x-fal-request-timeout: N`` (fal_client's ``start_timeout``): a request still waiting N seconds after its submit
  ends, COMPLETED with ``error_type`` ``request_timeout``; its result answers 504 with
  ``X-Fal-Request-Timeout-Type: user``, which neither of fal's clients retries. Once it runs, it runs to the end.
- ``x-fal-queue-priority: normal|low``: a ``low`` request waits behind every ``normal`` one (in order among its own).
- ``x-fal-no-retry``: accepted. fal stops retrying such a request on a retryable failure; this server never runs a
  failed request again (only one a stop or a fault interrupted before it finished is queued again).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from .protocol import invalid

TIMEOUT_HEADER = "x-fal-request-timeout"
TIMEOUT_TYPE_HEADER = "X-Fal-Request-Timeout-Type"
PRIORITY_HEADER = "x-fal-queue-priority"
NO_RETRY_HEADER = "x-fal-no-retry"
ERROR_TYPE_HEADER = "X-Fal-Error-Type"
PRIORITIES = {"normal": 0, "low": -1}  # the store runs the highest first, then the oldest
TIMED_OUT = "request_timeout"  # the error_type of a request that waited past its timeout (fal's name)


@dataclass(frozen=True)
class QueueOptions:
    priority: int = PRIORITIES["normal"]
    deadline: float | None = None  # wall-clock time after which the request, still waiting, ends (504)


def queue_options(headers: dict, now: float | None = None) -> QueueOptions:
    """The submit's queue options from its headers (lower-case names); 422 naming the header that is wrong."""
    deadline = None
    raw = headers.get(TIMEOUT_HEADER)
    if raw is not None:
        try:
            seconds = float(raw.strip())
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            raise invalid(["header", TIMEOUT_HEADER], f"must be a number of seconds above 0, got {raw[:40]!r}")
        deadline = (time.time() if now is None else now) + seconds
    priority = PRIORITIES["normal"]
    raw = headers.get(PRIORITY_HEADER)
    if raw is not None:
        name = raw.strip().lower()
        if name not in PRIORITIES:
            raise invalid(["header", PRIORITY_HEADER], f"must be one of {', '.join(PRIORITIES)}, got {raw[:40]!r}")
        priority = PRIORITIES[name]
    return QueueOptions(priority, deadline)


def result_headers(job) -> dict:
    """What a failed request's result answer adds, as fal's does: ``X-Fal-Error-Type``, and the timeout's type for a
    request that waited past its timeout."""
    out = {ERROR_TYPE_HEADER: job.error_type} if job.error_type else {}
    if job.error_type == TIMED_OUT:
        out[TIMEOUT_TYPE_HEADER] = "user"
    return out
