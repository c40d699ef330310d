"""fal's storage calls on the stand-alone server (pipeline/serve/uploads.py), with plain HTTP on 127.0.0.1: the calls
@fal-ai/client's src/storage.js makes (POST rest.fal.ai/storage/upload/initiate, through the proxy header or
directly, answering {upload_url, file_url}; then a PUT of the bytes to upload_url with no key), their refusals in
fal's shapes (no key 401, too large 413, not an image 422, expired 404, a full disk 507), and a submit whose image
URL is one of the server's own files, read from disk while the internal-address guard refuses 127.0.0.1.
tests/js/serve_storage.test.mjs runs fal's JS client itself against `serve` and a real ComfyUI.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from pictures import make_test_image
from test_serve import APP, KEY, Paused, call, data_uri, fal_input, start, wait_done

INITIATE = "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"  # storage.js's target URL
PROXIED = {"x-fal-target-url": INITIATE}


def png(seed: int = 1) -> bytes:
    buf = io.BytesIO()
    make_test_image(64, 64, seed).save(buf, format="PNG")
    return buf.getvalue()


def initiate(server, key=KEY, direct=False, content_type="image/png"):
    body = {"content_type": content_type, "file_name": "picked.png"}
    if direct:
        return call("POST", f"{server.url}/storage/upload/initiate?storage_type=fal-cdn-v3", body, key=key)
    return call("POST", f"{server.url}/proxy", body, key=key, headers=PROXIED)


def upload(server, data: bytes, direct=False, content_type="image/png") -> tuple[int, dict, str]:
    """(the PUT's status, its body, the file URL) as storage.js does it: the PUT carries no key."""
    code, urls, _ = initiate(server, direct=direct, content_type=content_type)
    assert code == 200, urls
    code, body, _ = call("PUT", urls["upload_url"], data, key=None, headers={"Content-Type": content_type})
    return code, body, urls["file_url"]


def age(data_dir, file_url: str, hours: float) -> None:
    """Make an uploaded file look ``hours`` old (its upload time is its file's)."""
    token = file_url.rsplit("/", 1)[1]
    [path] = (data_dir / "uploads" / "files").glob(f"{token}.*")
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_an_upload_is_served_as_the_image_type_its_bytes_are(tmp_path):
    server = start(tmp_path, backend=Paused())
    try:
        for direct in (False, True):
            code, urls, _ = initiate(server, direct=direct)
            assert code == 200 and set(urls) == {"upload_url", "file_url"}, urls
            assert urls["upload_url"].startswith(f"{server.url}/storage/upload/")
            assert urls["file_url"].startswith(f"{server.url}/storage/files/")
        buf = io.BytesIO()
        make_test_image(64, 64, 3).save(buf, format="JPEG")
        for data, claim, served in ((png(), "text/html", "image/png"), (buf.getvalue(), "image/png", "image/jpeg")):
            code, body, file_url = upload(server, data, content_type=claim)
            assert code == 200, body
            code, got, headers = call("GET", file_url, key=None, raw=True)  # no key, as fal's CDN URLs
            assert code == 200 and got == data
            assert headers["Content-Type"] == served and headers["X-Content-Type-Options"] == "nosniff", headers
            path = next((tmp_path / "data" / "uploads" / "files").glob(f"{file_url.rsplit('/', 1)[1]}.*"))
            assert not path.stat().st_mode & 0o111  # never executable
        # an upload URL takes one upload
        code, urls, _ = initiate(server)
        assert call("PUT", urls["upload_url"], png(), key=None)[0] == 200
        code, body, _ = call("PUT", urls["upload_url"], png(2), key=None)
        assert code == 404 and "new one" in body["detail"]
    finally:
        server.stop_all()


def test_refusals_no_key_too_large_not_an_image_expired_full_disk(tmp_path):
    server = start(tmp_path, backend=Paused(), max_image_bytes=50_000)
    try:
        for direct in (False, True):
            for key in (None, "not-the-key"):
                code, body, _ = initiate(server, key=key, direct=direct)
                assert code == 401 and "key" in body["detail"], body
        noise = io.BytesIO()
        Image.frombytes("RGB", (256, 256), os.urandom(256 * 256 * 3)).save(noise, format="PNG")
        code, body, _ = upload(server, noise.getvalue())  # about 197 000 bytes
        assert code == 413 and "50000 bytes" in body["detail"][0]["msg"], body
        for data in (b"<html><script>alert(1)</script></html>", b'<svg xmlns="http://www.w3.org/2000/svg"/>', b""):
            code, body, _ = upload(server, data, content_type="image/png")
            assert code == 422 and body["detail"][0]["loc"] == ["body", "file"], body
            assert "PNG, JPEG" in body["detail"][0]["msg"]
        code, body, file_url = upload(server, png())
        assert code == 200 and call("GET", file_url, key=None, raw=True)[0] == 200
        age(tmp_path / "data", file_url, 25)  # kept 24 h unless set
        code, body, _ = call("GET", file_url, key=None)
        assert code == 404 and "24 h" in body["detail"], body
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=file_url))
        assert code == 422 and body["detail"][0]["loc"] == ["body", "image_url"], body
        assert "expired" in body["detail"][0]["msg"] and "upload it again" in body["detail"][0]["msg"]
        server.app.store.min_free_bytes = 2**62  # the disk floor: no upload below it
        code, body, _ = call("POST", f"{server.url}/proxy", {}, headers=PROXIED)
        assert code == 507 and "disk" in body["detail"], body
    finally:
        server.stop_all()


