"""ComfyUI 0.8.0 starting with the pack while another program holds the write lock of the pack's serve store
(``user/<pack>/serve/queue.sqlite3``: an ``sqlite3`` shell or a backup in a transaction): it waited the store's 30 s
retry window, then logged the fal API's failure with a traceback. Now the fal API says why it is unavailable in one
line (the folder, the lock, what to do) after a short wait, while the lock is still held, and ComfyUI serves."""

from __future__ import annotations

import sqlite3

import pytest

from comfyui_harness import SKIP_REASON, comfyui_dir, running_comfyui

pytestmark = pytest.mark.skipif(comfyui_dir() is None, reason=SKIP_REASON)


def test_a_locked_serve_store_is_one_line_and_comfyui_serves(tmp_path):
    from sdxl_controlnet_img2img.pipeline.folders import USER_FOLDER
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    folder = tmp_path / "user" / USER_FOLDER / "serve"
    Store(folder).close()
    other = sqlite3.connect(str(folder / "queue.sqlite3"), isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with running_comfyui(tmp_path) as comfy:
            assert comfy.get("/object_info/SaveImage", timeout=30)
            log = comfy.log()
            lines = [ln for ln in log.splitlines() if "/sdxlcn/fal" in ln and "unavailable" in ln]
            assert len(lines) == 1, log[-4000:]
            assert "locked by another program" in lines[0] and str(folder) in lines[0], lines[0]
            assert "StoreUnavailable" not in log and "pipeline/serve" not in log, log[-4000:]  # no traceback of ours
            assert other.in_transaction  # said while the lock was still held
    finally:
        other.execute("ROLLBACK")
        other.close()
