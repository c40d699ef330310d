"""The Hugging Face hub: whether it may be reached, and what a repo id looks like.

Used by the model loader (a base or ControlNet given as ``owner/repo``) and by LoRA sources
(``owner/repo`` or ``owner/repo/file.safetensors``).
"""

from __future__ import annotations

import os
import re

# Any of these set to a true value means: never reach the hub (huggingface_hub, transformers and
# older diffusers each read one of them).
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[^\s]+)?$")


def hub_offline() -> bool:
    """True when the environment forbids reaching the hub (see :data:`OFFLINE_VARIABLES`)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def looks_like_repo_id(text: str, *, with_file: bool = False) -> bool:
    """``owner/repo`` (or, with ``with_file``, also ``owner/repo/path/in/repo``), not a relative path."""
    m = _REPO_ID.match(text)
    if m is None or text.startswith((".", "~")):
        return False
    return with_file or m.group(1) is None
