"""Bounded memory and disk, and bad input answered as such (issue 31 item 6).

- an image's size is read from its header and refused before it is decoded: the issue's 147 KB PNG of 6144x6144
  took 750 MB to decode before any size check (measured here as the process's peak resident memory);
- a request's input images are deleted when it ends (completed, failed, cancelled), its result after the time the
  server keeps results; below a floor of free space a submit is answered 507 with a message, nothing written;
- files are on the disk (fsync) before the database row naming them commits;
- every malformed body of the issue's list answers 422 naming the field, never 500.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import zlib

from comfyui_harness import wait_until
from test_serve import APP, KEY, Paused, call, fal_input, wait_done
from test_serve_survival import serve


def huge_png(side: int = 6144) -> bytes:
    """A valid RGBA PNG of side x side pixels, all transparent black, built row by row (never whole in memory):
    about 150 KB for 6144x6144."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + side * 4)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0)) +
            chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def reset_peak_rss() -> float:
    """Linux: writing 5 to clear_refs sets the peak (VmHWM) to the current resident size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss_mb()


def paused_server(tmp_path, **limits):
    """The server with nothing running requests, its store reachable as ``server.store``."""
    from sdxl_controlnet_img2img.pipeline.serve.app import ServeApp
    from sdxl_controlnet_img2img.pipeline.serve.cli import StandaloneServer
    from sdxl_controlnet_img2img.pipeline.serve.inputs import Limits
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    store = Store(tmp_path / "data")
    server = StandaloneServer(ServeApp(store, Paused(), key=KEY, limits=Limits(**limits))).start()

    def stop():
        server.stop()
        store.close()

    server.stop_all, server.store = stop, store
    return server


def test_a_huge_image_is_refused_from_its_header_before_it_is_decoded(tmp_path):
    png = huge_png()
    assert len(png) < 200_000
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    server = paused_server(tmp_path)
    try:
        for field, size in (("image_url", "square_hd"), ("control_image_url", None)):
            before = reset_peak_rss()
            code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(**{field: uri, "image_size": size}))
            grew = peak_rss_mb() - before
            assert code == 422 and body["detail"][0]["loc"] == ["body", field], body
            assert "is 6144x6144 (37.7 MP), more pixels than this server decodes" in body["detail"][0]["msg"], body
            assert grew < 150, f"refusing {field} took {grew:.0f} MB: it was decoded"
        assert server.store.waiting() == 0
    finally:
        server.stop_all()


def test_malformed_bodies_answer_422_naming_the_field(tmp_path):
    """The issue's list (a 100k-deep JSON, 10**400, a lone surrogate) and URLs Python's parser rejects."""
    server = paused_server(tmp_path)
    plain = json.dumps(fal_input())[:-1]
    cases = [
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ["body"]),
        (b"[" * 100_000 + b"]" * 100_000, ["body"]),
        ((plain + ', "strength": ' + "1" + "0" * 400 + "}").encode(), ["body", "strength"]),
        ((plain + ', "guidance_scale": -' + "9" * 400 + "}").encode(), ["body", "guidance_scale"]),
        ((plain + ', "loras": [{"path": "x", "scale": 1' + "0" * 400 + "}]}").encode(), ["body", "loras", 0, "scale"]),
        ((plain + ', "prompt": "a \\ud800 fortress"}').encode(), ["body", "prompt"]),
        ((plain + ', "negative_prompt": "\\udfff"}').encode(), ["body", "negative_prompt"]),
        ((plain + ', "\\udc00x": 1}').encode(), ["body", "\\udc00x"]),
        ((plain + ', "image_url": "http://example.com:99999/a.png"}').encode(), ["body", "image_url"]),
        ((plain + ', "image_url": "http://[::1/a.png"}').encode(), ["body", "image_url"]),
        ((plain + ', "image_url": "http://ex\\u00e4mple.com/\\ud800.png"}').encode(), ["body", "image_url"]),
    ]
    try:
        for body, loc in cases:
            code, answer, _ = call("POST", f"{server.url}/{APP}", body)
            assert code == 422, (body[:80], answer)
            assert answer["detail"][0]["loc"] == loc and answer["detail"][0]["msg"], (body[:80], answer)
        assert server.store.waiting() == 0
    finally:
        server.stop_all()


def inputs_of(store, request_id):
    return sorted(p.name for p in store.job_dir(request_id).iterdir() if p.name.endswith("_url"))


def test_inputs_go_when_a_request_ends_and_results_when_they_expire(tmp_path, tiny_pipe):
    """Inputs of a completed, a cancelled and a failed request are deleted (before, a 16 MB disk was full after
    10 submits); the result stays fetchable until the server's keeping time, then row and folder go (404)."""
    server = serve(tmp_path / "a", tiny_pipe, None)
    store = server.store
    try:
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200
        done, _seen = wait_done(sub["status_url"])
        assert "error" not in done
        rid = sub["request_id"]
        wait_until(lambda: inputs_of(store, rid) == [], "the inputs deleted once the result is stored", deadline_s=30)
        assert store.image_path(rid, 0).is_file()
        assert store.purge_expired(force=True) == 0
        assert call("GET", sub["response_url"])[0] == 200
        store.keep_results_s = 0.0  # results kept for the configured time, then deleted with their status
        assert store.purge_expired(force=True) == 1
        assert not store.job_dir(rid).exists()
        assert call("GET", sub["status_url"])[0] == 404
    finally:
        server.stop_all()
    server = paused_server(tmp_path / "b")  # nothing runs here: a request waits until cancelled
    store = server.store
    try:
        code, waiting, _ = call("POST", f"{server.url}/{APP}", fal_input(seed=9))
        assert inputs_of(store, waiting["request_id"]) == ["control_image_url", "image_url"]
        assert call("PUT", waiting["cancel_url"])[0] == 202
        assert inputs_of(store, waiting["request_id"]) == []
        job = store.add({}, {"image_url": b"x", "control_image_url": b"y"})  # a failure, stored as a worker does
        store.fail(job.id, "generation failed: boom", "runner_error", 500)
        assert inputs_of(store, job.id) == []
    finally:
        server.stop_all()


