"""The queue and its results on disk: SQLite (``queue.sqlite3``) with one folder per request next to it.

Every accepted request is written (input images synced to disk, then its row; an image given as a URL is stored
when it is downloaded, before the request runs) before its id is answered, so a restart loses no accepted request
and no finished result: requests that were running when the process stopped go back to the queue's front. A request's input images are deleted when it ends (completed, failed or cancelled); its
result (row and images) is deleted ``keep_results_s`` after it ended (7 days unless set; a webhook still due keeps it).
Below a floor of free space no request is accepted (:class:`~.disk.LowDisk`). Folder and file names come only from
ids this server made (UUIDs) and fixed names, never from a request.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from . import disk
from .database import TRANSIENT, Database, StoreDamaged, StoreUnavailable  # noqa: F401 - callers import them here
from .queue_rules import RUN_ORDER, QueueRules

log = logging.getLogger("sdxl_controlnet_img2img.serve")
INPUT_NAMES = ("image_url", "control_image_url")
MAX_LOG_LINES = 500
CALL_RETRY_S = 2.0  # how long a client's write (a submit, a cancel) retries before it is answered 503
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    token TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    args TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    logs TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT,
    error_type TEXT,
    error_status INTEGER,
    error_detail TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    webhook TEXT,
    webhook_done INTEGER NOT NULL DEFAULT 0,
    external TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(finished);
"""


def pending_inputs(store, job: Job) -> list[str]:
    """The inputs of ``job`` given as URLs whose bytes ``store`` (any store: its ``has_input``) does not hold yet; a
    data URI's are stored with the request."""
    return [name for name in INPUT_NAMES if job.args.get(name) and not store.has_input(job.id, name)]


class QueueFull(Exception):
    def __init__(self, waiting: int):
        self.waiting = waiting
        super().__init__(f"the queue is full ({waiting} requests waiting); try again later")


@dataclass
class Job:
    seq: int
    id: str
    token: str
    state: str  # IN_QUEUE, IN_PROGRESS, COMPLETED
    args: dict
    created: float
    started: float | None
    finished: float | None
    logs: list
    result: dict | None  # fal's output with file names: {"images": [{"file", "width", "height", ...}], "seed", ...}
    error: str | None
    error_type: str | None
    error_status: int | None  # the HTTP status the result call answers with
    error_detail: object
    cancel: bool
    webhook: str | None
    webhook_done: bool
    external: str | None  # the id of the host's own work item (ComfyUI's prompt id)
    priority: int = 0  # x-fal-queue-priority: higher runs first (:mod:`.queue_rules`)
    deadline: float | None = None  # x-fal-request-timeout: still waiting after this time, it ends


