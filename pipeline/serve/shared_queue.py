"""``serve --queue redis://...``: a node of a shared queue on Redis (:mod:`.redis_store`, :mod:`.redis_worker`), as
the command line sets it up. Every node answers fal's whole protocol for every request; ``--workers 0`` makes an API
node that loads no models, a node with ``--checkpoint``/``--controlnet`` also runs requests (one worker per
``--device``). The packages are imported only here, only when ``--queue`` is given.

The nodes share their webhook signing key through Redis (:func:`share_signing_key`): the first node's key is every
node's, so ``/.well-known/jwks.json`` is the same whichever node a receiver asks.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("sdxl_controlnet_img2img.serve")
QUEUE_ENV = "SDXLCN_SERVE_QUEUE"
LEASE_S = 60.0  # a killed worker's request runs again about this long (plus a quarter) after its last heartbeat


def add_queue_options(p) -> None:
    p.add_argument("--queue", default=os.environ.get(QUEUE_ENV) or None, metavar="REDIS_URL",
                   help="share the queue, results and images with other serve processes through Redis "
                        "(redis://[:password@]host:6379/0, rediss:// for TLS): any of them answers for any request. "
                        f"Needs pip install 'comfyui-sdxl-controlnet-img2img[redis]'. Default: {QUEUE_ENV} (which "
                        "keeps a password off the command line), else this machine's own queue in --data-dir")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="0: an API node of the --queue, loading no models (no --checkpoint/--controlnet); "
                        "default: one worker per --device")
    p.add_argument("--worker-lease", type=float, default=LEASE_S, metavar="SECONDS",
                   help=f"with --queue: seconds after a worker's last heartbeat (sent every sixth of it) before its "
                        f"request runs on another worker (default {LEASE_S:g}: a killed worker's request runs again "
                        f"within about {LEASE_S * 1.25:g} s)")


def check_queue_options(args) -> None:
    """What the queue options alone rule out (one line each), before anything is opened."""
    from ..errors import SDXLCNError
    from .redis_conn import check_url, require_packages

    workers = getattr(args, "workers", None)
    if workers is not None and workers != 0:
        raise SDXLCNError(f"--workers {workers}: only 0 is taken (an API node); a node runs one worker per --device")
    if workers == 0 and not args.queue:
        raise SDXLCNError("--workers 0 needs --queue redis://...: an API node only queues requests for the workers "
                          "of a shared queue")
    if workers != 0 and not (args.checkpoint and args.controlnet):
        raise SDXLCNError("--checkpoint and --controlnet are required (or --queue redis://... --workers 0 for an API "
                          "node that loads no models)")
    if args.queue:
        check_url(args.queue)
        if not args.worker_lease >= 2:
            raise SDXLCNError(f"--worker-lease {args.worker_lease:g}: give at least 2 seconds")
        require_packages()


def refuse_wrong_password(store) -> None:
    """A Redis that answers but refuses this node's password (or wants one) is a setting to fix, not an outage to
    wait out: one line, before the models load."""
    try:
        store.r.ping()
    except Exception as exc:  # noqa: BLE001 - only the refused password is ours to say; the rest is an outage
        said = str(exc)
        if type(exc).__name__.startswith("Authentication") or said.startswith(("WRONGPASS", "NOAUTH", "invalid")):
            from ..errors import SDXLCNError

            raise SDXLCNError(f"--queue: the Redis at {store.shown} refused this node's password ({said[:80]}); give "
                              "the one Redis was started with (requirepass) in the URL, redis://:PASSWORD@host:6379/0 "
                              "(or in SDXLCN_SERVE_QUEUE, which keeps it off the command line)") from None


def open_queue_store(args):
    """The shared queue's store for ``args.queue``; a Redis that does not answer yet is said, not fatal (submits
    answer 503 and workers wait until it does)."""
    from .redis_store import RedisStore

    store = RedisStore(args.queue, args.data_dir, lease_s=args.worker_lease)
    refuse_wrong_password(store)
    problem = store.health()
    if problem:
        print(f"warning: {problem}; submits answer 503 and workers wait until it answers", file=sys.stderr,
              flush=True)
    else:
        share_signing_key(store)
    return store


def queue_workers(store, pipes: dict, args, **options):
    """The node's backend: its workers (none on an API node), heartbeats and the search for abandoned runs."""
    from .redis_worker import RedisWorkers

    print(f"shared queue at {store.shown}: {'an API node' if not pipes else f'{len(pipes)} worker(s)'}, worker "
          f"lease {args.worker_lease:g} s", file=sys.stderr, flush=True)
    return RedisWorkers(store, pipes, lease_s=args.worker_lease, **options)


def share_signing_key(store) -> None:
    """The queue's webhook signing key in this node's data folder: the first node's (kept in Redis), so that every
    node signs and publishes the same key. Best effort: a node that cannot read it keeps its own, and says so."""
    from .redis_conn import key
    from .signing import KEY_FILE, Signer

    path = Path(store.folder) / KEY_FILE
    try:
        Signer.for_folder(store.folder)  # this node's own, made if there is none
        mine = path.read_bytes()
        store.redis_call("sharing the webhook key", lambda: store.r.set(key("webhook_signing_key"), mine, nx=True))
        shared = store.redis_call("sharing the webhook key", lambda: store.r.get(key("webhook_signing_key")))
        if shared and shared != mine:
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.shared")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, shared)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            log.info("serve: this node signs its webhooks with the shared queue's key (%s)", path)
    except Exception as exc:  # noqa: BLE001 - webhooks are still signed, with this node's own key
        print(f"warning: the shared queue's webhook signing key could not be read ({exc}); this node signs with its "
              f"own key in {path}", file=sys.stderr, flush=True)
