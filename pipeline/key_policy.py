"""The rules the client (``pipeline/fal/``) and the server (``pipeline/serve/``) share about keys and addresses: how a
key file is read, and which hosts are this machine (where plain ``http://`` may carry a key, and who may call a server
that has none)."""

from __future__ import annotations

import ipaddress
from pathlib import Path


def first_key_line(path) -> str | None:
    """The key in a key file: its first line that is neither empty nor a ``#`` comment, stripped; None when there is
    none. ``utf-8-sig``: a file saved by Windows Notepad starts with a byte-order mark. Raises ``OSError`` or
    ``UnicodeDecodeError`` for a file that cannot be read as text (each caller says which file and option)."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    return next((ln for ln in lines if ln and not ln.startswith("#")), None)


def is_loopback_address(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ``::1``; brackets allowed): what this machine's resolver
    reaches without leaving it."""
    host = (host or "").strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """:func:`is_loopback_address`, or a ``*.localhost`` name, which browsers resolve to this machine (a Host header
    a browser on this machine may send)."""
    name = (host or "").strip().lower().rstrip(".")
    return is_loopback_address(host) or name.endswith(".localhost")
