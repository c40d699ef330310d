"""Image URLs are downloaded ahead of a request's run, by download threads of their own, never by the GPU worker
(issue 31, a break-it review of the hardened endpoint): when the worker downloaded them, two URLs trickling 28 s
each held the only worker 58 s, and another client's data-URI request waited 64 s behind them.

- a request whose URL never answers, queued first, does not hold the one worker: a data-URI request queued after it
  runs and completes while that download still waits;
- all of a request's downloads share one deadline (it was 30 s per image);
- only the next few waiting requests are downloaded at once (the rest wait their turn: disk and threads bounded);
- a downloaded image is stored only above the free-space floor: below it the request ends with an error naming the
  field and saying the server's disk is full (it was written whatever the disk had left).

Real HTTP servers on 127.0.0.1 play the image hosts (the operator allows 127.0.0.1).
"""

from __future__ import annotations

import json
import select
import shutil
import threading
import time

from comfyui_harness import wait_until
from loopback import Loopback, Quiet
from pictures import make_test_image
from test_serve import APP, call, fal_input, start, wait_done
from test_serve_submit_fetch import ENV, png_of


class Host(Loopback):
    """An image host on 127.0.0.1: paths starting with ``/held`` answer only once ``release`` is set, ``/late``
    after ``late_s`` seconds, ``/hang`` never (it notes when the client closed the connection, in ``closed``), others
    at once with the PNG. ``hits`` lists the paths asked for, in order, and ``at`` when (the host's own clock)."""

    def __init__(self, png: bytes, late_s: float = 0.0):
        self.release = threading.Event()
        self.hits: list[str] = []
        self.at: dict[str, float] = {}
        self.closed: dict[str, float] = {}
        owner = self

        class Handler(Quiet):
            def do_GET(self):
                owner.hits.append(self.path)
                owner.at[self.path] = time.monotonic()
                if self.path.startswith("/held"):
                    owner.release.wait(300)
                elif self.path.startswith("/late"):
                    owner.release.wait(late_s)
                elif self.path.startswith("/hang"):
                    while not owner.release.is_set():
                        if select.select([self.connection], [], [], 0.05)[0] and not self.connection.recv(1):
                            owner.closed[self.path] = time.monotonic()
                            return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        super().__init__(Handler)

    def close(self):
        self.release.set()
        super().close()


def queued(store, url: str, **changes):
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits, check_submission

    args, images = check_submission(json.dumps(fal_input(image_url=url, **changes)).encode(), Limits())
    return store.add(args, images)


def test_a_url_that_never_answers_does_not_hold_the_worker_for_a_request_queued_after_it(tmp_path, tiny_pipe,
                                                                                          monkeypatch):
    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Host(png_of(make_test_image(64, 64, 3)))
    server = start(tmp_path, pipe=tiny_pipe, download_timeout_s=300.0)
    try:
        code, slow, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=f"{host.url}/held.png", seed=1))
        assert code == 200, slow
        wait_until(lambda: host.hits, "the download of the first request starting", deadline_s=30)
        code, quick, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=2))  # data URIs: stored at the submit
        assert code == 200, quick
        done, _seen = wait_done(quick["status_url"], deadline_s=120)
        assert "error" not in done, done
        assert not host.release.is_set()
        code, first, _ = call("GET", slow["status_url"] + "?logs=1")  # its download still waits, the worker did not
        assert code == 200 and first["status"] == "IN_QUEUE", first
        host.release.set()
        done, _seen = wait_done(slow["status_url"], deadline_s=120)
        assert "error" not in done, done
    finally:
        server.stop_all()
        host.close()


