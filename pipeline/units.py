"""Quantities in messages, in the units people read: file sizes in B/KB/MB/GB (image sizes are WxH or megapixels,
see sizes.py), never a raw count such as 52428800 bytes."""

from __future__ import annotations


def file_size(n: float) -> str:
    """``n`` bytes as ``812 B``, ``4.9 KB``, ``50.0 MB`` or ``6.5 GB`` (binary units, as file managers show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
