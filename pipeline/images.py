"""Reading image inputs (path, file:// URL, http(s) URL, data: URI) and encoding outputs."""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from .errors import ImageInputError
from .units import file_size

MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
DOWNLOAD_TIMEOUT_S = 30.0


def decode_image(field: str, data: bytes, where: str, formats=None):
    """Decode image bytes to an RGB PIL image (EXIF applied, alpha on white); errors name ``field`` and ``where``.
    ``formats``: Pillow's names of the only formats tried (None: all it knows).

    Pillow's decompression-bomb guard warns (``DecompressionBombWarning``, a line naming Pillow's own file) above
    89.5 MP and refuses above twice that with a bare exception: the warning is left out (the size rules say what
    a large image means for the run, sizes.py), the refusal is the pack's error naming the input."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
            img.load()
    except Image.DecompressionBombError:
        from .sizes import MAX_PIXELS

        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageInputError(field, f"{where} is larger than {limit / 1e6:.0f} MP, more than this pack decodes (a "
                                     "guard against images made to exhaust memory); scale it down (SDXL runs at up "
                                     f"to {MAX_PIXELS / 1e6:.1f} MP) and use that") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's plugins raise
        # SyntaxError for a broken file ("broken PNG file") and EOFError for a cut one
        raise ImageInputError(field, f"{where} is not a readable image ({exc.__class__.__name__}); give a PNG, JPEG or WebP") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        # composite on white so transparent areas do not turn black: pasted through its own alpha (the pixels of
        # alpha_composite on white, without its three full-size RGBA copies)
        rgba = img if img.mode in ("RGBA", "LA") else img.convert("RGBA")
        del img
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def download(url: str, field: str, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """GET ``url`` with a timeout and a size cap; errors name ``field``."""
    safe = redact_url(url)
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "comfyui-sdxl-controlnet-img2img"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and int(length) > max_bytes:
                raise ImageInputError(field, f"{safe} is {file_size(int(length))}, over the {file_size(max_bytes)} "
                                             "limit")
            data = resp.read(max_bytes + 1)
    except ImageInputError:
        raise
    except urllib.error.HTTPError as exc:
        raise ImageInputError(field, f"downloading {safe} failed with HTTP {exc.code}; check the URL") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ImageInputError(field, f"downloading {safe} failed ({reason}); check the URL and the network") from None
    if len(data) > max_bytes:
        raise ImageInputError(field, f"{safe} is over the {file_size(max_bytes)} limit")
    return data


def redact_url(url: str) -> str:
    """Drop query strings and credentials from a URL before it goes into a message."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 address keeps its brackets (RFC 3986), or its last group reads as the port
        netloc = f"[{netloc}]"
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def load_image(source, field: str = "image_url"):
    """Load an image input as an RGB PIL image with EXIF orientation applied.

    ``source`` may be a PIL image, a local path, a ``file://`` URL, an ``http(s)://`` URL or a
    ``data:`` URI. Every failure is an :class:`ImageInputError` naming ``field``.
    """
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ImageInputError(field, "is missing; give a path, a file:// or http(s):// URL, or a data: URI")
    source = source.strip()
    lower = source[:16].lower()
    if lower.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep:
            raise ImageInputError(field, "is a data: URI without a ',' separating header and data")
        try:
            data = base64.b64decode(payload, validate=False) if ";base64" in header else urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise ImageInputError(field, "is a data: URI whose base64 payload is invalid") from None
        return decode_image(field, data, "the data: URI")
    if lower.startswith(("http://", "https://")):
        return decode_image(field, download(source, field), redact_url(source))
    if lower.startswith("file://"):
        parsed = urllib.parse.urlsplit(source)
        path = urllib.request.url2pathname(parsed.path)
    else:
        path = source
    p = Path(path).expanduser()
    if not p.is_file():
        raise ImageInputError(field, f"file not found: {p}; check the path")
    return decode_image(field, p.read_bytes(), str(p))


def encode_image(image, fmt: str = "png") -> tuple[bytes, str]:
    """Encode a PIL image; returns (bytes, content type)."""
    fmt = fmt.lower()
    buf = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), "image/jpeg"
    if fmt == "png":
        image.save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    raise ValueError(f"output format {fmt!r} is not supported; use png or jpeg")

