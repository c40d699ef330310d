"""The queue store while it cannot be written, and when it is damaged (issue 31, a break-it review of the hardened
endpoint), with real faults: another SQLite connection holding the database's write lock (an ``sqlite3`` shell or a
backup tool in a transaction), and a database file whose pages were overwritten.

- With the lock held, each submit held a call thread for the store's whole retry window (30 s) before its 503, and
  ``/ready`` said 200 meanwhile; status and result calls waited behind the writes (one connection under one lock).
  Now a submit is answered 503 after a short try, ``/ready`` says why as soon as a write failed, and reads answer on
  connections of their own. The store's retry window is set to 10 minutes here: a client's call never waits on it.
- A damaged database was retried as if it were locked: 30 s, then a traceback at start. Now ``serve`` says so in one
  line naming the file and what to do.
"""

from __future__ import annotations

import sqlite3
import threading

from comfyui_harness import wait_until
from test_serve import APP, call, fal_input
from test_serve_bounds import paused_server
from test_serve_startup import refused, serve_args
from test_serve_survival import DatabaseLock


def test_a_locked_store_answers_submits_503_soon_and_reads_meanwhile(tmp_path):
    server = paused_server(tmp_path)
    server.store.retry_s = 600.0
    lock = DatabaseLock(tmp_path / "data" / "queue.sqlite3")
    try:
        code, first, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200, first
        lock.hold()
        answers = []

        def submit():
            answers.append(call("POST", f"{server.url}/{APP}", fal_input(seed=9)))  # 30 s client timeout

        threads = [threading.Thread(target=submit) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(answers) == 10, answers
        for code, body, headers in answers:
            assert code == 503 and "locked" in body["detail"] and headers.get("Retry-After"), body
        code, body, _ = call("GET", f"{server.url}/ready", key=None)
        assert code == 503 and body["ready"] is False and "locked" in body["detail"], body
        code, status, _ = call("GET", first["status_url"])
        assert code == 200 and status["status"] == "IN_QUEUE", status
        assert call("GET", first["response_url"])[0] == 400  # still in progress: read, not refused
        lock.release.set()
        wait_until(lambda: call("GET", f"{server.url}/ready", key=None)[0] == 200, "ready again", deadline_s=60)
        code, again, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=10))
        assert code == 200, again
        assert server.store.waiting() == 2  # the first and the last: none of the refused ones
    finally:
        lock.release.set()
        server.stop_all()


def test_reads_do_not_wait_for_a_write_stuck_on_the_lock(tmp_path):
    """A write of this server waits for SQLite's lock (here for up to 10 minutes: ``busy_s``) while another program
    holds it: a status call, a result call and /ready answer meanwhile, and a submit is refused with 503."""
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from test_serve import KEY, Paused

    store = Store(tmp_path / "data", busy_s=600.0, retry_s=600.0)
    server = StandaloneServer(ServeApp(store, Paused(), key=KEY)).start()
    lock = DatabaseLock(tmp_path / "data" / "queue.sqlite3")
    stuck = None
    try:
        code, first, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200, first
        lock.hold()
        stuck = threading.Thread(target=store.set_external, args=(first["request_id"], "work-item"))
        stuck.start()
        code, status, _ = call("GET", first["status_url"])
        assert code == 200 and status["status"] == "IN_QUEUE", status
        assert call("GET", first["response_url"])[0] == 400
        assert stuck.is_alive()  # the write still waits
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=9))
        assert code == 503, body
        code, body, _ = call("GET", f"{server.url}/ready", key=None)
        assert code == 503 and body["ready"] is False, body
    finally:
        lock.release.set()
        if stuck is not None:
            stuck.join(60)
        server.stop()
        store.close()
    assert not stuck.is_alive()


def damaged_store(folder):
    """A queue database of 60 requests (about 160 KB) whose bytes 4096 to 45056 are then overwritten with 0xff."""
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    store = Store(folder)
    for i in range(60):
        store.add({"prompt": f"{i} " + "words " * 300}, {})
    store.close()
    path = folder / "queue.sqlite3"
    data = bytearray(path.read_bytes())
    assert len(data) > 45056
    data[4096:45056] = b"\xff" * (45056 - 4096)
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_queue_database_is_one_line_at_start(tiny_models, tmp_path):
    path = damaged_store(tmp_path / "data")
    try:
        sqlite3.connect(str(path)).execute("SELECT id FROM jobs WHERE state='IN_PROGRESS'").fetchall()
        raise AssertionError("the database reads: not damaged as the test needs")
    except sqlite3.DatabaseError as exc:
        assert "malformed" in str(exc), exc
    line = refused(serve_args(tiny_models, tmp_path / "data", 0))
    assert "--data-dir" in line and str(path) in line and "move queue.sqlite3 away" in line, line


def test_a_damaged_database_is_not_retried_and_says_what_to_do(tmp_path):
    """Met while serving (the store's retry window 10 minutes): the call fails at once, naming the file, and the
    store's health says so."""
    from sdxl_controlnet_img2img.pipeline.serve.store import Store, StoreDamaged

    path = damaged_store(tmp_path / "data")
    store = Store(tmp_path / "data", retry_s=600.0)
    try:
        try:
            store.requeue_interrupted()
            raise AssertionError("the damaged database was read")
        except StoreDamaged as exc:
            assert str(path) in str(exc) and "move it away" in str(exc), exc
        assert str(path) in store.health() and not store.ready()
    finally:
        store.close()
