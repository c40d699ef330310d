"""Reaching the shared queue on Redis (``serve --queue redis://...``): the optional packages, the connection, the key
names, and Redis's faults in the store's words.

The packages (``rq``, ``redis``: the pack's ``redis`` extra) are imported only here, only when a Redis URL is given:
without them the start fails in one line naming what to install. A URL's password is never printed: what the server
says names the queue by :func:`shown` (scheme, host, port and database only).

Every key this server writes starts with :data:`PREFIX`; RQ writes its own under ``rq:`` (its queues are
:data:`QUEUES`). A request's keys, all named from its id (a UUID this server made) or its token (random hex):

- ``sdxlcn:serve:req:<id>`` a hash, the request's record (each field JSON): state, arguments, result, error, owner...;
- ``sdxlcn:serve:logs:<id>`` its log lines (a list of JSON objects); ``sdxlcn:serve:token:<token>`` its id;
- ``sdxlcn:serve:in:<id>:<name>`` an input image's bytes until it ends; ``sdxlcn:serve:img:<id>:<n>`` a result image;
- ``sdxlcn:serve:lease:<id>`` the run that holds it (a key that expires unless its worker's heartbeat renews it);
- ``sdxlcn:serve:deadlines`` (sorted set: id by ``x-fal-request-timeout``), ``sdxlcn:serve:running`` (set),
  ``sdxlcn:serve:hooks`` (set: webhooks due), ``sdxlcn:serve:hook:<id>`` (the node delivering it, expiring).
"""

from __future__ import annotations

import urllib.parse

PREFIX = "sdxlcn:serve"
QUEUES = {0: "sdxlcn", -1: "sdxlcn-low"}  # RQ's queues by priority (fal_headers.PRIORITIES), run in this order
JOB_FUNC = "sdxlcn.serve.run"  # the name RQ records for every job: workers resolve it themselves (redis_worker.py)
PACKAGES = "pip install 'comfyui-sdxl-controlnet-img2img[redis]' (or: pip install rq redis)"
CONNECT_TIMEOUT_S = 3.0
SOCKET_TIMEOUT_S = 15.0


def require_packages(option: str = "--queue") -> None:
    """One line naming what to install when ``rq`` or ``redis`` cannot be imported (``option``: what asked for
    them)."""
    from ..errors import SDXLCNError

    try:
        import redis  # noqa: F401
        import rq  # noqa: F401
    except ImportError as exc:
        raise SDXLCNError(f"{option} needs the Python packages rq and redis ({exc.name or exc} is missing): "
                          f"{PACKAGES}") from None


def shown(url: str) -> str:
    """The queue's URL as the server may say it: no user name or password, no query."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable Redis URL)"
    return f"{parts.scheme}://{host}{port}{parts.path or '/0'}"


def check_url(url: str, option: str = "--queue") -> None:
    """A Redis URL redis-py can use (``redis://``, ``rediss://`` or ``unix://``); one line naming ``option`` else."""
    from ..errors import SDXLCNError

    scheme = urllib.parse.urlsplit(url).scheme if "://" in url else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise SDXLCNError(f"{option} {shown(url) if scheme else url[:80]!r}: not a Redis URL; give "
                          "redis://[:password@]host:6379/0 (rediss:// for TLS)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
        db = (parts.path or "/0").strip("/") or "0"
        int(db)
    except ValueError:
        raise SDXLCNError(f"{option} {shown(url)}: not a Redis URL (the port or the database number is wrong); "
                          "give redis://[:password@]host:6379/0") from None


def connect(url: str, socket_timeout: float | None = SOCKET_TIMEOUT_S):
    """A client of the queue's Redis (bytes in, bytes out: images are kept as they are). redis-py reads the URL's
    password, TLS (``rediss://``) and database."""
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=socket_timeout,
                                health_check_interval=30)


def faults() -> tuple:
    """Redis errors that mean "not now" (unreachable, a timeout, loading its file after a restart, read-only, out of
    disk for its append-only file): the caller retries, or answers 503."""
    import redis

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError,
            redis.exceptions.ReadOnlyError)


def is_fault(exc: BaseException) -> bool:
    import redis

    if isinstance(exc, faults()):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(("MISCONF", "LOADING", "READONLY"))


def key(*parts) -> str:
    return ":".join((PREFIX, *(str(p) for p in parts)))
