"""The fal key: where it comes from, and keeping it out of every message.

Lookup order (first found wins):

1. ``key=`` passed by the caller (library use only; the node never takes a key as a widget);
2. ``FAL_KEY``;
3. ``FAL_KEY_ID`` + ``FAL_KEY_SECRET`` (joined as ``id:secret``, the shape fal's key has);
4. a key file: one line holding the key. The ComfyUI node looks in
   ``fal_key.txt`` in the pack's folder of ComfyUI's user directory (:data:`..folders.USER_FOLDER`): its root, *not* a
   per-user folder such as ``user/default``, because ComfyUI serves per-user folders over its
   ``/userdata`` HTTP API.

Every key found is registered with :func:`redact`, which the remote path applies to every
message, log line and exception text it produces.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from ..folders import USER_FOLDER
from ..key_policy import first_key_line
from .errors import FalKeyMissing

KEY_FILE_NAME = "fal_key.txt"
# the key a self-hosted server (SDXLCN_FAL_URL) takes, as messages say it; FAL_KEY holds it (any text for a server
# without a key: fal's clients send one whatever the server)
SERVER_KEY = ("the key that server was started with (its SDXLCN_SERVE_KEY, serve's --key-file or ComfyUI's "
              f"user/{USER_FOLDER}/serve_key.txt)")
REDACTED = "[fal key redacted]"

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Remember ``value`` (and its parts) so :func:`redact` removes it from any text."""
    if not value:
        return
    parts = {value, *value.split(":")} if ":" in value else {value}
    with _lock:
        for p in parts:
            if len(p) >= 6:  # never redact trivially short fragments (would mangle ordinary text)
                _secrets.add(p)


def redact(text) -> str:
    """``text`` with every registered secret replaced."""
    s = str(text)
    with _lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in s:
            s = s.replace(secret, REDACTED)
    return s


class RedactingFilter(logging.Filter):
    """A logging filter that redacts the formatted message of every record it passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


def resolve_key(key: str | None = None, key_file=None, server: str | None = None) -> str:
    """The fal key, or :class:`FalKeyMissing` saying how to set one. ``server``: the self-hosted server the key is for
    (as messages name it, :attr:`.settings.FalSettings.target`); None for fal."""
    what = "fal key" if server is None else f"key for {server}"
    get = ("Get a key at https://fal.ai/dashboard/keys." if server is None else
           f"It must be {SERVER_KEY}; any text (e.g. none) when that server has no key.")
    found = None
    if key:
        found = key.strip()
    elif os.environ.get("FAL_KEY", "").strip():
        found = os.environ["FAL_KEY"].strip()
    elif os.environ.get("FAL_KEY_ID", "").strip() and os.environ.get("FAL_KEY_SECRET", "").strip():
        found = f"{os.environ['FAL_KEY_ID'].strip()}:{os.environ['FAL_KEY_SECRET'].strip()}"
    elif key_file is not None:
        path = Path(key_file)
        if not path.exists():
            raise FalKeyMissing(
                f"no {what} found: the key file {path} does not exist and FAL_KEY is not set. Create the file with "
                f"the key on its first line, or set FAL_KEY (or FAL_KEY_ID and FAL_KEY_SECRET). {get}")
        try:
            found = first_key_line(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise FalKeyMissing(f"the key file {path} cannot be read ({exc.__class__.__name__}); it must be "
                                "a text file with the key on its first line") from None
    if not found:
        where = (f", or put it on the first line of {Path(key_file)}" if key_file is not None else
                 ", or put it on the first line of a key file (ComfyUI: <ComfyUI user dir>/"
                 f"{USER_FOLDER}/{KEY_FILE_NAME}; command line: --fal-key-file FILE)")
        raise FalKeyMissing(
            f"no {what} found: set the FAL_KEY environment variable (or FAL_KEY_ID and FAL_KEY_SECRET) in the "
            f"environment ComfyUI or the command line runs in{where}. {get} Never put the key in a widget or a "
            "workflow.")
    register_secret(found)
    return found
