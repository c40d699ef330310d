"""fal's file storage on this server: ``fal.storage.upload`` and the JS client's auto-upload of File/Blob inputs.

``@fal-ai/client`` (its ``src/storage.js``) uploads in two calls. ``POST https://rest.fal.ai/storage/upload/initiate``
with ``{content_type, file_name}`` goes through its request middleware (the key; with ``proxyUrl``, to the proxy with
the target in ``x-fal-target-url``) and answers ``{upload_url, file_url}``; then a plain ``fetch(upload_url, {method:
"PUT", body})``, with neither key nor proxy, sends the bytes, and ``file_url`` is what the app gets (``transformInput``
puts it in place of each ``Blob`` of a submit's input). Here, under the server's base (:mod:`.protocol` routes them):

- ``POST storage/upload/initiate``, directly or through the proxy naming fal's storage host: the key, as for a submit;
  answers an upload URL and a file URL on this server, each with a random token of its own (the upload URL takes one
  upload within :data:`UPLOAD_WINDOW_S`; ``initiate-multipart``, for files over 90 MB, is refused as too large);
- ``PUT storage/upload/<token>``: the bytes, at most the server's image limit (413), one of the image formats a submit
  takes, read from the bytes' header as a submitted image is (422), above the disk floor (507); stored as the type
  it was checked as (never the client's claim), in a file that is never executable;
- ``GET storage/files/<token>``: the file (no key: the token is random, as fal's CDN URLs are), ``Content-Type`` the
  checked type, ``X-Content-Type-Options: nosniff`` and a sandboxing ``Content-Security-Policy``; 404 once expired.

An upload expires ``keep_s`` after it arrived (:data:`KEEP_UPLOADS_ENV`, serve's ``--keep-uploads-hours``; default
:data:`KEEP_UPLOADS_HOURS`); expired files are deleted at the next storage call or submit (at most once a minute) and
never served meanwhile. A submit whose image URL is one of this server's own file URLs (an upload, or a result image)
reads the stored file (:meth:`Uploads.take_own`): never an HTTP call to itself, so the internal-address guard
(:mod:`.fetch`) never sees it and nothing waits on the network. Files live in the store's folder (``uploads/``), so
they count toward its disk floor (:mod:`.disk`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import time
import urllib.parse
from pathlib import Path

from . import disk
from .inputs import FORMATS, Limits, check_images, image_size
from .protocol import HttpError, invalid, route_path
from .store import INPUT_NAMES

log = logging.getLogger("sdxl_controlnet_img2img.serve")
KEEP_UPLOADS_ENV = "SDXLCN_SERVE_KEEP_UPLOADS_HOURS"
KEEP_UPLOADS_HOURS = 24.0  # an uploaded file is served, and taken by a submit, this long after its upload
UPLOAD_WINDOW_S = 3600.0  # an upload URL takes its bytes within this time of the initiate call
MAX_PENDING = 1000  # upload URLs handed out and not yet used; more is answered with 429
MAX_INITIATE_BYTES = 64 * 1024  # the initiate call's JSON body
PURGE_EVERY_S = 60.0
TOKEN = r"[0-9a-f]{32}"
# the path ends of this server's own file URLs: an upload, a result image (their tokens made here, never a path)
OWN_PATHS = (re.compile(rf"/storage/files/(?P<token>{TOKEN})$"),
             re.compile(rf"/files/(?P<token>{TOKEN})/(?P<n>\d{{1,2}})\.png$"))
SERVED_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
                  "Content-Disposition": "inline"}


def checked_type(data: bytes, limits: Limits) -> str:
    """The image format of ``data`` (Pillow's name: one a submit takes, read from the header as a submitted image's
    is: :func:`.inputs.image_size`); 422 naming the file otherwise."""
    from PIL import Image

    image_size("file", data, limits)  # the same formats and pixel limit as a submitted image, or 422
    with Image.open(io.BytesIO(data), formats=FORMATS) as probe:
        return probe.format


def media_type(fmt: str) -> str:
    from PIL import Image

    return Image.MIME[fmt]


def _json(status: int, body, headers: dict | None = None) -> tuple:
    return status, json.dumps(body).encode(), "application/json", dict(headers or {})


class Uploads:
    """The uploads of one store's folder (``<folder>/uploads``: ``pending/<upload token>.json``, one per upload URL
    handed out; ``files/<file token>.<format>``, one per upload)."""

    def __init__(self, store, keep_s: float | None = None):
        self.store = store  # its min_free_bytes is the floor; its results are the other own files
        self.folder = Path(store.folder) / "uploads"
        self.pending, self.files = self.folder / "pending", self.folder / "files"
        for d in (self.folder, self.pending, self.files):  # this user's only, as the rest of the data folder
            disk.private_dir(d)
        self.keep_s = disk.setting(KEEP_UPLOADS_ENV, KEEP_UPLOADS_HOURS) * 3600 if keep_s is None else keep_s
        self._purged = 0.0
        self.purge(force=True)

    # ---- the storage calls ----------------------------------------------------------------------
    def upload_put(self, req) -> str | None:
        """For a PUT to an upload URL: "live" (handed out here within the hour and not used yet: its body is read, as a
        POST's is; :mod:`.web`) or "dead" (refused unread: nobody may make this server read a body by guessing a
        token); None for any other call."""
        if req.method != "PUT" or "x-fal-target-url" in req.headers:
            return None
        try:
            route = route_path(req.method, req.path, req.query)
        except HttpError:
            return None
        if route.kind != "upload":
            return None
        try:
            fresh = time.time() - (self.pending / f"{route.token}.json").stat().st_mtime < UPLOAD_WINDOW_S
        except OSError:
            fresh = False
        return "live" if fresh else "dead"

    def answer(self, route, body: bytes, base: str, limits: Limits) -> tuple:
        """A storage call's answer: (status, body, content type, headers), an :class:`~.app.HttpResponse`'s fields."""
        if route.kind == "upload_file":
            return self._file(route.token)
        self.purge()
        if route.kind == "storage":
            return self._initiate(body, base)
        if route.kind == "storage_multipart":
            raise self.too_large(None, limits)
        if route.kind == "upload":
            return self._put(route.token, body, limits)
        raise ValueError(route.kind)

    def _initiate(self, body: bytes, base: str) -> tuple:
        if len(body) > MAX_INITIATE_BYTES:
            raise HttpError(413, [{"loc": ["body"], "msg": f"the upload's description is over {MAX_INITIATE_BYTES} "
                                   "bytes; send {content_type, file_name}", "type": "value_error.too_large"}])
        try:
            parsed = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError):
            parsed = None
        if not isinstance(parsed, dict):
            raise invalid(["body"], "must be a JSON object: {\"content_type\": ..., \"file_name\": ...}",
                          "type_error.dict")
        if sum(1 for _ in self.pending.glob("*.json")) >= MAX_PENDING:
            raise HttpError(429, f"{MAX_PENDING} upload URLs are waiting for their bytes; try again later",
                            {"Retry-After": "10"})
        self._check_free(0)
        upload, file = secrets.token_hex(16), secrets.token_hex(16)
        file_url = f"{base}/storage/files/{file}"
        disk.replace_synced(self.pending / f"{upload}.json", json.dumps({"file": file, "file_url": file_url}).encode())
        return _json(200, {"upload_url": f"{base}/storage/upload/{upload}", "file_url": file_url})

    def _put(self, token: str, data: bytes, limits: Limits) -> tuple:
        slot = self.pending / f"{token}.json"
        try:
            fresh = time.time() - slot.stat().st_mtime <= UPLOAD_WINDOW_S
            meta = json.loads(slot.read_bytes())
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            raise HttpError(404, "no such upload URL: each one takes one upload, within "
                                 f"{UPLOAD_WINDOW_S / 3600:g} h of the call that made it; ask for a new one")
        if len(data) > limits.max_image_bytes:
            raise self.too_large(len(data), limits)
        fmt = checked_type(data, limits)
        self._check_free(len(data))
        taken = slot.with_name(f"{token}.{secrets.token_hex(4)}.taken")
        try:
            slot.rename(taken)  # one upload per URL, even when two arrive at once
        except FileNotFoundError:
            raise HttpError(404, "this upload URL was just used; ask for a new one") from None
        try:
            path = self.files / f"{meta['file']}.{fmt.lower()}"
            disk.replace_synced(path, data)
            os.chmod(path, 0o600)  # this user's only and never executable, whatever the umask
            disk.sync_dir(self.files)
        finally:
            taken.unlink(missing_ok=True)
        log.info("serve: stored an upload (%s, %d bytes) for %g h", media_type(fmt), len(data), self.keep_s / 3600)
        return _json(200, {"file_url": meta["file_url"], "content_type": media_type(fmt)})

    def _file(self, token: str) -> tuple:
        found = self._live(token)
        if found is None:
            raise HttpError(404, f"no such file: uploads are kept {self.keep_s / 3600:g} h")
        path, fmt, left = found
        data = path.read_bytes()
        return 200, data, media_type(fmt), {**SERVED_HEADERS, "Cache-Control": f"private, max-age={int(left)}"}

    # ---- the files ------------------------------------------------------------------------------
    def _live(self, token: str) -> tuple[Path, str, float] | None:
        """(path, format, seconds left) of an upload that has not expired, else None."""
        if not re.fullmatch(TOKEN, token or ""):
            return None
        for path in self.files.glob(f"{token}.*"):
            fmt = path.suffix[1:].upper()
            if fmt.endswith("PART"):
                continue
            try:
                left = path.stat().st_mtime + self.keep_s - time.time()
            except OSError:
                return None
            return (path, fmt, left) if left > 0 else None
        return None

    def _check_free(self, incoming: int) -> None:
        try:
            disk.check_free(self.folder, incoming, self.store.min_free_bytes)
        except disk.LowDisk as exc:
            raise HttpError(507, str(exc)) from None

    @staticmethod
    def too_large(size: int | None, limits: Limits) -> HttpError:
        what = "the file" if size is None else f"the file is {size} bytes,"
        return HttpError(413, [{"loc": ["body"], "msg": f"{what} over this server's limit of {limits.max_image_bytes} "
                                "bytes for an image; send a smaller one", "type": "value_error.too_large"}])

    def purge(self, force: bool = False) -> int:
        """Deletes expired uploads and unused upload URLs (at most once a minute unless ``force``); how many went."""
        now = time.monotonic()
        if not force and now - self._purged < PURGE_EVERY_S:
            return 0
        self._purged = now
        gone = 0
        for folder, keep in ((self.files, self.keep_s), (self.pending, UPLOAD_WINDOW_S)):
            for path in folder.iterdir():
                try:
                    if time.time() - path.stat().st_mtime > keep:
                        path.unlink()
                        gone += 1
                except OSError:  # gone meanwhile, or not ours to delete: left for the next turn
                    pass
        if gone:
            log.info("serve: deleted %d expired upload(s)", gone)
        return gone

    # ---- a submit's own URLs --------------------------------------------------------------------
    def take_own(self, args: dict, images: dict, base: str, limits: Limits) -> None:
        """Each image URL of ``args`` that is one of this server's own files (an upload or a result image) becomes its
        bytes in ``images`` (as a data URI's are, checked as they are), its text in ``args`` emptied; 422 naming the
        field when such a URL, written on this server's base, names a file that expired or never was."""
        self.purge()
        own = {}
        for name in INPUT_NAMES:
            url = args.get(name) or ""
            found = self._own(url, base)
            if found is None:
                continue
            if found is False:
                raise invalid(["body", name], f"{url[:200]} is a file of this server that expired or never existed "
                                              f"(uploads are kept {self.keep_s / 3600:g} h); upload it again")
            if len(found) > limits.max_image_bytes:
                raise invalid(["body", name], f"is over this server's limit of {limits.max_image_bytes} bytes")
            own[name] = found
        check_images(own, args.get("image_size"), limits)
        for name, data in own.items():
            images[name] = data
            args[name] = ""  # stored beside the row, as a data URI's bytes are

    def _own(self, url: str, base: str):
        """The bytes of an own file URL; False for one on ``base`` whose file is gone; None for any other URL."""
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError:
            return None
        if parts.query or parts.fragment:
            return None
        upload, result = (pattern.search(parts.path) for pattern in OWN_PATHS)
        for m, read in ((upload, lambda m: self._upload_bytes(m["token"])),
                        (result, lambda m: self._result_bytes(m["token"], int(m["n"])))):
            if m is None:
                continue
            data = read(m)
            if data is not None:
                return data
            on_base = f"{parts.scheme}://{parts.netloc}{parts.path[:m.start()]}".lower() == base.rstrip("/").lower()
            return False if on_base else None
        return None

    def _upload_bytes(self, token: str) -> bytes | None:
        found = self._live(token)
        try:
            return None if found is None else found[0].read_bytes()
        except OSError:
            return None

    def _result_bytes(self, token: str, index: int) -> bytes | None:
        job = self.store.by_token(token)
        if job is None or job.state != "COMPLETED" or not job.result or index >= len(job.result.get("images", [])):
            return None
        try:
            return self.store.image_path(job.id, index).read_bytes()
        except OSError:
            return None