def test_a_requests_downloads_share_one_deadline(tmp_path, monkeypatch):
    """A window of 6 s: the image URL answers after 4 s (the host waits), the control image URL never does. The
    second download is cut when the request's window ends (it had 6 s of its own: 10 s in all), and the error names
    the control image and the server's time for all of a request's images."""
    from sdxl_controlnet_img2img.pipeline.serve.downloads import fetch_inputs
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Host(png_of(make_test_image(64, 64, 3)), late_s=4.0)
    store = Store(tmp_path / "data")
    try:
        job = queued(store, f"{host.url}/late-image.png", control_image_url=f"{host.url}/hang-control.png")
        assert fetch_inputs(store, job, Limits(download_timeout_s=6.0)) is False
        assert host.hits == ["/late-image.png", "/hang-control.png"], host.hits
        wait_until(lambda: host.closed, "the control image's download cut", deadline_s=30)
        took = host.closed["/hang-control.png"] - host.at["/late-image.png"]
        assert took < 6.0 + 2.0, f"the request's downloads went on {took:.1f} s, past its 6 s window"
        ended = store.get(job.id)
        assert (ended.state, ended.error_status) == ("COMPLETED", 422), ended
        assert ended.error_detail[0]["loc"] == ["body", "control_image_url"], ended.error_detail
        assert "within 6 s, the time this server gives all of a request's image URLs" in ended.error, ended.error
    finally:
        host.close()
        store.close()


def test_only_the_next_few_waiting_requests_are_downloaded(tmp_path, monkeypatch):
    """Four requests whose URLs hang, a window of two: the first two are downloaded, the others wait their turn; a
    request leaving the queue (cancelled) lets the next one in, the fourth still waits."""
    from sdxl_controlnet_img2img.pipeline.serve.downloads import Prefetch
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Host(png_of(make_test_image(64, 64, 3)))
    store = Store(tmp_path / "data")
    prefetch = Prefetch(store, Limits(download_timeout_s=300.0), ahead=2)
    try:
        jobs = [queued(store, f"{host.url}/held-{i}.png") for i in range(4)]
        assert not any([prefetch.ready(job) for job in jobs])
        wait_until(lambda: len(host.hits) == 2, "the first two downloads", deadline_s=30)
        assert sorted(host.hits) == ["/held-0.png", "/held-1.png"], host.hits
        assert store.cancel(jobs[0].id) == "cancelled"
        assert not any([prefetch.ready(store.get(job.id)) for job in jobs[1:]])
        wait_until(lambda: "/held-2.png" in host.hits, "the third download, once the first left", deadline_s=30)
        assert "/held-3.png" not in host.hits, host.hits
        host.release.set()
        wait_until(lambda: prefetch.ready(store.get(jobs[1].id)), "the second request's image stored", deadline_s=60)
    finally:
        prefetch.stop()
        host.close()
        store.close()


def test_a_downloaded_image_below_the_free_space_floor_ends_its_request_naming_the_field(tmp_path, monkeypatch):
    """The request was accepted (its image a URL: nothing to store yet); when its download arrives, the disk has less
    free space than the server keeps: nothing is written, and the request ends with the field and the reason."""
    from sdxl_controlnet_img2img.pipeline.serve.downloads import fetch_inputs
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    monkeypatch.setenv(ENV, "127.0.0.1")
    host = Host(png_of(make_test_image(64, 64, 3)))
    store = Store(tmp_path / "data", min_free_bytes=0)
    try:
        job = queued(store, f"{host.url}/img.png")
        store.min_free_bytes = shutil.disk_usage(tmp_path).free + 2**30  # the disk filled up meanwhile
        assert fetch_inputs(store, job, Limits()) is False
        assert host.hits == ["/img.png"], host.hits
        ended = store.get(job.id)
        assert (ended.state, ended.error_status) == ("COMPLETED", 507), ended
        assert ended.error.startswith("image_url: ") and "disk is almost full" in ended.error, ended.error
        assert ended.error_detail[0]["loc"] == ["body", "image_url"], ended.error_detail
        assert not store.has_input(job.id, "image_url")
        assert [p.name for p in store.job_dir(job.id).iterdir()] == [], "a file was written below the floor"
    finally:
        host.close()
        store.close()