def test_a_submit_reads_the_servers_own_files_without_fetching_them(tmp_path, tiny_pipe):
    """An upload's URL and a result's URL on 127.0.0.1 run although the server may fetch nothing on this machine."""
    from sdxl_controlnet_img2img.pipeline.serve.fetch import Policy

    server = start(tmp_path, pipe=tiny_pipe, outbound=Policy())  # no internal address may be fetched
    try:
        results = {}
        for name, image_url in (("data", data_uri(make_test_image(64, 64, 1))),
                                ("upload", upload(server, png(1))[2])):
            code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=image_url))
            assert code == 200, sub
            done, _ = wait_done(sub["status_url"])
            assert "error" not in done, done
            results[name] = call("GET", sub["response_url"])[1]["images"][0]["url"]
        got = {name: pixels(call("GET", url, key=None, raw=True)[1]) for name, url in results.items()}
        assert np.array_equal(got["upload"], got["data"])
        # a result image as the next request's control image: its stored file, not an HTTP call to itself
        assert results["data"].startswith(f"{server.url}/files/")
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input(control_image_url=results["data"]))
        assert code == 200, sub
        done, _ = wait_done(sub["status_url"])
        assert "error" not in done, done
        # a URL of this server that names no file is refused at the submit, naming the field
        never = f"{server.url}/storage/files/{'0' * 32}"
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(image_url=never))
        assert code == 422 and body["detail"][0]["loc"] == ["body", "image_url"], body
    finally:
        server.stop_all()


def test_keep_uploads_hours_from_the_option_and_the_environment(tmp_path, monkeypatch):
    import argparse

    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer, add_serve_parser, build_app
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    sub = argparse.ArgumentParser().add_subparsers()
    add_serve_parser(sub)
    monkeypatch.setenv("SDXLCN_SERVE_KEEP_UPLOADS_HOURS", "5")
    for argv, kept in ((["--keep-uploads-hours", "2"], 2), ([], 5)):
        args = sub.choices["serve"].parse_args(["--checkpoint", "c", "--controlnet", "n", *argv])
        store = Store(tmp_path / f"data-{kept}")
        server = StandaloneServer(build_app(store, Paused(), args, KEY)).start()
        try:
            code, _body, file_url = upload(server, png())
            assert code == 200
            age(tmp_path / f"data-{kept}", file_url, kept - 0.5)
            assert call("GET", file_url, key=None, raw=True)[0] == 200
            age(tmp_path / f"data-{kept}", file_url, kept + 0.5)
            assert call("GET", file_url, key=None)[0] == 404
        finally:
            server.stop()
            store.close()
