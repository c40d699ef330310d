"""``serve`` started on a ``--data-dir`` whose queue database another program holds locked (issue 31, item 2's
start-up part): an ``sqlite3`` shell or a backup tool in a write transaction is no ``serve``, so the folder's own
lock file (``serve.lock``) does not see it. It was a 30 s wait, then a traceback; now it is one line naming the
folder and what to do, after a short wait, before the models load. Run as a user runs it, with a real SQLite
connection of this test holding the write lock."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from comfyui_harness import free_port
from test_serve_startup import ROOT, env_with


@pytest.mark.parametrize("made_by", ["serve", "another program"])
def test_a_data_dir_whose_database_another_program_holds_is_one_line(tmp_path, made_by):
    from sdxl_controlnet_img2img.pipeline.serve.store import Store

    data = tmp_path / "data"
    if made_by == "serve":  # the queue database as serve leaves it (write-ahead log)
        Store(data).close()
    else:  # made by the other program (a rollback journal, as sqlite3's shell makes by default)
        data.mkdir()
    other = sqlite3.connect(str(data / "queue.sqlite3"), isolation_level=None)
    try:
        other.execute("CREATE TABLE IF NOT EXISTS notes (x)")
        other.execute("BEGIN IMMEDIATE")  # what `sqlite3 queue.sqlite3` then `BEGIN IMMEDIATE;` holds
        other.execute("INSERT INTO notes VALUES (1)")
        p = subprocess.run([sys.executable, "-m", "sdxl_controlnet_img2img", "serve", "--checkpoint", "no-such-model",
                            "--controlnet", "no-such-controlnet", "--port", str(free_port()), "--data-dir", str(data)],
                           capture_output=True, text=True, env=env_with(None), cwd=ROOT, timeout=120)
    finally:
        other.execute("ROLLBACK")
        other.close()
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr
    line = lines[0]
    assert f"--data-dir {data}" in line and "locked by another program" in line and "close it" in line, line