def test_below_the_free_space_floor_a_submit_gets_507_and_nothing_is_written(tmp_path):
    server = paused_server(tmp_path)
    try:
        server.store.min_free_bytes = shutil.disk_usage(tmp_path).free + 2**40  # a floor above what the disk has
        code, body, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 507 and "almost full" in body["detail"] and "free" in body["detail"], body
        assert server.store.waiting() == 0 and list((tmp_path / "data" / "requests").iterdir()) == []
        server.store.min_free_bytes = 0
        assert call("POST", f"{server.url}/{APP}", fal_input())[0] == 200
    finally:
        server.stop_all()


def test_files_are_on_the_disk_before_their_row_commits(tmp_path, tiny_pipe, monkeypatch):
    """The order of the real calls: each input image and the result image are fsynced, and their folder, before the
    INSERT (submit) or the UPDATE to COMPLETED (result) that names them."""
    events = []
    real_fsync = os.fsync

    def fsync(fd):  # records which file each real fsync is for, then makes it
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    server = serve(tmp_path, tiny_pipe, None)
    server.store._db.set_trace_callback(lambda sql: events.append(("sql", " ".join(sql.split()))))
    try:
        code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input())
        assert code == 200
        done, _seen = wait_done(sub["status_url"])
        assert "error" not in done
    finally:
        server.stop_all()
    rid = sub["request_id"]
    [insert] = [i for i, (kind, what) in enumerate(events) if kind == "sql" and what.startswith("INSERT INTO jobs")]
    synced = {name for kind, name in events[:insert] if kind == "fsync"}
    assert {"image_url", "control_image_url", rid}.issubset(synced), events[:insert]
    [completed] = [i for i, (kind, what) in enumerate(events) if kind == "sql" and "SET state='COMPLETED'" in what]
    synced = [name for kind, name in events[insert:completed] if kind == "fsync"]
    assert "0.png.part" in synced and rid in synced[synced.index("0.png.part"):], synced  # the file, then its folder


def broken_png() -> bytes:
    """A 64x64 PNG whose pixel data is split in two chunks, the second with a chunk type that is not one: its header
    reads, and Pillow raises SyntaxError ("broken PNG file") when it decodes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    pixels = zlib.compress(b"".join(b"\x00" + bytes(range(64)) * 3 for _ in range(64)))
    half = len(pixels) // 2
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", pixels[:half]) + chunk(b"\x00\x01\x02\x03", pixels[half:]) + chunk(b"IEND", b""))


def test_a_broken_png_is_422_naming_the_field(tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(broken_png()).decode()
    server = paused_server(tmp_path)
    try:
        for field in ("image_url", "control_image_url"):
            code, body, _ = call("POST", f"{server.url}/{APP}", fal_input(**{field: uri}))
            assert code == 422 and body["detail"][0]["loc"] == ["body", field], body
            assert "not a readable image" in body["detail"][0]["msg"], body
        assert server.store.waiting() == 0
    finally:
        server.stop_all()
