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
import re
import shlex
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .folders import write_error_text

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


def fetch_command(request_id: str, log_dir=None) -> str:
    """The command (in backquotes) that fetches request ``request_id``'s result; nothing is submitted again. With
    ``log_dir`` (the request log the id is pending in) the command names it, so the fetch marks the id completed
    there: ``fal-fetch`` would otherwise use (and mark) the log of its own ``--out`` folder."""
    log = f" --request-log-dir {shlex.quote(os.path.abspath(log_dir))}" if log_dir is not None else ""
    return f"`{cli_command()} fal-fetch --request-id {request_id}{log} --out DIR`"


def recovery(request_id: str, log_dir, recorded: bool | None = None) -> str:
    """How the result of ``request_id`` can still be fetched, as one sentence: from the request log when the id is
    recorded there (``recorded``: None reads the log), else by this id alone, which the user must then note."""
    if recorded is None:
        recorded = log_dir is not None and is_recorded(log_dir, request_id)
    if recorded:
        return f"It stays pending in {log_path(log_dir)}: fetch it with {fetch_command(request_id, log_dir)}."
    where = f" in {log_path(log_dir)}" if log_dir is not None else " in a request log"
    return (f"Note this id: it was NOT recorded{where}, so it is the only way to fetch the result, with "
            f"{fetch_command(request_id)}.")


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
        with open(path, "ab+") as f:
            if f.seek(0, os.SEEK_END) > 0:  # a line cut off earlier (a full disk) must not swallow this record
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
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
        if event == "submitted":
            then = f"note this id to fetch its result later with {fetch_command(request_id)}"
        elif event == "completed":
            then = "its result was saved all the same; the log may still list it as pending (fetching it again is free)"
        else:
            then = "the log may still list it as it was before"
        logging.getLogger("sdxl_controlnet_img2img.fal").warning(
            "could not record request %s (%s) in %s (%s): %s", request_id, event, log_path(log_dir),
            write_error_text(exc, log_dir), then)
        return False


@dataclass
class Damage:
    """A line of the log that could not be read whole (cut off by a full disk, edited by hand). ``ids``: the request
    ids read from it anyway; ``complete``: every record on it was recovered with its id and event (nothing hidden);
    ``id_start``: the start of an id cut off within the line (to look it up on fal's dashboard)."""

    line: int
    ids: list[str]
    complete: bool
    id_start: str | None = None


_RECORD_START = re.compile(r'\{\s*"event"\s*:')
_EVENT = re.compile(r'"event"\s*:\s*"([a-z_]+)"')
_ID = re.compile(r'"request_id"\s*:\s*"([0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12})"')
_ID_START = re.compile(r'"request_id"\s*:\s*"([0-9a-fA-F][0-9a-fA-F-]{3,})$')


def _read_damaged(text: str, line: int) -> tuple[list[dict], Damage]:
    """The records of a line that is not one JSON record: whole ones, and the event and id of cut-off ones."""
    starts = [m.start() for m in _RECORD_START.finditer(text)]
    bounds = ([0] if not starts or starts[0] else []) + starts + [len(text)]
    records, ids, complete, id_start = [], [], True, None
    for a, b in zip(bounds, bounds[1:]):
        part = text[a:b]
        try:
            rec, end = json.JSONDecoder().raw_decode(part)
            if isinstance(rec, dict) and isinstance(rec.get("request_id"), str) and not part[end:].strip():
                records.append(rec)
                ids.append(rec["request_id"])
                continue
        except json.JSONDecodeError:
            pass
        found, event, cut = _ID.search(part), _EVENT.search(part), _ID_START.search(part.rstrip())
        if found:
            ids.append(found.group(1))
        elif cut:
            id_start = cut.group(1)
        if found and event:
            records.append({"event": event.group(1), "request_id": found.group(1), "damaged_line": line})
        else:
            complete = False
    return records, Damage(line, ids, complete, id_start)


def read_checked(log_dir) -> tuple[list[dict], list[Damage]]:
    """All records, oldest first, with those read from damaged lines, and the damaged lines (see :class:`Damage`)."""
    path = log_path(log_dir)
    if not path.is_file():
        return [], []
    out, damaged = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("request_id"), str):
            out.append(rec)
            continue
        records, damage = _read_damaged(line, n)
        out += records
        damaged.append(damage)
    return out, damaged


def read(log_dir) -> list[dict]:
    """All records, oldest first (what damaged lines still tell included: :func:`read_checked`)."""
    return read_checked(log_dir)[0]


def is_recorded(log_dir, request_id: str) -> bool:
    """Whether the log holds the ``submitted`` record of ``request_id`` (so ``fal-pending`` lists it)."""
    return any(r.get("request_id") == request_id and r.get("event") == "submitted" for r in read(log_dir))


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
