"""The data folder of ``serve`` (issue 31, a break-it review of the hardened endpoint):

- one server per folder: deleting ``serve.lock`` let a second ``serve`` run on the folder of a live one (its lock
  was on the file, and a new file is a new lock); now the folder itself is locked. Two real ``serve`` processes.
- readable by this user only: the queue database (prompts, the result files' tokens) was 0644 and the request
  folders 0755, open to every local user; now folders are 0700 and files 0600 (under a umask of 022).
"""

from __future__ import annotations

import os
import stat

from comfyui_harness import free_port
from test_serve import APP, KEY, call, fal_input, start, wait_done
from test_serve_startup import Serving, refused, serve_args


def test_deleting_the_lock_file_does_not_let_a_second_server_in(tiny_models, tmp_path):
    first = Serving(serve_args(tiny_models, tmp_path / "data", free_port()), KEY)
    try:
        assert first.ready.startswith("READY"), first.stderr()[-3000:]
        (tmp_path / "data" / "serve.lock").unlink()
        line = refused(serve_args(tiny_models, tmp_path / "data", free_port()))
        assert "--data-dir" in line and "another server uses it" in line, line
        assert first.proc.poll() is None
    finally:
        first.stop()
    assert first.proc.returncode == 0


def modes(folder) -> dict:
    """{path relative to ``folder`` ("." for itself): (permission bits, the ones it should have)} of all in it."""
    out = {}
    for p in [folder, *folder.rglob("*")]:
        st = p.stat()
        out[str(p.relative_to(folder))] = (stat.S_IMODE(st.st_mode), 0o700 if stat.S_ISDIR(st.st_mode) else 0o600)
    return out


def test_the_data_folder_and_its_files_are_this_users_only(tmp_path, tiny_pipe):
    from sdxl_controlnet_img2img.pipeline.serve.datalock import lock_folder

    old = os.umask(0o022)
    data = tmp_path / "data"
    try:
        lock = lock_folder(data)
        server = start(tmp_path, pipe=tiny_pipe)
        try:
            code, sub, _ = call("POST", f"{server.url}/{APP}", fal_input())
            assert code == 200, sub
            seen = modes(data)  # the request's input images are there until it ends
            done, _seen = wait_done(sub["status_url"])
            assert "error" not in done, done
            seen.update(modes(data))
        finally:
            server.stop_all()
            lock.close()
    finally:
        os.umask(old)
    rid = sub["request_id"]
    for name in ("queue.sqlite3", "serve.lock", f"requests/{rid}/image_url", f"requests/{rid}/0.png"):
        assert name in seen, sorted(seen)
    loose = {name: oct(mode) for name, (mode, private) in seen.items() if mode != private}
    assert not loose, f"readable by other users: {loose}"
