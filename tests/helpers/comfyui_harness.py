"""Start a real ComfyUI server with this pack installed, for integration tests.

Needs ``COMFYUI_DIR`` (a ComfyUI checkout) and optionally ``COMFYUI_PYTHON`` (the interpreter of its
environment, with the pack's requirements installed; default: this interpreter). Each server runs in
its own temp base directory (models, custom_nodes, input, output, user), with the pack linked under a
folder name with dashes, as ComfyUI-Manager installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
PACK_FOLDER = "comfyui-sdxl-controlnet-img2img"


def comfyui_dir() -> Path | None:
    d = os.environ.get("COMFYUI_DIR")
    return Path(d) if d and (Path(d) / "main.py").is_file() else None


SKIP_REASON = "set COMFYUI_DIR to a ComfyUI 0.8.0 checkout (and COMFYUI_PYTHON to its interpreter) to run real-ComfyUI tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyUI:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log_path: Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"

    def rss_bytes(self) -> int:
        """The server process's resident memory now."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def import_problem(self, folder: str = PACK_FOLDER) -> str | None:
        """None when ComfyUI imported the custom node ``folder`` (the pack by default), else the log lines that say
        why not. The node is recognised by the module path ComfyUI names (this server's ``custom_nodes/<folder>``),
        never by a substring that a parent folder may hold too (a clone named like the repository holds ComfyUI,
        and ComfyUI's failing audio nodes, inside it)."""
        module_path = str(self.base / "custom_nodes" / folder)
        lines = self.log().splitlines()
        timing = [ln for ln in lines if ln.rstrip().endswith(f"seconds: {module_path}")
                  or ln.rstrip().endswith(f"seconds (IMPORT FAILED): {module_path}")]
        if len(timing) == 1 and "(IMPORT FAILED)" not in timing[0]:
            return None
        # ComfyUI logs the traceback, then "Cannot import <module_path> module for custom nodes: <error>"
        ends = [i for i, ln in enumerate(lines) if f"Cannot import {module_path} module" in ln]
        start = next((j for j in range(ends[0], -1, -1) if lines[j].startswith("Traceback")), ends[0]) if ends else 0
        quoted = lines[start:ends[0] + 1] if ends else [f"(no import-times line for {module_path})"]
        return "\n".join(timing + quoted)

    def get(self, path: str, timeout: float = 10):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body, timeout: float = 10):
        """POST JSON; returns (status, parsed body) for any HTTP status."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw.strip() else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, raw.decode(errors="replace")

    def queue_prompt(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "sdxlcn-tests"})
        assert status == 200, body
        return body["prompt_id"]

    def wait_history(self, prompt_id: str, deadline_s: float = 300) -> dict:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log()[-3000:])
            h = self.get(f"/history/{prompt_id}")
            if h and prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                entry = h[prompt_id]
                if entry["status"].get("status_str") in ("success", "error") or entry.get("outputs"):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {deadline_s}s")


@contextlib.contextmanager
def running_comfyui(base: Path, models: dict[str, dict[str, Path]] | None = None, deadline_s: float = 180,
                    extra_args: tuple[str, ...] = (), env: dict[str, str | None] | None = None,
                    port: int | None = None):
    """Run ComfyUI with the pack, ``models`` = {folder: {name: path}} linked into models/; ``extra_args`` go to
    main.py (e.g. ``--cache-lru 8``); ``env``: this server's own environment variables on top of this process's (a
    None value removes one), so two servers can run side by side with different settings; ``port``: listen there
    (e.g. the same port again after a restart) instead of a free one."""
    cdir = comfyui_dir()
    assert cdir is not None, SKIP_REASON
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    for folder, entries in (models or {}).items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name, path in entries.items():
            dst = base / "models" / folder / name
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)  # a name may hold a subfolder, as ComfyUI lists them
                dst.symlink_to(Path(path).resolve())
    port = port or free_port()
    log_path = base / "comfyui.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    own_env = env or {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: v for k, v in own_env.items() if v is not None})
    for k in [k for k, v in own_env.items() if v is None]:
        env.pop(k, None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
             *extra_args],
            cwd=cdir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    server = ComfyUI(base, port, proc, log_path)
    try:
        end = time.monotonic() + deadline_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError("ComfyUI exited during startup:\n" + server.log()[-3000:])
            try:
                server.get("/object_info/SaveImage", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > end:
                    raise TimeoutError("ComfyUI did not answer in time:\n" + server.log()[-3000:])
                time.sleep(0.25)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def run_probe(script: str, work: Path, *args: str) -> dict:
    """Run ``tests/<script>`` under ComfyUI's interpreter (``COMFYUI_DIR PACK_ROOT WORK *args``) in ``work``; its
    last ``PROBE {json}`` line, parsed (the test asserts on it)."""
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    out = subprocess.run([python, str(ROOT / "tests" / "helpers" / script), str(comfyui_dir()), str(ROOT), str(work), *args],
                         cwd=work, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("PROBE ")]
    assert out.returncode == 0 and lines, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(lines[-1][len("PROBE "):])


def wait_until(check, what: str, deadline_s: float = 120, every_s: float = 0.1):
    """Poll ``check()`` until it is truthy and return its value; fail naming ``what`` after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {deadline_s} s")