class Store(Database, QueueRules):
    """``retry_s``: how long a write keeps retrying a transient error before :class:`StoreUnavailable` (a submit's
    and a cancel's: :data:`CALL_RETRY_S` at most); ``busy_s``: how long one attempt waits for SQLite's lock (reads
    never wait for it: :mod:`.database`);
    ``keep_results_s`` and ``min_free_bytes``: see the module (defaults: ``SDXLCN_SERVE_KEEP_RESULTS_HOURS``, 168,
    and ``SDXLCN_SERVE_MIN_FREE_MB``, 256)."""

    def __init__(self, folder, *, retry_s: float = 30.0, busy_s: float = 1.0, keep_results_s: float | None = None,
                 min_free_bytes: int | None = None):
        self.folder = Path(folder)
        disk.private_dir(self.folder)
        disk.private_dir(self.folder / "requests")
        self.retry_s = retry_s
        if keep_results_s is None:
            keep_results_s = disk.setting(disk.KEEP_ENV, disk.KEEP_HOURS) * 3600
        if min_free_bytes is None:
            min_free_bytes = int(disk.setting(disk.MIN_FREE_ENV, disk.MIN_FREE_MB) * 2**20)
        self.keep_results_s, self.min_free_bytes = keep_results_s, min_free_bytes
        self._purged = 0.0  # when expired results were last looked for
        self.listeners: list = []  # fn(event, request_id) after each state change (:mod:`.queue_rules`)
        self._open(self.folder / "queue.sqlite3", busy_s)
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._add_rule_columns()

    # ---- reading --------------------------------------------------------------------------------
    @staticmethod
    def _job(row) -> Job | None:
        if row is None:
            return None
        detail = row["error_detail"]
        return Job(row["seq"], row["id"], row["token"], row["state"], json.loads(row["args"]), row["created"],
                   row["started"], row["finished"], json.loads(row["logs"]),
                   json.loads(row["result"]) if row["result"] else None, row["error"], row["error_type"],
                   row["error_status"], json.loads(detail) if detail else None, bool(row["cancel"]), row["webhook"],
                   bool(row["webhook_done"]), row["external"], row["priority"], row["deadline"])

    def _get(self, request_id: str) -> Job | None:
        return self._job(self._db.execute("SELECT * FROM jobs WHERE id=?", (request_id,)).fetchone())

    def get(self, request_id: str) -> Job | None:
        return self._read(lambda: self._get(request_id))

    def by_token(self, token: str) -> Job | None:
        return self._read(lambda: self._job(self._db.execute("SELECT * FROM jobs WHERE token=?", (token,)).fetchone()))

    def position(self, job: Job) -> int:
        """Requests waiting ahead of ``job`` (0: next)."""
        return self._read(lambda: self._ahead(job))

    def _waiting(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='IN_QUEUE'").fetchone()[0]

    def waiting(self) -> int:
        return self._read(self._waiting)

    def jobs(self, state: str) -> list[Job]:
        rows = self._read(lambda: self._db.execute("SELECT * FROM jobs WHERE state=? ORDER BY seq",
                                                   (state,)).fetchall())
        return [self._job(r) for r in rows]

    def job_dir(self, request_id: str) -> Path:
        return self.folder / "requests" / str(uuid.UUID(request_id))  # a UUID or ValueError: never a path piece

    def input_bytes(self, request_id: str, name: str) -> bytes:
        if name not in INPUT_NAMES:
            raise ValueError(name)
        return (self.job_dir(request_id) / name).read_bytes()

    def has_input(self, request_id: str, name: str) -> bool:
        if name not in INPUT_NAMES:
            raise ValueError(name)
        return (self.job_dir(request_id) / name).is_file()

    def image_path(self, request_id: str, index: int) -> Path:
        return self.job_dir(request_id) / f"{int(index)}.png"

    # ---- changing -------------------------------------------------------------------------------
    def add(self, args: dict, images: dict, webhook: str | None = None, max_waiting: int | None = None,
            priority: int = 0, deadline: float | None = None) -> Job:
        """Queue a request: its input images written and synced first, then its row. :class:`QueueFull` past
        ``max_waiting``, :class:`~.disk.LowDisk` below the free-space floor, :class:`StoreUnavailable` when it cannot
        be written (nothing is left behind then)."""
        if any(name not in INPUT_NAMES for name in images):
            raise ValueError(sorted(set(images) - set(INPUT_NAMES)))
        self.purge_expired()
        rid, token = str(uuid.uuid4()), secrets.token_hex(16)
        folder = self.job_dir(rid)

        def write():
            waiting = self._waiting()
            if max_waiting is not None and waiting >= max_waiting:
                raise QueueFull(waiting)
            disk.check_free(self.folder, sum(len(d) for d in images.values()), self.min_free_bytes)
            disk.private_dir(folder)
            for name, data in images.items():
                disk.write_synced(folder / name, data)
            disk.sync_dir(folder)
            disk.sync_dir(folder.parent)
            self._db.execute("INSERT INTO jobs (id, token, state, args, created, webhook, priority, deadline) "
                             "VALUES (?,?,?,?,?,?,?,?)",
                             (rid, token, "IN_QUEUE", json.dumps(args), time.time(), webhook, priority, deadline))
            self.changed.notify_all()
            return self._get(rid)

        try:
            job = self._do("queueing a request", write, min(self.retry_s, CALL_RETRY_S))
        except (QueueFull, disk.LowDisk, StoreUnavailable):
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._tell("queued", rid)
        return job

    def put_input(self, request_id: str, name: str, data: bytes) -> bool:
        """A downloaded input image, synced, for a request that has not ended; False (nothing kept) when it ended;
        :class:`~.disk.LowDisk` (nothing kept) when it would leave less than the free-space floor."""
        if name not in INPUT_NAMES:
            raise ValueError(name)
        path = self.job_dir(request_id) / name

        def write():  # under the store's lock, as a cancel's state change: an ended request's inputs stay deleted
            job = self._get(request_id)
            if job is None or job.state == "COMPLETED":
                return False
            disk.check_free(self.folder, len(data), self.min_free_bytes)
            disk.private_dir(path.parent)
            disk.replace_synced(path, data)
            disk.sync_dir(path.parent)
            self.changed.notify_all()  # it may run now (:meth:`claim`)
            return True

        return self._do("storing a downloaded input", write)


    def claim(self) -> Job | None:
        """The next waiting request (:data:`~.queue_rules.RUN_ORDER`) whose inputs are all stored (a request whose
        image URLs are still downloading waits: those after it run meanwhile), now IN_PROGRESS; None when none
        can run."""
        def first():
            rows = self._db.execute(f"SELECT * FROM jobs WHERE state='IN_QUEUE' ORDER BY {RUN_ORDER}").fetchall()
            return next((job for job in map(self._job, rows) if not pending_inputs(self, job)), None)

        def take(rid):
            cur = self._db.execute("UPDATE jobs SET state='IN_PROGRESS', started=? WHERE id=? AND state='IN_QUEUE'",
                                   (time.time(), rid))
            self.changed.notify_all()
            return self._get(rid) if cur.rowcount else None

        if not self._read(self._waiting):  # an idle poll takes no write lock
            return None
        self.expire_waiting()
        for _ in range(3):  # the one found may end meanwhile (cancelled): look again
            found = self._read(first)
            if found is None:
                return None  # nothing that can run: no write lock taken
            job = self._do("taking the next request", lambda: take(found.id))
            if job is not None:
                self._tell("started", job.id)
                return job
        return None

    def start(self, request_id: str, external: str | None = None) -> None:
        def write():
            cur = self._db.execute("UPDATE jobs SET state='IN_PROGRESS', started=?, external=COALESCE(?, external) "
                                   "WHERE id=? AND state='IN_QUEUE'", (time.time(), external, request_id))
            self.changed.notify_all()
            return cur.rowcount

        if self._do("starting a request", write):
            self._tell("started", request_id)

    def set_external(self, request_id: str, external: str) -> None:
        self._do("recording a request's work item",
                 lambda: self._db.execute("UPDATE jobs SET external=? WHERE id=?", (external, request_id)))

    def _log(self, request_id: str, message: str, level: str = "INFO") -> None:
        entry = {"message": str(message), "level": level, "source": "user",
                 "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"}
        row = self._db.execute("SELECT logs FROM jobs WHERE id=?", (request_id,)).fetchone()
        if row is None:
            return
        logs = json.loads(row["logs"])[-(MAX_LOG_LINES - 1):] + [entry]
        self._db.execute("UPDATE jobs SET logs=? WHERE id=?", (json.dumps(logs), request_id))
        self.changed.notify_all()

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        """A log line for the request's status; best effort: a line the store cannot take within 2 s is dropped
        (a progress line must not hold a running request)."""
        try:
            self._do("log", lambda: self._log(request_id, message, level), min(self.retry_s, 2.0))
        except StoreUnavailable as exc:
            log.info("serve: a log line of %s was dropped (%s)", request_id, exc)

    def complete(self, request_id: str, result: dict, images: list[bytes]) -> None:
        """Write the result images (each synced, then renamed into place), then mark the request COMPLETED with
        ``result`` (images named by file); its input images go."""
        folder = self.job_dir(request_id)

        def write():
            for i, data in enumerate(images):
                disk.replace_synced(folder / f"{i}.png", data)
            disk.sync_dir(folder)
            self._db.execute("UPDATE jobs SET state='COMPLETED', finished=?, result=? WHERE id=?",
                             (time.time(), json.dumps(result), request_id))
            self.changed.notify_all()

        self._do("storing a result", write)
        self._drop_inputs(request_id)
        self._tell("completed", request_id)

    def _fail(self, request_id: str, error: str, error_type: str, status: int = 500, detail=None) -> int:
        cur = self._db.execute("UPDATE jobs SET state='COMPLETED', finished=?, error=?, error_type=?, error_status=?, "
                               "error_detail=? WHERE id=? AND state!='COMPLETED'",
                               (time.time(), error, error_type, status,
                                json.dumps(detail if detail is not None else error), request_id))
        self.changed.notify_all()
        return cur.rowcount

    def fail(self, request_id: str, error: str, error_type: str, status: int = 500, detail=None) -> None:
        """The request ends with an error (unless it had ended); its input images go."""
        ended = self._do("storing a failure", lambda: self._fail(request_id, error, error_type, status, detail))
        self._drop_inputs(request_id)
        if ended:
            self._tell("failed", request_id)

    def cancel(self, request_id: str) -> str:
        """"cancelled" (it was waiting: it never runs), "requested" (running: stopped at its next step), "done"."""
        def write():
            job = self._get(request_id)
            if job is None or job.state == "COMPLETED":
                return "done"
            self._db.execute("UPDATE jobs SET cancel=1 WHERE id=?", (request_id,))
            if job.state == "IN_QUEUE":
                self._fail(request_id, "Request cancelled", "request_cancelled", 400, "Request cancelled")
                return "cancelled"
            return "requested"

        outcome = self._do("cancelling a request", lambda: self._tx(write), min(self.retry_s, CALL_RETRY_S))
        if outcome == "cancelled":
            self._drop_inputs(request_id)
            self._tell("failed", request_id)
        return outcome

    def _drop_inputs(self, request_id: str) -> None:
        """An ended request's input images (best effort: what stays is deleted with its folder when it expires)."""
        for name in INPUT_NAMES:
            try:
                (self.job_dir(request_id) / name).unlink(missing_ok=True)
            except OSError as exc:
                log.info("serve: the input %s of %s stays until the result expires (%s)", name, request_id, exc)

    def purge_expired(self, force: bool = False) -> int:
        """Deletes the requests that ended more than ``keep_results_s`` ago (row and folder), except those whose
        webhook is still due; at most once a minute unless ``force``. How many went."""
        now = time.monotonic()
        if not force and now - self._purged < 60.0:
            return 0
        self._purged = now
        cutoff = time.time() - self.keep_results_s
        try:
            ids = [r["id"] for r in self._read(lambda: self._db.execute(
                "SELECT id FROM jobs WHERE state='COMPLETED' AND finished<? AND (webhook IS NULL OR webhook_done=1)",
                (cutoff,)).fetchall())]
            for rid in ids:  # the row first: a folder without its row is never served, a row without files would be
                self._do("deleting an expired result",  # best effort, and a submit may be waiting on it
                         lambda rid=rid: self._db.execute("DELETE FROM jobs WHERE id=?", (rid,)),
                         min(self.retry_s, CALL_RETRY_S))
                shutil.rmtree(self.job_dir(rid), ignore_errors=True)
        except StoreUnavailable as exc:
            log.warning("serve: expired results stay for now (%s)", exc)
            return 0
        if ids:
            log.info("serve: deleted %d result(s) older than %g h", len(ids), self.keep_results_s / 3600)
        return len(ids)

    def cancel_requested(self, request_id: str) -> bool:
        row = self._read(lambda: self._db.execute("SELECT cancel FROM jobs WHERE id=?", (request_id,)).fetchone())
        return bool(row and row["cancel"])

    def requeue(self, request_id: str, why: str) -> bool:
        """A request left IN_PROGRESS by a worker that no longer runs it goes back to the queue's front (at its
        place); True when it did."""
        def write():
            cur = self._db.execute("UPDATE jobs SET state='IN_QUEUE', started=NULL, external=NULL "
                                   "WHERE id=? AND state='IN_PROGRESS'", (request_id,))
            if cur.rowcount:
                self._log(request_id, why)
            return bool(cur.rowcount)

        again = self._do("requeueing a request", lambda: self._tx(write))
        if again:
            self._tell("requeued", request_id)
        return again

    def requeue_interrupted(self) -> list[str]:
        """Requests that were running when the process stopped go back to the queue (at their place: the front).
        Waiting requests forget their host work item too (ComfyUI's prompt queue lives in memory): the backend
        hands them over again."""
        def write():
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state='IN_PROGRESS'").fetchall()]
            for rid in ids:
                self._db.execute("UPDATE jobs SET state='IN_QUEUE', started=NULL, external=NULL WHERE id=?", (rid,))
                self._log(rid, "the server restarted while this request ran; it is queued again")
            self._db.execute("UPDATE jobs SET external=NULL WHERE state='IN_QUEUE' AND external IS NOT NULL")
            return ids

        ids = self._do("requeueing interrupted requests", lambda: self._tx(write))
        for rid in ids:
            self._tell("requeued", rid)
        return ids

    def webhooks_due(self) -> list[Job]:
        """Finished requests whose webhook was not delivered (read by the webhook thread's every turn, which also
        deletes expired results, at most once a minute, and ends waiting requests past their timeout)."""
        self.purge_expired()
        self.expire_waiting()
        rows = self._read(lambda: self._db.execute("SELECT * FROM jobs WHERE state='COMPLETED' AND webhook IS NOT "
                                                   "NULL AND webhook_done=0 ORDER BY seq").fetchall())
        return [self._job(r) for r in rows]

    def webhook_delivered(self, request_id: str) -> None:
        self._do("recording a webhook",
                 lambda: self._db.execute("UPDATE jobs SET webhook_done=1 WHERE id=?", (request_id,)))

    def wait(self, predicate, timeout: float) -> bool:
        """Block until ``predicate()`` is true (checked at each change) or ``timeout`` seconds pass."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)
