"""The queue and its results on disk: SQLite (``queue.sqlite3``) with one folder per request next to it.

Every accepted request is written (row and input images) before its id is answered, so a restart loses no accepted
request and no finished result: requests that were running when the process stopped go back to the queue's front.
Folder and file names come only from ids this server made (UUIDs) and fixed names, never from a request.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

INPUT_NAMES = ("image_url", "control_image_url")
MAX_LOG_LINES = 500
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
"""


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


class Store:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "requests").mkdir(exist_ok=True)
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)  # notified on every state change
        self._db = sqlite3.connect(str(self.folder / "queue.sqlite3"), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
                   bool(row["webhook_done"]), row["external"])

    def get(self, request_id: str) -> Job | None:
        with self._lock:
            return self._job(self._db.execute("SELECT * FROM jobs WHERE id=?", (request_id,)).fetchone())

    def by_token(self, token: str) -> Job | None:
        with self._lock:
            return self._job(self._db.execute("SELECT * FROM jobs WHERE token=?", (token,)).fetchone())

    def position(self, job: Job) -> int:
        """Requests waiting ahead of ``job`` (0: next)."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='IN_QUEUE' AND seq<?",
                                    (job.seq,)).fetchone()[0]

    def waiting(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE state='IN_QUEUE'").fetchone()[0]

    def jobs(self, state: str) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state=? ORDER BY seq", (state,)).fetchall()
        return [self._job(r) for r in rows]

    def job_dir(self, request_id: str) -> Path:
        return self.folder / "requests" / str(uuid.UUID(request_id))  # a UUID or ValueError: never a path piece

    def input_bytes(self, request_id: str, name: str) -> bytes:
        if name not in INPUT_NAMES:
            raise ValueError(name)
        return (self.job_dir(request_id) / name).read_bytes()

    def image_path(self, request_id: str, index: int) -> Path:
        return self.job_dir(request_id) / f"{int(index)}.png"

    # ---- changing -------------------------------------------------------------------------------
    def add(self, args: dict, images: dict, webhook: str | None = None, max_waiting: int | None = None) -> Job:
        """Queue a request (its input images written first); :class:`QueueFull` past ``max_waiting``."""
        rid = str(uuid.uuid4())
        folder = self.job_dir(rid)
        with self._lock:
            waiting = self.waiting()
            if max_waiting is not None and waiting >= max_waiting:
                raise QueueFull(waiting)
            folder.mkdir(parents=True)
            for name, data in images.items():
                if name not in INPUT_NAMES:
                    raise ValueError(name)
                (folder / name).write_bytes(data)
            self._db.execute("INSERT INTO jobs (id, token, state, args, created, webhook) VALUES (?,?,?,?,?,?)",
                             (rid, secrets.token_hex(16), "IN_QUEUE", json.dumps(args), time.time(), webhook))
            self.changed.notify_all()
            return self.get(rid)

    def claim(self) -> Job | None:
        """The oldest waiting request, now IN_PROGRESS; None when the queue is empty."""
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE state='IN_QUEUE' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            self.start(row["id"])
            return self.get(row["id"])

    def start(self, request_id: str, external: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='IN_PROGRESS', started=?, external=COALESCE(?, external) "
                             "WHERE id=? AND state='IN_QUEUE'", (time.time(), external, request_id))
            self.changed.notify_all()

    def set_external(self, request_id: str, external: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET external=? WHERE id=?", (external, request_id))

    def log(self, request_id: str, message: str, level: str = "INFO") -> None:
        entry = {"message": str(message), "level": level, "source": "user",
                 "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"}
        with self._lock:
            row = self._db.execute("SELECT logs FROM jobs WHERE id=?", (request_id,)).fetchone()
            if row is None:
                return
            logs = json.loads(row["logs"])[-(MAX_LOG_LINES - 1):] + [entry]
            self._db.execute("UPDATE jobs SET logs=? WHERE id=?", (json.dumps(logs), request_id))
            self.changed.notify_all()

    def complete(self, request_id: str, result: dict, images: list[bytes]) -> None:
        """Write the result images, then mark the request COMPLETED with ``result`` (images named by file)."""
        folder = self.job_dir(request_id)
        for i, data in enumerate(images):
            tmp = folder / f"{i}.png.part"
            tmp.write_bytes(data)
            tmp.replace(folder / f"{i}.png")
        with self._lock:
            self._db.execute("UPDATE jobs SET state='COMPLETED', finished=?, result=? WHERE id=?",
                             (time.time(), json.dumps(result), request_id))
            self.changed.notify_all()

    def fail(self, request_id: str, error: str, error_type: str, status: int = 500, detail=None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='COMPLETED', finished=?, error=?, error_type=?, error_status=?, "
                             "error_detail=? WHERE id=? AND state!='COMPLETED'",
                             (time.time(), error, error_type, status, json.dumps(detail if detail is not None else
                                                                                  error), request_id))
            self.changed.notify_all()

    def cancel(self, request_id: str) -> str:
        """"cancelled" (it was waiting: it never runs), "requested" (running: stopped at its next step), "done"."""
        with self._lock:
            job = self.get(request_id)
            if job is None or job.state == "COMPLETED":
                return "done"
            self._db.execute("UPDATE jobs SET cancel=1 WHERE id=?", (request_id,))
            if job.state == "IN_QUEUE":
                self.fail(request_id, "Request cancelled", "request_cancelled", 400, "Request cancelled")
                return "cancelled"
            self.changed.notify_all()
            return "requested"

    def cancel_requested(self, request_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel FROM jobs WHERE id=?", (request_id,)).fetchone()
        return bool(row and row["cancel"])

    def requeue_interrupted(self) -> list[str]:
        """Requests that were running when the process stopped go back to the queue (at their place: the front).
        Waiting requests forget their host work item too (ComfyUI's prompt queue lives in memory): the backend
        hands them over again."""
        with self._lock:
            ids = [r["id"] for r in self._db.execute("SELECT id FROM jobs WHERE state='IN_PROGRESS'").fetchall()]
            for rid in ids:
                self._db.execute("UPDATE jobs SET state='IN_QUEUE', started=NULL, external=NULL WHERE id=?", (rid,))
                self.log(rid, "the server restarted while this request ran; it is queued again")
            self._db.execute("UPDATE jobs SET external=NULL WHERE state='IN_QUEUE' AND external IS NOT NULL")
            return ids

    def webhooks_due(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state='COMPLETED' AND webhook IS NOT NULL "
                                    "AND webhook_done=0 ORDER BY seq").fetchall()
        return [self._job(r) for r in rows]

    def webhook_delivered(self, request_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET webhook_done=1 WHERE id=?", (request_id,))

    def wait(self, predicate, timeout: float) -> bool:
        """Block until ``predicate()`` is true (checked at each change) or ``timeout`` seconds pass."""
        with self.changed:
            return self.changed.wait_for(predicate, timeout)
