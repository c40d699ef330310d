"""A JSON-lines record of every request submitted to fal, written before waiting starts.

fal bills per request: if waiting times out, the process dies or ComfyUI restarts, the id in
this file lets the user fetch the finished result (``fetch_remote_result`` / ``fal-fetch``)
instead of paying again. One object per line::

    {"event": "submitted", "request_id": "...", "endpoint": "fal-ai/...", "time": "2025-...Z", ...}
    {"event": "completed", "request_id": "...", "time": "..."}

The key is never written (only ids, the endpoint, the time and a few request fields).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

LOG_FILE_NAME = "fal_requests.jsonl"
_lock = threading.Lock()


def cli_command() -> str:
    """How a user runs this pack's command line from where it is installed: ``python -m sdxl_controlnet_img2img``
    after a pip install, ``python custom_nodes/<pack folder>`` in a ComfyUI install (the folder run as a script;
    there the package is named after its folder, so ``-m sdxl_controlnet_img2img`` would not find it)."""
    root = Path(__file__).resolve().parent.parent
    if root.parent.name == "custom_nodes":
        return f"python custom_nodes/{root.name}"
    if __name__.split(".")[0] == "sdxl_controlnet_img2img":
        return "python -m sdxl_controlnet_img2img"
    return f"python {root}"


def fetch_command(request_id: str) -> str:
    """The command (in backquotes) that fetches request ``request_id``'s result; nothing is submitted again."""
    return f"`{cli_command()} fal-fetch --request-id {request_id} --out DIR`"


def log_path(log_dir) -> Path:
    return Path(log_dir) / LOG_FILE_NAME


def append(log_dir, event: str, request_id: str, **fields) -> Path:
    """Append one record and flush it to disk (fsync) before returning."""
    path = log_path(log_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"event": event, "request_id": request_id,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"), **fields}
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with _lock:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
    return path


def record(log_dir, event: str, request_id: str, **fields) -> bool:
    """:func:`append`, but a failed write (disk full, no permission) never ends the run that paid for the request:
    the id goes to the log as a warning instead, so it is printed somewhere. False when it could not be written."""
    if log_dir is None:
        return False
    try:
        append(log_dir, event, request_id, **fields)
        return True
    except OSError as exc:
        logging.getLogger("sdxl_controlnet_img2img.fal").warning(
            "fal: could not record request %s (%s) in %s (%s): note this id to fetch its result later with %s",
            request_id, event, log_path(log_dir), exc, fetch_command(request_id))
        return False


def read(log_dir) -> list[dict]:
    """All records, oldest first (unreadable lines are skipped)."""
    path = log_path(log_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "request_id" in rec:
            out.append(rec)
    return out


def find(log_dir, request_id: str) -> dict | None:
    """The ``submitted`` record of ``request_id``, merged with its latest event, or None."""
    merged = None
    for rec in read(log_dir):
        if rec.get("request_id") != request_id:
            continue
        if merged is None:
            merged = dict(rec)
        else:
            merged["last_event"] = rec.get("event")
            merged["last_time"] = rec.get("time")
    return merged


def pending(log_dir) -> list[dict]:
    """Submitted requests whose result was never fetched (newest last)."""
    state: dict[str, dict] = {}
    for rec in read(log_dir):
        rid = rec["request_id"]
        if rec.get("event") == "submitted":
            state[rid] = dict(rec)
        elif rid in state:
            state[rid]["last_event"] = rec.get("event")
    # "cancel_requested" stays pending: fal may have run (and billed) the request anyway
    return [r for r in state.values() if r.get("last_event") not in ("completed", "cancelled")]
