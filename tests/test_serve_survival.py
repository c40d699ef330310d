"""Workers that survive their store (issue 31 item 2), with real faults: another SQLite connection holding the
database's write lock (as a backup tool or a second program would), and a request's folder turned into a file so
that writing its result fails with the operating system's own error.

Before, one such fault killed the worker thread for good: the running request stayed IN_PROGRESS and every later
one IN_QUEUE, while the server kept accepting. Now the store retries with back-off, a failing worker says so
(``health()``, which the HTTP layer answers ``/ready`` and submits with), and no request is left in progress.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading

from comfyui_harness import wait_until
from test_serve import APP, KEY, call, fal_input, wait_done


def serve(tmp_path, pipe, generate, retry_s: float | None = None):
    """The stand-alone server on the tiny pipeline, with ``generate`` wrapping the real one; ``retry_s``: how long
    the store retries a failing write (30 s by default)."""
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.worker import LocalWorkers

    store = Store(tmp_path / "data")
    if retry_s is not None:
        store.retry_s = retry_s
    workers = LocalWorkers(store, {"cpu": pipe}, generate=generate)
    server = StandaloneServer(ServeApp(store, workers, key=KEY)).start()
    workers.start()

    def stop():
        server.stop()
        workers.stop()
        store.close()

    server.stop_all, server.workers, server.store = stop, workers, store
    return server


class DatabaseLock:
    """Another connection to the queue database holding its write lock (``BEGIN EXCLUSIVE``) until released."""

    def __init__(self, path):
        self.path = path
        self.held, self.release = threading.Event(), threading.Event()

    def hold(self, seconds: float | None = None) -> None:
        def run():
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            self.held.set()
            self.release.wait(seconds)
            db.execute("COMMIT")
            db.close()

        threading.Thread(target=run, daemon=True).start()
        assert self.held.wait(30)


def first_call(action):
    """A generate that runs ``action(request)`` before the first real generation only."""
    from sdxl_controlnet_img2img.pipeline.local.generate import generate

    calls = []

    def wrapped(pipe, request, on_step=None):
        calls.append(1)
        if len(calls) == 1:
            action(request)
        return generate(pipe, request, on_step=on_step)

    return wrapped


def submit(server, **changes) -> dict:
    code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(**changes))
    assert code == 200, sub
    return sub


def completes(sub: dict, deadline_s: float) -> None:
    """The submitted request ``sub`` completes within ``deadline_s`` without an error."""
    done, _seen = wait_done(sub["status_url"], deadline_s=deadline_s)
    assert "error" not in done, done


def test_a_database_locked_for_12_s_delays_the_running_request_and_loses_nothing(tmp_path, tiny_pipe):
    """The issue's 12 s lock, taken while a request generates (past SQLite's 5 s busy timeout): the request still
    completes with its result, and the worker goes on to the next one."""
    lock = DatabaseLock(tmp_path / "data" / "queue.sqlite3")
    server = serve(tmp_path, tiny_pipe, first_call(lambda _req: lock.hold(12.0)))
    try:
        first = submit(server)
        completes(first, 90)
        code, result, _ = call("GET", first["response_url"])
        assert code == 200 and result["seed"] == 7, result
        completes(submit(server, seed=8), 60)
    finally:
        lock.release.set()
        server.stop_all()


def test_a_worker_that_cannot_store_says_so_and_stores_the_result_once_it_can(tmp_path, tiny_pipe):
    """The lock held past the store's retry window: the worker is reported not ready (naming the lock) instead of
    dying, /ready answers 503 and a submit meanwhile gets 503 (before, it was accepted and never ran); once the lock
    goes, the result kept in memory is stored and fetched, /ready answers 200, and the next request runs."""
    lock = DatabaseLock(tmp_path / "data" / "queue.sqlite3")
    server = serve(tmp_path, tiny_pipe, first_call(lambda _req: lock.hold()), retry_s=1.0)
    try:
        first = submit(server)
        why = wait_until(server.workers.health, "the worker saying it cannot go on", deadline_s=60)
        assert "locked" in why, why
        assert not server.workers.ready()
        code, body, headers = call("POST", f"{server.url}/{APP}", fal_input(seed=9))  # refused, not accepted and left
        assert code == 503 and "locked" in body["detail"] and headers.get("Retry-After"), body
        code, body, _ = call("GET", f"{server.url}/ready", key=None)  # what a load balancer asks, without the key
        assert code == 503 and body["ready"] is False and "locked" in body["detail"], body
        lock.release.set()
        completes(first, 90)
        assert call("GET", first["response_url"])[0] == 200
        wait_until(lambda: server.workers.health() is None, "the worker ready again", deadline_s=60)
        assert call("GET", f"{server.url}/ready", key=None)[:2] == (200, {"ready": True})
        completes(submit(server, seed=8), 60)
    finally:
        lock.release.set()
        server.stop_all()


def test_a_result_that_cannot_be_written_fails_its_request_and_the_worker_goes_on(tmp_path, tiny_pipe):
    """The request's folder replaced by a file while it runs: writing the result fails (the OS's own
    NotADirectoryError). The request ends as a 500 naming the cause, never left IN_PROGRESS, and the next runs."""
    data = tmp_path / "data"
    moved = []

    def break_folder(_req):
        [folder] = [p for p in (data / "requests").iterdir() if p.is_dir()]
        shutil.rmtree(folder)
        folder.write_bytes(b"not a folder")
        moved.append(folder)

    server = serve(tmp_path, tiny_pipe, first_call(break_folder), retry_s=1.0)
    try:
        first = submit(server)
        done, _seen = wait_done(first["status_url"], deadline_s=90)
        assert done.get("error_type") == "runner_error" and "could not store" in done["error"], done
        code, body, _ = call("GET", first["response_url"])
        assert code == 500 and "NotADirectoryError" in str(body), body
        completes(submit(server, seed=8), 60)
        assert moved and server.workers.health() is None
    finally:
        server.stop_all()


def test_the_webhook_thread_outlives_a_locked_database(tmp_path, monkeypatch):
    """Recording a delivered webhook while the database is locked past SQLite's timeout: the delivery is recorded
    once the lock goes (or made again: receivers are idempotent), and later requests' webhooks still go out."""
    from test_serve_outbound import Site

    from sdxl_controlnet_img2img.pipeline.serve.store import Store
    from sdxl_controlnet_img2img.pipeline.serve.webhook import Webhooks

    monkeypatch.setenv("SDXLCN_SERVE_ALLOW_INTERNAL_URLS", "127.0.0.1")
    receiver = Site("127.0.0.1")
    store = Store(tmp_path / "data")
    lock = DatabaseLock(tmp_path / "data" / "queue.sqlite3")
    hook = lambda n: '{"url": "%s/hook/%d", "base": "http://127.0.0.1:1"}' % (receiver.url, n)  # noqa: E731
    first = store.add({}, {}, hook(1))
    store.cancel(first.id)
    lock.hold(8.0)
    hooks = Webhooks(store, lambda job, base: {}).start()
    try:
        wait_until(lambda: receiver.hits, "the first webhook", deadline_s=30)
        assert lock.held.is_set() and not lock.release.is_set()
        lock.release.wait(20)
        second = store.add({}, {}, hook(2))
        store.cancel(second.id)
        wait_until(lambda: "/hook/2" in receiver.hits, "the second webhook, after the lock", deadline_s=60)
        wait_until(lambda: not store.webhooks_due(), "both deliveries recorded", deadline_s=60)
    finally:
        lock.release.set()
        hooks.stop()
        store.close()
        receiver.close()
